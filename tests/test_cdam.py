"""CDAM as a component (adapters/cdam.py) against float64 re-computations of docs/spec/cdam.md §3-§11.

The references below are written from the spec and the block weights only: bilinear matrices from the
align_corners=False formula, the JSD in its direct §5 form, pass 1 and pass 2 from ``ln_1``, the value rows of
``in_proj``, ``out_proj``, ``ln_2``, the MLP, ``ln_post`` and ``proj``.
"""
from __future__ import annotations

import functools
import math
import time

import pytest
import torch
import torch.nn.functional as F

from cass_plugins.adapters.cdam import CDAM, CDAM_ABLATION, CDAM_PRESETS, atp_vocabulary, cdam_vocabulary
from cass_plugins import encode_dense, patch_clip
from cass_plugins.adapters.cdam_math import ATP_PROMPTS
from cass_plugins.core.hookspecs import hookimpl
from cass_plugins.core.config import resolve_config
import reference_cdam
from conftest import make_tiny_clip, make_tiny_vfm

SCALES = (0.25, 0.37, 0.5, 0.63, 0.75, 0.87, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# float64 references written from the spec
# ---------------------------------------------------------------------------------------------------------------


def ref_bilinear(src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """2-D bilinear resampling matrix U (N_dst × N_src), align_corners=False: src = (dst+½)·in/out − ½, ≥ 0."""

    def weights(n_in: int, n_out: int) -> list[list[tuple[int, float]]]:
        rows = []
        for o in range(n_out):
            s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = int(math.floor(s))
            i1 = min(i0 + 1, n_in - 1)
            rows.append([(i0, 1.0 - (s - i0)), (i1, s - i0)])
        return rows

    wy, wx = weights(src[0], dst[0]), weights(src[1], dst[1])
    u = torch.zeros(dst[0] * dst[1], src[0] * src[1], dtype=torch.float64)
    for y in range(dst[0]):
        for x in range(dst[1]):
            for a, wa in wy[y]:
                for b, wb in wx[x]:
                    u[y * dst[1] + x, a * src[1] + b] += wa * wb
    return u


def ref_jsd(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """§5 direct form, (B, N, C) → (B, N, N)."""
    pi, pj = p[:, :, None, :], p[:, None, :, :]
    m = (pi + pj) / 2
    lm = torch.log(m + eps)
    return 0.5 * ((pi * (torch.log(pi + eps) - lm)).sum(-1) + (pj * (torch.log(pj + eps) - lm)).sum(-1))


def ref_minmax(a: torch.Tensor) -> torch.Tensor:
    lo, hi = a.amin(-1, keepdim=True), a.amax(-1, keepdim=True)
    return (a - lo) / (hi - lo + 1e-8)


def ref_transform(jsd: torch.Tensor, minmax: bool = True) -> torch.Tensor:
    """§6: 1 − JSD, row min-max, row softmax(·/0.1), row min-max."""
    a = 1.0 - jsd
    a = ref_minmax(a) if minmax else a
    b = torch.softmax(a / 0.1, dim=-1)
    return ref_minmax(b) if minmax else b


def ref_cdam(s0: torch.Tensor, grid: tuple[int, int], scales=SCALES, order: str = "upsample_divergence") -> torch.Tensor:
    """§7: mean over scales of one §6 map each, from the raw S0 (B, N, C)."""
    total = 0.0
    for m in scales:
        if m == 1.0:
            total = total + ref_transform(ref_jsd(torch.softmax(s0 / 0.1, -1)))
            continue
        sub = (max(1, int(grid[0] * m)), max(1, int(grid[1] * m)))
        down = ref_bilinear(grid, sub) @ s0
        jsd = ref_jsd(torch.softmax(down / 0.1, -1))
        up = ref_bilinear(sub, grid)
        if order == "upsample_divergence":
            total = total + ref_transform(up @ jsd @ up.T)
        else:
            total = total + up @ ref_transform(jsd) @ up.T
    return total / len(scales)


def block_parts(model: torch.nn.Module) -> dict:
    visual = model.visual
    blk = visual.transformer.resblocks[-1]
    d = blk.attn.in_proj_weight.shape[1]
    return dict(
        blk=blk, wv=blk.attn.in_proj_weight[2 * d:], bv=blk.attn.in_proj_bias[2 * d:], ln_post=visual.ln_post,
        proj=visual.proj,
    )


def ref_block(parts: dict, x_in: torch.Tensor, attention: torch.Tensor | None, residual: bool = True) -> torch.Tensor:
    """Patch rows of the last block with a fixed attention on the values (None: identity), (B, N, D) (§3, §9)."""
    blk = parts["blk"]
    v = blk.ln_1(x_in) @ parts["wv"].T + parts["bv"]
    v = v[:, 1:]  # the CLS column of the CDAM matrix is zero (§8)
    o = v if attention is None else attention @ v
    a = o @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    if not residual:
        return a
    x = x_in[:, 1:] + a
    return x + blk.mlp(blk.ln_2(x))


def ref_features(parts: dict, tokens: torch.Tensor) -> torch.Tensor:
    return parts["ln_post"](tokens) @ parts["proj"]


def ref_similarity(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T


def capture_block_input(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Input of the last block ``(B, L, D)`` from an unpatched forward (any grid: encode_dense interpolates)."""
    seen = []
    blk = model.visual.transformer.resblocks[-1]
    h = blk.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            encode_dense(model, images)
    finally:
        h.remove()
    x = seen[0]
    return x if x.shape[0] == images.shape[0] else x.transpose(0, 1)


def ref_entropy_range(logits: torch.Tensor) -> tuple[float, float]:
    """min / max over patches of the entropy in bits of softmax(50·logits) over classes; logits (Q, h, w)."""
    q = torch.softmax(50.0 * logits.double().flatten(1), dim=0)
    h = -(torch.where(q > 0, q * torch.log2(q), torch.zeros_like(q))).sum(0)
    return float(h.min()), float(h.max())


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

K, E = 5, 32
GRID = (6, 8)


@pytest.fixture
def model64() -> torch.nn.Module:
    return make_tiny_clip(seed=3).double()


@pytest.fixture
def images64() -> torch.Tensor:
    torch.manual_seed(11)
    return torch.randn(2, 3, GRID[0] * 16, GRID[1] * 16, dtype=torch.float64)


@pytest.fixture
def text64() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    # A shared direction keeps the cosines spread like real CLIP text (otherwise S0 ≈ 0 and p is flat).
    common = torch.randn(E, generator=g, dtype=torch.float64)
    cls = F.normalize(common + torch.randn(K, E, generator=g, dtype=torch.float64), dim=-1)
    atp = F.normalize(common + torch.randn(80, E, generator=g, dtype=torch.float64), dim=-1)
    return cls, atp


# ---------------------------------------------------------------------------------------------------------------
# Block output against the spec
# ---------------------------------------------------------------------------------------------------------------

TOGGLES = [
    pytest.param({}, id="repo"),
    pytest.param({"cdam_multiscale": False}, id="single-scale"),
    pytest.param({"cdam_atp": False}, id="no-atp"),
    pytest.param({"cdam_multiscale_order": "upsample_attention"}, id="paper-order"),
    pytest.param({"cdam_pass2_arch": "reduced", "cdam_row_normalize": True}, id="reduced-rownorm"),
]


@pytest.mark.parametrize("overrides", TOGGLES)
def test_repo_configuration_matches_float64_reference(model64, images64, text64, overrides):
    """cdam-maskclip is the authors' repo: identity-attention pass 1 (residual + FFN), S0, CDAM, pass 2 (§3-§9)."""
    cls, atp = text64
    x_in = capture_block_input(model64, images64)
    parts = block_parts(model64)
    with torch.no_grad():
        t_all = torch.cat([cls, atp]) if overrides.get("cdam_atp", True) else cls
        s0 = ref_similarity(ref_features(parts, ref_block(parts, x_in, None)), t_all)
        scales = SCALES if overrides.get("cdam_multiscale", True) else (1.0,)
        w = ref_cdam(s0, GRID, scales, overrides.get("cdam_multiscale_order", "upsample_divergence"))
        if overrides.get("cdam_row_normalize"):
            w = w / w.sum(-1, keepdim=True)
        residual = overrides.get("cdam_pass2_arch", "vanilla") == "vanilla"
        expected = ref_features(parts, ref_block(parts, x_in, w, residual=residual))

    with patch_clip(model64, preset="cdam-maskclip", **overrides) as handle:
        handle.pm.get_plugin("cdam").set_text(cls, atp)
        with torch.no_grad():
            got = encode_dense(model64, images64).features
    torch.testing.assert_close(got.reshape(2, -1, got.shape[-1]), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("row_normalize", [False, True], ids=["repo", "rownorm"])
def test_component_matches_the_spec_lxl_block_forward(model64, images64, text64, row_normalize):
    """The component's patch-rows-only pass 2 equals the spec's L×L formulation (tests/reference_cdam.py): pass 1
    and pass 2 through the whole last block with the CLS row/column of the CDAM matrix zero and every head sharing it
    (§3, §8, §9)."""
    cls, atp = text64
    x_in = capture_block_input(model64, images64)
    parts = block_parts(model64)
    blk = parts["blk"]
    layers = dict(
        ln_1=blk.ln_1, value=lambda y: y @ parts["wv"].T + parts["bv"], out_proj=blk.attn.out_proj, ln_2=blk.ln_2,
        mlp=blk.mlp,
    )
    with torch.no_grad():
        pass1 = reference_cdam.cdam_block_forward(x_in, None, **layers)
        s0 = ref_similarity(ref_features(parts, pass1[:, 1:]), torch.cat([cls, atp]))
        heads = blk.attn.num_heads
        w = reference_cdam.assemble_attention(ref_cdam(s0, GRID), num_heads=heads, row_normalize=row_normalize)
        expected = ref_features(parts, reference_cdam.cdam_block_forward(x_in, w, **layers)[:, 1:])
    with patch_clip(model64, preset="cdam-maskclip", cdam_row_normalize=row_normalize) as handle:
        handle.pm.get_plugin("cdam").set_text(cls, atp)
        with torch.no_grad():
            got = encode_dense(model64, images64).features
    torch.testing.assert_close(got.reshape(2, -1, got.shape[-1]), expected, rtol=1e-9, atol=1e-10)


BASELINES = [
    pytest.param("naclip", {}, id="naclip"),
    pytest.param("sclip", {}, id="sclip"),
    pytest.param("clearclip", {}, id="clearclip"),
    pytest.param("vanilla", {}, id="vanilla"),
    pytest.param("maskclip", {}, id="maskclip-reduced"),
    pytest.param("cass-official", {"spectral": True}, id="cass-spectral"),
]


@pytest.mark.parametrize("preset, overrides", BASELINES)
def test_composes_with_any_baseline(model64, images64, text64, preset, overrides):
    """S0 comes from the baseline's own last-block output; pass 2 is the repo's block on the same input (§15.2)."""
    cls, atp = text64
    vfm = make_tiny_vfm().double() if overrides.get("spectral") else None
    if preset != "cass-official":
        overrides = {"spectral": False, **overrides}
    with patch_clip(model64, vfm, preset=preset, **overrides), torch.no_grad():
        pass1 = encode_dense(model64, images64).features.reshape(2, -1, E)
    x_in = capture_block_input(model64, images64)
    parts = block_parts(model64)
    with torch.no_grad():
        w = ref_cdam(ref_similarity(pass1, torch.cat([cls, atp])), GRID)
        expected = ref_features(parts, ref_block(parts, x_in, w))

    cdam = CDAM()
    with patch_clip(model64, vfm, preset=preset, plugins=[cdam], **overrides), torch.no_grad():
        cdam.set_text(cls, atp)
        got = encode_dense(model64, images64).features.reshape(2, -1, E)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_openai_style_model_matches_reference(openai_clip, text64):
    """Sequence-first OpenAI-clip-style towers: same reference via the block weights."""
    model = openai_clip.double()
    cls, atp = text64
    torch.manual_seed(2)
    images = torch.randn(1, 3, 80, 96, dtype=torch.float64)
    x_in = capture_block_input(model, images)
    parts = block_parts(model)
    with torch.no_grad():
        s0 = ref_similarity(ref_features(parts, ref_block(parts, x_in, None)), torch.cat([cls, atp]))
        expected = ref_features(parts, ref_block(parts, x_in, ref_cdam(s0, (5, 6))))
    with patch_clip(model, preset="cdam-maskclip") as handle, torch.no_grad():
        handle.pm.get_plugin("cdam").set_text(cls, atp)
        got = encode_dense(model, images).features.reshape(1, -1, E)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Patching, errors, configuration
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["open_clip", "openai"])
def test_patch_remove_bit_identity(kind, openai_clip, text64):
    model = make_tiny_clip() if kind == "open_clip" else openai_clip
    torch.manual_seed(4)
    images = torch.randn(2, 3, 64, 64)  # the native size: encode_image has no positional interpolation
    with torch.no_grad():
        before_img = model.encode_image(images)
        before = encode_dense(model, images).features
        handle = patch_clip(model, preset="cdam-sclip")
        handle.pm.get_plugin("cdam").set_text(text64[0].float(), text64[1].float())
        patched = encode_dense(model, images).features
        handle.remove()
        after = encode_dense(model, images).features
        after_img = model.encode_image(images)
    assert not torch.allclose(patched, before)
    assert torch.equal(after, before) and torch.equal(after_img, before_img)


def test_components_and_plugins_entry_points(text64):
    model = make_tiny_clip()
    with patch_clip(model, preset="sclip", components=["cdam"]) as handle:
        assert isinstance(handle.pm.get_plugin("cdam"), CDAM)
        assert handle.config.cdam and not handle.config.spectral
    with patch_clip(model, preset="cdam-sclip", components=[]) as handle:
        assert handle.pm.get_plugin("cdam") is None


def test_missing_text_and_proxyclip_fail_clearly(text64):
    model = make_tiny_clip()
    images = torch.randn(1, 3, 64, 64)
    with patch_clip(model, preset="cdam-sclip"), pytest.raises(RuntimeError, match="set_vocabulary"):
        encode_dense(model, images)
    cdam = CDAM(atp=True)
    cdam.set_text(text64[0].float())
    with patch_clip(model, preset="sclip", plugins=[cdam]), pytest.raises(RuntimeError, match="ATP"):
        encode_dense(model, images)
    cdam.set_text(*(t.float() for t in text64))
    with patch_clip(model, preset="cdam-sclip", plugins=[cdam]) as handle:
        handle.pm.get_plugin("cdam").set_text(*(t.float() for t in text64))
        with pytest.raises(RuntimeError, match="registered twice"):
            encode_dense(model, images)
    with patch_clip(model, make_tiny_vfm(), preset="proxyclip", plugins=[cdam]):
        with pytest.raises(ValueError, match="ProxyCLIP"):
            encode_dense(model, images)


def test_presets_and_ablation_are_configurations():
    for name in ("cdam-maskclip", "cdam-sclip", "cdam-clearclip", "cdam-paper"):
        cfg = resolve_config(name, "voc21")
        assert cfg.cdam and not (cfg.spectral or cfg.presence_prior or cfg.ota)
        assert (cfg.crop, cfg.stride, cfg.short_side, cfg.logit_scale, cfg.pamr_steps) == (448, 224, 448, 50.0, 0)
        assert cfg.class_files == "cdam" and cfg.cdam_entropy_threshold
        assert not resolve_config(name, "ade20k").cdam_entropy_threshold
    assert resolve_config("cdam-maskclip").arch == "vanilla" and resolve_config("cdam-maskclip").attn == "identity"
    assert resolve_config("cdam-paper").cdam_threshold_granularity == "image"
    rows = [resolve_config("cdam-sclip", "voc21", **row) for row in CDAM_ABLATION.values()]
    assert [r.cdam for r in rows] == [False, True, True, True, True]
    comps = [CDAM(r["cdam"]) for r in rows[1:]]
    assert [(c.multiscale, c.atp, c.entropy_threshold) for c in comps] == [
        (False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    assert set(CDAM_PRESETS) == {"cdam-maskclip", "cdam-sclip", "cdam-clearclip", "cdam-paper"}
    assert cdam_vocabulary("coco_object").class_names[0] == "sky" and cdam_vocabulary("voc21").num_classes == 21
    assert atp_vocabulary().queries == ATP_PROMPTS


# ---------------------------------------------------------------------------------------------------------------
# End to end: the Segmenter, the entropy threshold in post-processing
# ---------------------------------------------------------------------------------------------------------------


class WindowSpy:
    """Records every window's final logits and coordinates (runs after all other logit components)."""

    def __init__(self) -> None:
        self.windows: list[tuple[tuple[int, int, int, int] | None, torch.Tensor]] = []

    @hookimpl(trylast=True)
    def cass_refine_logits(self, ctx) -> None:
        for i in range(ctx.logits.shape[0]):
            self.windows.append((ctx.windows[i] if ctx.windows else None, ctx.logits[i].clone()))


@pytest.fixture(scope="module")
def tiny_text_model() -> torch.nn.Module:
    return make_tiny_clip(seed=7)  # module scope: its text embeddings stay cached across tests


def ref_labels(logits: torch.Tensor, thr: float) -> torch.Tensor:
    probs = torch.softmax(50.0 * logits.double(), dim=0)
    max_prob, labels = probs.max(0)
    return torch.where(max_prob < thr, torch.zeros_like(labels), labels)


@pytest.mark.parametrize("granularity", ["last_window", "image"])
def test_segmenter_end_to_end_entropy_threshold(tiny_text_model, granularity):
    """A real photo (chelsea) through Segmenter(preset="cdam-sclip"); the threshold of §10 reaches the labels (§11)."""
    from skimage import data

    from cass_plugins.pipeline.segmenter import Segmenter

    spy = WindowSpy()
    vocab = "background; cat; grass; wall"
    # Smaller windows than the preset's 448 keep the tiny model fast: 224×336 → 2×4 windows of 160, in batches of 3.
    with Segmenter(tiny_text_model, preset="cdam-sclip", dataset="voc21", vocabulary=vocab, plugins=[spy],
                   short_side=224, crop=160, stride=80, window_batch=3,
                   cdam_threshold_granularity=granularity) as seg:
        result = seg.segment(data.chelsea())
    coords = [w for w, _ in spy.windows]
    assert len(coords) == 8 and max(coords) == (64, 224, 177, 337)  # 300×451 → 224×337; the raster-last window
    if granularity == "last_window":
        logits = dict(spy.windows)[max(coords)]
        h_min, h_max = ref_entropy_range(logits)
    else:
        ranges = [ref_entropy_range(lg) for _, lg in spy.windows]
        h_min, h_max = min(r[0] for r in ranges), max(r[1] for r in ranges)
    expected_thr = 0.5 * 2.5 / ((h_min + h_max) / 2)
    assert result.record["cdam_threshold"] == pytest.approx(expected_thr, rel=1e-5)
    assert result.labels.shape == (300, 451)
    expected = ref_labels(result.logits, result.record["cdam_threshold"])
    assert (result.labels == expected).float().mean() > 0.999  # float32 softmax vs float64 at ties only


def test_segmenter_no_background_dataset_keeps_argmax(tiny_text_model):
    from skimage import data

    from cass_plugins.pipeline.segmenter import Segmenter

    with Segmenter(tiny_text_model, preset="cdam-clearclip", dataset="ade20k", vocabulary="cat; grass; wall",
                   short_side=160, crop=160, stride=160) as seg:
        result = seg.segment(data.chelsea())
    assert "cdam_threshold" not in result.record
    assert torch.equal(result.labels, result.logits.argmax(0))


@pytest.mark.slow
def test_full_size_random_vit_b16_end_to_end(monkeypatch):
    """open_clip ViT-B-16 (random weights) through Segmenter(preset="cdam-sclip") on a real photo, 448 windows."""
    import open_clip
    from skimage import data

    import cass_plugins.pipeline.segmenter as segmenter_module
    from cass_plugins.pipeline.segmenter import Segmenter
    from cass_plugins.pipeline.text import encode_text

    # One template instead of 80: the 12-layer text tower on (K + 80)·80 prompts would take minutes on a CPU.
    monkeypatch.setattr(segmenter_module, "encode_text", functools.partial(encode_text, templates=("a photo of a {}.",)))
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    spy = WindowSpy()
    start = time.perf_counter()
    with Segmenter(model, preset="cdam-sclip", dataset="voc21", vocabulary=cdam_vocabulary("voc21"),
                   plugins=[spy]) as seg:
        result = seg.segment(data.astronaut())
    assert time.perf_counter() - start < 120
    assert result.labels.shape == (512, 512) and torch.isfinite(result.probs).all()
    (_, logits), = spy.windows  # 512 → 448: one 448 window, 28×28 patches
    assert logits.shape == (21, 28, 28)
    h_min, h_max = ref_entropy_range(logits)
    assert result.record["cdam_threshold"] == pytest.approx(1.25 / ((h_min + h_max) / 2), rel=1e-5)


def test_segmenter_with_cass_components_and_cdam(tiny_text_model):
    """CASS (NACLIP + spectral distillation + OPS + OTA) with CDAM on top runs end to end on a real photo."""
    from skimage import data

    from cass_plugins.pipeline.segmenter import Segmenter

    spy = WindowSpy()
    with Segmenter(tiny_text_model, make_tiny_vfm(), preset="cass-official", vocabulary="background; cat; grass",
                   cdam=True, short_side=160, crop=160, stride=160, plugins=[spy]) as seg:
        assert {"spectral", "ops", "ota", "cdam"} <= {n for n, _ in seg.handle.pm.list_name_plugin()}
        result = seg.segment(data.chelsea())
    assert result.record["matching"] and len(spy.windows) == 2
    (_, last), = [w for w in spy.windows if w[0] == max(c for c, _ in spy.windows)]
    h_min, h_max = ref_entropy_range(last)  # taken after OPS: from the logits that are thresholded
    assert result.record["cdam_threshold"] == pytest.approx(1.25 / ((h_min + h_max) / 2), rel=1e-5)
