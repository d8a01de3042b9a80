"""Baseline adapters against float64 re-computations of baselines.md §1 (and their composition with CASS).

Every reference below is computed here from the model's weights: the positional embedding is resampled with the
"+0.1" scale-factor rule by hand, the first blocks run on float64 copies of the model's own modules, and the last
block's q/k/v, attention, output projection, residual/FFN and head are written out from ``in_proj_weight`` etc.
None of it goes through ``ViTAccess``, ``VFMRunner`` or the adapters.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_clip, make_tiny_vfm
from openai_style import make_openai_style_clip

from cass_plugins import encode_dense, get_patch, patch_clip, resolve_config
from cass_plugins.core.hookspecs import hookimpl

MODELS = {"open_clip": make_tiny_clip, "openai": make_openai_style_clip}
CLIP_MEAN = torch.tensor([122.771, 116.746, 104.094], dtype=torch.float64) / 255
CLIP_STD = torch.tensor([68.501, 66.632, 70.323], dtype=torch.float64) / 255
# What ProxyCLIP undoes the CLIP normalisation with (baselines.md §1.5, ProxyCLIP myutils.py): OpenAI CLIP's 0–1 values.
PROXY_CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64)
PROXY_CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64)
IMNET_MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
IMNET_STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
TOL = dict(rtol=1e-4, atol=2e-5)


def _images(b: int = 2, h: int = 64, w: int = 96, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g)


def _dino_resample(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(G*G, D) patch table → (gh*gw, D) with the "+0.1" scale-factor rule (baselines.md §2)."""
    n, d = table.shape
    g = math.isqrt(n)
    if (g, g) == tuple(grid):
        return table
    t = table.reshape(1, g, g, d).permute(0, 3, 1, 2)
    t = F.interpolate(t, scale_factor=((grid[0] + 0.1) / g, (grid[1] + 0.1) / g), mode="bicubic", align_corners=False)
    assert tuple(t.shape[-2:]) == tuple(grid)
    return t.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], d)


class Ref:
    """Float64 copy of a CLIP image tower with the last block written out by hand."""

    def __init__(self, model: torch.nn.Module, kind: str) -> None:
        self.v = copy.deepcopy(model.visual).double()
        self.seq_first = kind == "openai"
        self.blk = self.v.transformer.resblocks[-1]
        self.h = self.blk.attn.num_heads
        self.dh = self.blk.attn.embed_dim // self.h
        self.s = self.dh ** -0.5

    def last_block_input(self, images: torch.Tensor, rule: str = "dino") -> tuple[torch.Tensor, tuple[int, int]]:
        v = self.v
        x = v.conv1(images.double())
        b, d, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        pos = v.positional_embedding
        if rule == "dino":
            patch_pos = _dino_resample(pos[1:], (gh, gw))
        else:  # resampling by size (what the +0.1 rule is NOT)
            g = math.isqrt(pos.shape[0] - 1)
            t = F.interpolate(pos[1:].reshape(1, g, g, d).permute(0, 3, 1, 2), size=(gh, gw), mode="bicubic",
                              align_corners=False)
            patch_pos = t.permute(0, 2, 3, 1).reshape(gh * gw, d)
        x = torch.cat([(v.class_embedding + pos[0]).expand(b, 1, d), x + patch_pos], dim=1)
        y = v.ln_pre(x)
        y = y.transpose(0, 1) if self.seq_first else y
        for blk in v.transformer.resblocks[:-1]:
            y = blk(y)
        return (y.transpose(0, 1) if self.seq_first else y), (gh, gw)

    def qkv(self, x: torch.Tensor) -> list[torch.Tensor]:
        u = self.blk.ln_1(x)
        y = u @ self.blk.attn.in_proj_weight.T + self.blk.attn.in_proj_bias
        b, t, _ = y.shape
        return [z.reshape(b, t, self.h, self.dh).transpose(1, 2) for z in y.chunk(3, dim=-1)]

    def out_proj(self, o: torch.Tensor) -> torch.Tensor:
        b, h, t, dh = o.shape
        o = o.transpose(1, 2).reshape(b, t, h * dh)
        return o @ self.blk.attn.out_proj.weight.T + self.blk.attn.out_proj.bias

    def residual_ffn(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        z = x + o
        return z + self.blk.mlp(self.blk.ln_2(z))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self.v.ln_post(z) @ self.v.proj


def naclip_omega(gh: int, gw: int, std: float) -> torch.Tensor:
    """Ω the way NACLIP builds it: one-hot maps convolved ('same') with an unnormalised (2gh-1)×(2gw-1) window."""
    c = 1.0 / (std * math.sqrt(2.0))
    ah = torch.linspace(-(gh - 1) * c, (gh - 1) * c, 2 * gh - 1, dtype=torch.float64)
    aw = torch.linspace(-(gw - 1) * c, (gw - 1) * c, 2 * gw - 1, dtype=torch.float64)
    window = torch.exp(-(ah[:, None] ** 2 + aw[None, :] ** 2))
    onehot = torch.eye(gh * gw, dtype=torch.float64).reshape(gh * gw, 1, gh, gw)
    return F.conv2d(onehot, window[None, None], padding="same").reshape(gh * gw, gh * gw)


def reference(ref: Ref, images: torch.Tensor, attn: str, arch: str, include_cls: bool = True,
              std: float | None = None, rule: str = "dino") -> torch.Tensor:
    """baselines.md §1.1-1.4 in float64 → (B, gh, gw, d)."""
    x, (gh, gw) = ref.last_block_input(images, rule)
    q, k, v = ref.qkv(x)
    p = 0 if include_cls else 1
    q, k, v, xr = q[:, :, p:], k[:, :, p:], v[:, :, p:], x[:, p:]
    s = ref.s
    t = q.shape[2]
    if attn in ("naclip", "nonly"):
        omega = naclip_omega(gh, gw, std)
        omega = F.pad(omega, (1, 0, 1, 0)) if include_cls else omega  # CLS row/column: no addition
    if attn == "vanilla":
        a = torch.softmax(s * q @ k.transpose(-1, -2), -1)
    elif attn == "qq":
        a = torch.softmax(s * q @ q.transpose(-1, -2), -1)
    elif attn == "kk":
        a = torch.softmax(s * k @ k.transpose(-1, -2), -1)
    elif attn == "csa":
        a = torch.softmax(s * q @ q.transpose(-1, -2), -1) + torch.softmax(s * k @ k.transpose(-1, -2), -1)
    elif attn == "identity":
        a = torch.eye(t, dtype=torch.float64)
    elif attn == "naclip":
        a = torch.softmax(s * k @ k.transpose(-1, -2) + omega, -1)
    elif attn == "nonly":
        assert images.shape[0] == 1  # NACLIP's own definition: one scalar over every head and pair
        c = s * (q.norm(dim=-1)[..., :, None] * k.norm(dim=-1)[..., None, :]).mean()
        a = torch.softmax((omega * c).expand(1, ref.h, t, t), -1)
    else:
        raise AssertionError(attn)
    o = ref.out_proj(a @ v)
    z = ref.residual_ffn(xr, o) if arch == "vanilla" else o
    f = ref.head(z)
    f = f[:, 1:] if include_cls else f
    return f.reshape(f.shape[0], gh, gw, -1)


def dense(model: torch.nn.Module, images: torch.Tensor, vfm=None, **kw) -> torch.Tensor:
    with torch.no_grad(), patch_clip(model, vfm, **kw):
        return encode_dense(model, images).features.double()


# ------------------------------------------------------------------------------------ formulas, one per baseline
CASES = [
    # (baseline, overrides, reference attn, reference arch)
    ("vanilla", {}, "vanilla", "vanilla"),
    ("vanilla", {"arch": "reduced"}, "vanilla", "reduced"),
    ("maskclip", {}, "identity", "reduced"),
    ("maskclip", {"arch": "vanilla"}, "identity", "vanilla"),
    ("sclip", {}, "csa", "vanilla"),
    ("sclip", {"arch": "reduced"}, "csa", "reduced"),
    ("clearclip", {}, "qq", "reduced"),
    ("clearclip", {"attn": "vanilla"}, "vanilla", "reduced"),
    ("clearclip", {"attn": "qq", "arch": "vanilla"}, "qq", "vanilla"),
    ("naclip", {"attn": "kk"}, "kk", "reduced"),
    ("naclip", {"attn": "vanilla", "arch": "vanilla"}, "vanilla", "vanilla"),
    ("naclip", {"attn": "csa", "arch": "vanilla"}, "csa", "vanilla"),
]


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("baseline,overrides,attn,arch", CASES)
def test_last_block_matches_spec(kind, baseline, overrides, attn, arch):
    model = MODELS[kind]()
    x = _images()
    got = dense(model, x, baseline=baseline, components=[], **overrides)
    want = reference(Ref(model, kind), x, attn, arch)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("std", [5.0, 1.0])
def test_naclip_gaussian_window(kind, std):
    model = MODELS[kind]()
    x = _images()
    got = dense(model, x, baseline="naclip", components=[], gaussian_std=std)
    torch.testing.assert_close(got, reference(Ref(model, kind), x, "naclip", "reduced", std=std), **TOL)
    # CASS's layout: CLS out of the attention, Ω without a CLS row
    got = dense(model, x, baseline="naclip", components=[], gaussian_std=std, include_cls=False)
    want = reference(Ref(model, kind), x, "naclip", "reduced", include_cls=False, std=std)
    torch.testing.assert_close(got, want, **TOL)


def test_naclip_nonly_scalar_and_per_image():
    model = make_tiny_clip()
    ref = Ref(model, "open_clip")
    x = _images()
    got = dense(model, x, baseline="naclip", components=[], attn="nonly", gaussian_std=2.0)
    for i in range(2):  # Q5 fixed: c per image, so each item equals NACLIP's batch-1 result
        torch.testing.assert_close(got[i:i + 1], reference(ref, x[i:i + 1], "nonly", "reduced", std=2.0), **TOL)


def test_positional_embedding_plus_point_one():
    model = make_tiny_clip()
    ref = Ref(model, "open_clip")
    x = _images(1, 80, 112)  # 5×7 grid from a native 4×4 table
    got = dense(model, x, baseline="clearclip", components=[])
    torch.testing.assert_close(got, reference(ref, x, "qq", "reduced"), **TOL)
    # the test can tell the rule apart from resampling by size
    by_size = reference(ref, x, "qq", "reduced", rule="size")
    assert (got - by_size).abs().max() > 1e-3


def test_plain_vanilla_is_the_unmodified_block():
    model = make_tiny_clip()
    x = _images()
    with torch.no_grad():
        plain = encode_dense(model, x).features
    torch.testing.assert_close(dense(model, x, baseline="vanilla", components=[]).float(), plain, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ ProxyCLIP
def make_vfm(reg_tokens: int = 0, img_size: int = 64) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    return VisionTransformer(
        img_size=img_size, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=0, reg_tokens=reg_tokens,
        no_embed_class=reg_tokens > 0, dynamic_img_size=True,
    ).eval()


def vfm_input_ref(clip_images: torch.Tensor, rule: str) -> torch.Tensor:
    """The VFM input in float64: undo the CLIP normalisation, then ImageNet's (x − mean) / std.

    ``rule="proxyclip"``: ``x·σ + μ`` with OpenAI CLIP's 0–1 constants, as ProxyCLIP does (baselines.md §1.5).
    ``rule="exact"``: the exact inverse of the 0–255 normalisation the crop went through (CASS, cass.md §6).
    """
    mean, std = (PROXY_CLIP_MEAN, PROXY_CLIP_STD) if rule == "proxyclip" else (CLIP_MEAN, CLIP_STD)
    x01 = clip_images.double() * std[:, None, None] + mean[:, None, None]
    return (x01 - IMNET_MEAN[:, None, None]) / IMNET_STD[:, None, None]


def vfm_features_ref(vfm: torch.nn.Module, clip_images: torch.Tensor, rule: str = "proxyclip") -> torch.Tensor:
    """Final-norm last-block patch features (B, C, H', W') of a timm ViT in float64, pos-embed by DINO's rule."""
    m = copy.deepcopy(vfm).double()
    x = vfm_input_ref(clip_images, rule)
    t = m.patch_embed.proj(x)
    b, c, gh, gw = t.shape
    t = t.flatten(2).transpose(1, 2)
    pos = m.pos_embed[0]
    n_reg = m.num_reg_tokens
    n_pos_prefix = 0 if n_reg else 1
    t = t + _dino_resample(pos[n_pos_prefix:], (gh, gw))
    cls = m.cls_token.expand(b, -1, -1) + (pos[:1] if n_pos_prefix else 0)
    prefix = [cls] + ([m.reg_token.expand(b, -1, -1)] if n_reg else [])
    t = torch.cat(prefix + [t], dim=1)
    for blk in m.blocks:
        t = blk(t)
    t = m.norm(t)[:, 1 + n_reg:]
    return t.transpose(1, 2).reshape(b, c, gh, gw)


def proxy_reference(ref: Ref, vfm, images: torch.Tensor, beta: float = 1.2, gamma: float = 3.0,
                    mean: str = "image") -> torch.Tensor:
    """baselines.md §1.5 in float64, with the Q10 (per-image mean) and Q11 (keep the diagonal) fixes."""
    x, (gh, gw) = ref.last_block_input(images)
    _, _, v = ref.qkv(x)
    v = v[:, :, 1:]
    e = vfm_features_ref(vfm, images)
    b, h, n, dh = v.shape
    hh, ww = e.shape[-2:]
    vm = v.reshape(b * h, gh, gw, dh).permute(0, 3, 1, 2)
    vm = F.interpolate(vm, size=(hh, ww), mode="bilinear", align_corners=False)
    vp = vm.flatten(2).transpose(1, 2).reshape(b, h, hh * ww, dh)
    en = e.flatten(2)
    en = en / en.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = en.transpose(1, 2) @ en
    mu = sim.mean(dim=(1, 2), keepdim=True) if mean == "image" else sim.mean()
    sp = gamma * (sim - beta * mu)
    off = ~torch.eye(hh * ww, dtype=torch.bool)
    sp = torch.where((sp < 0) & off, torch.full_like(sp, float("-inf")), sp)
    a = torch.softmax(sp, -1)[:, None]
    f = ref.head(ref.out_proj(a @ vp))
    return f.reshape(b, hh, ww, -1)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_proxyclip_formula_non_square(kind):
    model, vfm = MODELS[kind](), make_vfm()
    x = _images()  # 64×96: CLIP grid 4×6, VFM grid 8×12 (Q9: no swapped sides)
    got = dense(model, x, vfm, baseline="proxyclip", components=[])
    assert got.shape[1:3] == (8, 12)
    torch.testing.assert_close(got, proxy_reference(Ref(model, kind), vfm, x), **TOL)


def test_proxyclip_mean_per_image():
    model, vfm = make_tiny_clip(), make_vfm()
    x = torch.cat([_images(1, seed=1), 3.0 * _images(1, seed=2)])
    got = dense(model, x, vfm, baseline="proxyclip", components=[])
    ref = Ref(model, "open_clip")
    torch.testing.assert_close(got, proxy_reference(ref, vfm, x, mean="image"), **TOL)
    alone = dense(model, x[1:], vfm, baseline="proxyclip", components=[])
    torch.testing.assert_close(got[1:], alone, rtol=1e-5, atol=1e-6)
    # ProxyCLIP's batch-wide mean would give something else: the test sees the difference
    assert (got - proxy_reference(ref, vfm, x, mean="batch")).abs().max() > 1e-4


def test_proxyclip_all_negative_rows_keep_the_diagonal():
    model, vfm = make_tiny_clip(), make_vfm()
    x = _images(1)
    # β·mean(S) ≥ 1: every off-diagonal entry is masked; ProxyCLIP itself would return NaN (Q11)
    got = dense(model, x, vfm, baseline="proxyclip", components=[], proxy_beta=50.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, proxy_reference(Ref(model, "open_clip"), vfm, x, beta=50.0), **TOL)


def test_proxyclip_dinov2_registers():
    model, vfm = make_tiny_clip(), make_vfm(reg_tokens=4, img_size=32)
    x = _images(1, 32, 32)
    got = dense(model, x, vfm, baseline="proxyclip", components=[])
    assert got.shape[1:3] == (4, 4)
    torch.testing.assert_close(got, proxy_reference(Ref(model, "open_clip"), vfm, x), **TOL)


def test_proxyclip_vfm_input_uses_proxyclip_constants():
    model, vfm = make_tiny_clip(), make_vfm()
    x = 1.5 * _images()  # CLIP-normalised crops, values up to ~±6
    with torch.no_grad(), patch_clip(model, vfm, baseline="proxyclip", components=[]) as handle:
        runner = handle.baseline.vfm
        assert runner is handle.vfm
        got = runner.prepare(x, square=False)
        feats, grid = runner.features(x)
    assert got.dtype == torch.float32 and grid == (8, 12)
    want = vfm_input_ref(x, "proxyclip")
    exact = vfm_input_ref(x, "exact")
    assert (got.double() - want).abs().max() < 1e-6  # float32 rounding of values up to ~10
    # The rule the library used before (exact inverse of the 0–255 normalisation) is visibly different.
    assert (got.double() - exact).abs().max() > 1e-5
    assert (want - exact).abs().max() > 2e-5
    # The features ProxyCLIP's graph is built from come from that input (~3e-6 here; from the old input ~2e-5).
    torch.testing.assert_close(feats.double(), vfm_features_ref(vfm, x, "proxyclip"), rtol=0, atol=8e-6)


def test_cass_vfm_input_keeps_the_exact_inverse():
    model, vfm = make_tiny_clip(), make_vfm()
    x = 1.5 * _images()
    # A ProxyCLIP patch first: its rule must stay with its own runner, not leak into the VFM or later patches.
    with patch_clip(model, vfm, baseline="proxyclip", components=[]):
        pass
    with torch.no_grad(), patch_clip(model, vfm, baseline="naclip", components=["spectral"]) as handle:
        got = handle.spectral.vfm.prepare(x, square=False)
    assert (got.double() - vfm_input_ref(x, "exact")).abs().max() < 1e-6
    assert (got.double() - vfm_input_ref(x, "proxyclip")).abs().max() > 1e-5


def _no_hooks(*models: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for model in models for m in model.modules())


def test_proxyclip_refuses_sam_mae_and_missing_vfm():
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    model = make_tiny_clip()
    sam = VisionTransformerSAM(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, neck_chans=16)
    mae = make_vfm()
    mae.pretrained_cfg = {"architecture": "vit_base_patch16_224", "tag": "mae"}
    for vfm, word in ((sam, "SAM"), (mae, "MAE")):
        with pytest.raises(ValueError, match=word):
            patch_clip(model, vfm, baseline="proxyclip", components=[])
        assert _no_hooks(model, vfm) and get_patch(model) is None
    with pytest.raises(ValueError, match="needs a VFM"):
        patch_clip(model, None, baseline="proxyclip", components=[])


# ------------------------------------------------------------------------------------ patch / remove identity
BASELINES = ["vanilla", "maskclip", "sclip", "naclip", "clearclip", "proxyclip"]
SPECTRAL = {"vanilla", "sclip", "naclip", "clearclip"}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("baseline", BASELINES)
def test_patch_remove_bit_identity(kind, baseline):
    model, vfm = MODELS[kind](), make_tiny_vfm()
    native, crops = _images(2, 64, 64), _images(2, 64, 96)
    with torch.no_grad():
        emb0 = model.encode_image(native)
        dense0 = encode_dense(model, crops).features
        vfm0 = vfm(native)
        handle = patch_clip(model, vfm, baseline=baseline, components=["spectral"] if baseline in SPECTRAL else [])
        emb_patched = model.encode_image(native)  # the CLS row is the unmodified block's
        patched = encode_dense(model, crops).features
        handle.remove()
        emb1 = model.encode_image(native)
        dense1 = encode_dense(model, crops).features
        vfm1 = vfm(native)
    assert torch.equal(emb_patched, emb0)
    assert patched.shape != dense0.shape or not torch.allclose(patched, dense0)
    assert torch.equal(emb1, emb0) and torch.equal(dense1, dense0) and torch.equal(vfm1, vfm0)
    assert _no_hooks(model, vfm) and get_patch(model) is None


# ------------------------------------------------------------------------------------------- CASS composition
def test_naclip_with_all_cass_components_is_cass_official():
    model, vfm = make_tiny_clip(), make_tiny_vfm()
    x = _images()
    with torch.no_grad():
        with patch_clip(model, vfm, "cass-official", dataset="voc21") as h:
            official, cfg_official = encode_dense(model, x).features, h.config
        with patch_clip(model, vfm, dataset="voc21", baseline="naclip", components=["spectral", "ops", "ota"]) as h:
            composed, cfg_composed = encode_dense(model, x).features, h.config
    assert cfg_composed == cfg_official
    assert torch.equal(composed, official)


class Capture:
    """Keeps the graphs after every refinement (runs last)."""

    @hookimpl(trylast=True)
    def cass_refine_graphs(self, ctx) -> None:
        self.graphs = [g.clone() for g in ctx.graphs]
        self.record = ctx.record


def _graphs(model, vfm, x, **kw) -> Capture:
    cap = Capture()
    with torch.no_grad(), patch_clip(model, vfm, plugins=[cap], components=["spectral"], **kw):
        encode_dense(model, x)
    return cap


def test_sclip_spectral_fuses_q_and_k_graphs_separately():
    model, vfm = make_tiny_clip(), make_tiny_vfm()
    x = _images()
    sclip = _graphs(model, vfm, x, baseline="sclip")
    clear = _graphs(model, vfm, x, baseline="clearclip")  # q-q graph distilled against q
    kk = _graphs(model, vfm, x, baseline="naclip", attn="kk")  # k-k graph distilled against k
    assert torch.equal(sclip.graphs[0], clear.graphs[0])
    assert torch.equal(sclip.graphs[1], kk.graphs[0])
    assert len(sclip.record["matching_per_source"]) == 2


def test_clearclip_spectral_is_distilled_against_queries():
    """ClearCLIP's q-q graph + spectral == NACLIP's k-k graph + spectral on a model whose keys are its queries."""
    model, vfm = make_tiny_clip(), make_tiny_vfm()
    twin = copy.deepcopy(model)
    attn = twin.visual.transformer.resblocks[-1].attn
    d = attn.embed_dim
    with torch.no_grad():
        attn.in_proj_weight[d:2 * d] = attn.in_proj_weight[:d]
        attn.in_proj_bias[d:2 * d] = attn.in_proj_bias[:d]
    x = _images()
    clear = _graphs(model, vfm, x, baseline="clearclip")
    kk = _graphs(twin, vfm, x, baseline="naclip", attn="kk")
    assert torch.equal(clear.graphs[0], kk.graphs[0])
    torch.testing.assert_close(clear.record["matching"][0].cost, kk.record["matching"][0].cost, rtol=0, atol=0)


@pytest.mark.parametrize("baseline,attn", [("maskclip", None), ("proxyclip", None), ("naclip", "nonly"),
                                           ("clearclip", "identity"), ("vanilla", "identity")])
def test_spectral_refused_clearly_and_leaves_no_hooks(baseline, attn):
    model, vfm = make_tiny_clip(), make_tiny_vfm()
    kw = {"attn": attn} if attn else {}
    with pytest.raises(ValueError, match="spectral distillation|no attention graph"):
        patch_clip(model, vfm, baseline=baseline, components=["spectral"], **kw)
    assert _no_hooks(model, vfm) and get_patch(model) is None


# ------------------------------------------------------------------------------------------ rules and presets
@pytest.mark.parametrize("overrides,match", [
    ({"attn": "csa", "arch": "reduced"}, "arch='vanilla'"),
    ({"attn": "naclip", "gaussian_std": None}, "gaussian_std > 0"),
    ({"attn": "nonly", "gaussian_std": 0.0}, r"naclip\.gaussian_std=0\.0: must lie in \(0, inf\)"),
    ({"attn": "qq"}, "choose one of"),
])
def test_naclip_rules(overrides, match):
    with pytest.raises(ValueError, match=match):
        patch_clip(make_tiny_clip(), baseline="naclip", components=[], **overrides)


def test_other_rules():
    model = make_tiny_clip()
    with pytest.raises(ValueError, match="last_n_layers"):
        patch_clip(model, baseline="clearclip", components=[], last_n_layers=2)
    with pytest.raises(ValueError, match="choose one of"):
        patch_clip(model, baseline="sclip", components=[], attn="kk")
    with pytest.raises(ValueError, match="choose one of"):
        patch_clip(model, make_vfm(), baseline="proxyclip", components=[], arch="vanilla")
    assert get_patch(model) is None


def test_cass_paper_is_naclip_key_key_without_window():
    cfg = resolve_config("cass-paper")
    assert (cfg.baseline, cfg.attn, cfg.gaussian_std) == ("naclip", "kk", None)
    model = make_tiny_clip()
    x = _images()
    got = dense(model, x, preset="cass-paper", spectral=False)
    torch.testing.assert_close(got, reference(Ref(model, "open_clip"), x, "kk", "reduced", include_cls=False), **TOL)


def test_baseline_presets_follow_the_spec_tables():
    # baselines.md §3, literal values
    sclip = resolve_config("sclip", "voc21")
    assert (sclip.logit_scale, sclip.prob_thd, sclip.area_thd, sclip.short_side) == (65.0, 0.1, 0.1, 336)
    assert resolve_config("sclip", "coco_stuff164k").short_side == 448
    nac = resolve_config("naclip", "voc20")
    assert (nac.mode, nac.pamr_steps, nac.pamr_dilations, nac.logit_scale) == ("whole", 10, (8, 16), 40.0)
    assert resolve_config("naclip", "coco_stuff164k").short_side == 336
    clear = resolve_config("clearclip", "cityscapes")
    assert (clear.attn, clear.arch, clear.logit_scale, clear.crop, clear.stride, clear.short_side) == \
        ("qq", "reduced", 50.0, 224, 224, 448)
    assert resolve_config("clearclip-shipped").attn == "vanilla"
    assert resolve_config("clearclip", "voc21").prob_thd == 0.5
    prox = resolve_config("proxyclip", "cityscapes")
    assert (prox.crop, prox.stride, prox.short_side, prox.class_files) == (224, 112, 448, "proxyclip")
    assert resolve_config("proxyclip", "ade20k").short_side == 448
    assert resolve_config("maskclip-original").arch == "vanilla"
    for name in ("sclip", "naclip", "clearclip", "clearclip-shipped", "proxyclip", "vanilla", "maskclip",
                 "maskclip-original"):
        cfg = resolve_config(name)
        assert not (cfg.spectral or cfg.presence_prior or cfg.ota), name
        assert cfg.baseline in BASELINES


# ------------------------------------------------------------------------------------------ end to end (Segmenter)
COMBOS = [  # every baseline with every CASS component it supports
    ("naclip", ["spectral", "ops", "ota"]),
    ("sclip", ["spectral", "ops", "ota"]),
    ("clearclip", ["spectral", "ops", "ota"]),
    ("vanilla", ["spectral", "ops", "ota"]),
    ("maskclip", ["ops", "ota"]),
    ("proxyclip", ["ops", "ota"]),
]


def _segment_all(model, vfm, image, **kw) -> dict[str, object]:
    from cass_plugins.pipeline.segmenter import Segmenter

    out = {}
    for baseline, components in COMBOS:
        with Segmenter(model, vfm, vocabulary="cat; grass; wall, floor", baseline=baseline, components=components,
                       **kw) as seg:
            out[baseline] = (seg.segment(image), seg.config)
    return out


def _check_results(results, shape) -> None:
    for baseline, (result, cfg) in results.items():
        assert cfg.baseline == baseline and cfg.presence_prior and cfg.ota
        assert tuple(result.labels.shape) == shape and torch.isfinite(result.probs).all(), baseline
        assert bool(result.record["matching"]) == cfg.spectral, baseline


def test_every_baseline_with_cass_components_through_segmenter():
    from skimage import data

    image = data.chelsea()[::4, ::4].copy()  # a real photo, 75×113
    results = _segment_all(make_tiny_clip(), make_tiny_vfm(), image, short_side=64, crop=64, stride=32)
    _check_results(results, image.shape[:2])


@pytest.mark.slow
def test_full_size_random_models_every_baseline_on_a_photo(monkeypatch):
    """ViT-B/16 + DINO-B/8-shaped random models, every baseline with its CASS components, on a real photo."""
    import functools

    import open_clip
    import timm
    from skimage import data

    import cass_plugins.pipeline.segmenter as segmenter_module

    # One template: the full-size text tower on 80 templates is minutes on a CPU and not what this test is about.
    monkeypatch.setattr(segmenter_module, "encode_text",
                        functools.partial(segmenter_module.encode_text, templates=("a photo of a {}.",)))
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    vfm = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0).eval()
    image = data.chelsea()  # 300×451
    # small windows keep the 12-layer models (B/8 at 784 tokens per 224 window) affordable on a 2-core CPU
    results = _segment_all(clip, vfm, image, short_side=112, crop=112, stride=112)  # 112×168: two windows
    _check_results(results, image.shape[:2])


def test_foreign_repo_example_runs(capsys):
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "foreign_repo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "repo features == encode_dense features: True" in out
    assert "bit-identical to the original model: True" in out


# ------------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("baseline", BASELINES)
def test_adapter_on_cuda_matches_cpu_and_runs_in_half_precision(baseline):
    model, vfm = make_tiny_clip(), make_vfm()
    x = _images()
    kw = dict(baseline=baseline, components=[])
    if baseline in SPECTRAL:  # a fixed assignment and exact low rank: no tie can flip between devices
        kw.update(components=["spectral"], matching=[0, 1, 2, 3], lowrank="exact")
    cpu = dense(model, x, vfm, **kw)
    model, vfm = model.cuda(), vfm.cuda()
    gpu = dense(model, x.cuda(), vfm, **kw).cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-3, rtol=2e-3)
    model, vfm = model.half(), vfm.half()
    half = dense(model, x.cuda().half(), vfm, **kw).cpu()
    assert torch.isfinite(half).all()
    assert F.cosine_similarity(half, cpu, dim=-1).min() > 0.97
    assert _no_hooks(model, vfm)


@pytest.mark.cuda
def test_full_size_fp16_every_baseline_with_cass_components_on_cuda(monkeypatch):
    import functools

    import open_clip
    import timm
    from skimage import data

    import cass_plugins.pipeline.segmenter as segmenter_module

    monkeypatch.setattr(segmenter_module, "encode_text",
                        functools.partial(segmenter_module.encode_text, templates=("a photo of a {}.",)))
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None).eval().cuda().half()
    vfm = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0).eval().cuda().half()
    image = data.chelsea()
    results = _segment_all(clip, vfm, image)  # CASS protocol: short side 336, 224/112 windows
    _check_results(results, image.shape[:2])
