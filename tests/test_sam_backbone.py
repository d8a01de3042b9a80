"""SAM backbone for Trident (cass_plugins/backbone/sam.py; docs/spec/trident.md §5.1, §5.2, §10, §14 items 1, 6).

References are written here from the spec: a float64 recomputation of the last block's attention (decomposed
rel-pos by explicit index arithmetic), reshape-and-slice crops, PIL's own bilinear resize, a float64 restatement of
cv2's INTER_LINEAR, and Meta's ``sam_model_registry`` / timm's ``samvit_*`` as the architecture references.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cass_plugins.backbone import sam as sam_mod
from cass_plugins.backbone.loading import CheckpointError, WeightsUnavailableError
from cass_plugins.backbone.sam import (
    SAM_CONFIGS, SAM_PIXEL_MEAN, SAM_PIXEL_STD, SamBackbone, build_sam, load_sam, round_up_image, sam_input_geometry,
    sam_preprocess,
)
from tiny_sam import make_tiny_sam, random_image, save_tiny_sam_checkpoint, tiny_sam_state_dict

pytest.importorskip("segment_anything")


# ------------------------------------------------------------------------------------------------ references
def _reference_attention(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention (heads, N, N) and values (heads, N, d) of a SAM attention module from its input 1×H×W×C.

    Straight from spec §5.2 / §10: softmax_j(q_i·d^-0.5·k_j + q_i·Rh[y_i − y_j + H − 1] + q_i·Rw[x_i − x_j + W − 1]).
    """
    _, gh, gw, c = x.shape
    heads = attn.num_heads
    d = c // heads
    tokens = x.reshape(gh * gw, c).double()
    qkv = tokens @ attn.qkv.weight.double().T + attn.qkv.bias.double()
    q = qkv[:, :c].reshape(-1, heads, d).transpose(0, 1)
    k = qkv[:, c:2 * c].reshape(-1, heads, d).transpose(0, 1)
    v = qkv[:, 2 * c:].reshape(-1, heads, d).transpose(0, 1)
    ys = torch.arange(gh).repeat_interleave(gw)  # row-major token → (row, col)
    xs = torch.arange(gw).repeat(gh)
    rh = attn.rel_pos_h.double()[ys[:, None] - ys[None, :] + gh - 1]  # (N, N, d)
    rw = attn.rel_pos_w.double()[xs[:, None] - xs[None, :] + gw - 1]
    logits = (q * d ** -0.5) @ k.transpose(1, 2)
    logits = logits + torch.einsum("hid,ijd->hij", q, rh) + torch.einsum("hid,ijd->hij", q, rw)
    return logits.softmax(-1), v


def _crop(full: torch.Tensor, full_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(heads, N, N) → (heads, M, M) by reshape-and-slice on both axes."""
    gh, gw = full_grid
    h, w = grid
    heads = full.shape[0]
    return full.reshape(heads, gh, gw, gh, gw)[:, :h, :w, :h, :w].reshape(heads, h * w, h * w)


def _capture(backbone: SamBackbone) -> dict[str, list[torch.Tensor]]:
    """The test's own hook on blocks[-1].attn: its inputs and outputs during the next encode."""
    record: dict[str, list[torch.Tensor]] = {"x": [], "out": []}

    def hook(module, args, output):
        record["x"].append(args[0].detach().clone())
        record["out"].append(output.detach().clone())

    record["handle"] = backbone.encoder.blocks[-1].attn.register_forward_hook(hook)
    return record


def _cv2_linear_float64(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) restated in float64: half-pixel centres, edge clamping, round half up."""
    h, w = img.shape[:2]
    oh, ow = size

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, None)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = axis(h, oh)
    x0, x1, fx = axis(w, ow)
    f = img.astype(np.float64)
    top = f[y0][:, x0] * (1 - fx)[None, :, None] + f[y0][:, x1] * fx[None, :, None]
    bottom = f[y1][:, x0] * (1 - fx)[None, :, None] + f[y1][:, x1] * fx[None, :, None]
    out = top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize(
    "hw, round_to, halves, rounded, inputs, grids",
    [
        ((375, 500), 16, False, (384, 512), [(768, 1024)], [(48, 64)]),          # VOC 500×375 (W×H), §14 item 6
        ((512, 683), 16, False, (512, 688), [(762, 1024)], [(47, 64)]),          # ADE 683×512, §5.1 step 4
        ((1024, 2048), 16, True, (1024, 2048), [(1024, 1024)] * 2, [(64, 64)] * 2),  # Cityscapes halves
        ((500, 375), 16, False, (512, 384), [(1024, 768)], [(64, 48)]),          # portrait: rows and columns swap
        ((375, 500), 14, False, (378, 504), [(768, 1024)], [(48, 64)]),          # H/14 rounds to 14 (§12 answer 18)
        ((1024, 1376), 16, True, (1024, 1376), [(1024, 688)] * 2, [(64, 43)] * 2),
        ((30, 101), 1, True, (30, 101), [(307, 512), (301, 512)], [(19, 32), (18, 32)]),  # 50 | 51: 30·512/50 = 307.2
    ],
)
def test_sam_input_geometry_table(hw, round_to, halves, rounded, inputs, grids):
    img_size = 512 if round_to == 1 else 1024
    g = sam_input_geometry(*hw, round_to=round_to, img_size=img_size, split_halves=halves)
    assert g.rounded_size == rounded
    assert list(g.input_sizes) == inputs
    assert list(g.grids) == grids


def test_sam_input_geometry_odd_halves_sizes():
    g = sam_input_geometry(30, 101, round_to=1, img_size=512, split_halves=True)
    assert g.part_sizes == ((30, 50), (30, 51))  # split at w // 2 = 50; the right half takes the odd column


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(height=0, width=10, round_to=16), "height must be a positive integer"),
    (dict(height=10, width=10, round_to=0), "round_to must be a positive integer"),
    (dict(height=10, width=10, round_to=2.5), "round_to must be a positive integer"),
    (dict(height=1, width=5000, round_to=1, img_size=1024), "too elongated"),
])
def test_sam_input_geometry_refuses_bad_input(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        sam_input_geometry(**kwargs)


def test_round_up_image_matches_cv2_linear_restatement():
    img = random_image(37, 53, seed=3)
    chw = torch.from_numpy(img).permute(2, 0, 1)
    out = round_up_image(chw, 16).permute(1, 2, 0).numpy()
    assert out.shape == (48, 64, 3)
    ref = _cv2_linear_float64(img, (48, 64))
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # float32 vs float64 at exact .5 ties only
    same = chw[:, :32, :48]
    assert round_up_image(same, 16) is same  # already multiples: untouched (cv2 at scale 1 is the identity)


# ------------------------------------------------------------------------------------------------ input
def test_encoder_input_same_for_both_backends_and_pil_reference():
    img = random_image(70, 100, seed=1)
    seen: list[torch.Tensor] = []
    for backend in ("segment_anything", "timm"):
        b = make_tiny_sam(0, backend)
        handle = b.encoder.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        try:
            b.encode(img, round_to=16)
        finally:
            handle.remove()
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)
    rounded = round_up_image(torch.from_numpy(img).permute(2, 0, 1), 16).permute(1, 2, 0).numpy()
    mine, size = sam_preprocess(np.ascontiguousarray(rounded), 256)
    assert size == (183, 256)
    torch.testing.assert_close(seen[0], mine, rtol=0, atol=0)
    # independent: PIL bilinear straight, SAM normalisation in float64, zero padding bottom/right
    pil = np.asarray(Image.fromarray(rounded).resize((256, 183), Image.BILINEAR)).astype(np.float64)
    ref = (pil - np.array(SAM_PIXEL_MEAN)) / np.array(SAM_PIXEL_STD)
    ref = np.pad(ref, ((0, 256 - 183), (0, 0), (0, 0)))
    np.testing.assert_allclose(mine[0].permute(1, 2, 0).double().numpy(), ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------ capture
@pytest.mark.parametrize("backend", ["segment_anything", "timm"])
def test_recomputed_attention_times_values_gives_module_output(backend):
    b = make_tiny_sam(2, backend)
    record = _capture(b)
    try:
        enc = b.encode(random_image(64, 64, seed=4), round_to=16)  # square: the valid grid is the full 16×16 grid
    finally:
        record["handle"].remove()
    part = enc.parts[0]
    assert part.grid == part.full_grid == (16, 16)
    attn = b.encoder.blocks[-1].attn
    heads_out = torch.einsum("hij,hjd->ihd", part.attention(), part.values)  # (N, heads, d)
    out = attn.proj(heads_out.reshape(1, 16, 16, -1))
    tol = 1e-6 if backend == "segment_anything" else 1e-5  # timm runs fused SDPA, not the same kernel
    torch.testing.assert_close(out, record["out"][0], rtol=0, atol=tol)
    torch.testing.assert_close(part.attention().sum(-1), torch.ones(4, 256), rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw, grid", [((70, 100), (11, 16)), ((100, 60), (16, 9))])
def test_cropped_attention_and_values_match_float64_reference(hw, grid):
    b = make_tiny_sam(5, "segment_anything")
    attn = b.encoder.blocks[-1].attn
    assert attn.rel_pos_h.abs().max() > 0.1 and attn.rel_pos_w.abs().max() > 0.1  # re-randomised: the test can fail
    record = _capture(b)
    try:
        enc = b.encode(random_image(*hw, seed=6), round_to=16)
    finally:
        record["handle"].remove()
    part = enc.parts[0]
    assert part.grid == grid
    full, v = _reference_attention(attn, record["x"][0])
    torch.testing.assert_close(full.sum(-1), torch.ones_like(full.sum(-1)), rtol=0, atol=1e-12)
    ref = _crop(full, (16, 16), grid)
    got = part.attention()
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)
    for h in range(part.num_heads):
        torch.testing.assert_close(part.head(h), got[h], rtol=0, atol=0)
    rows = got.sum(-1)
    assert (rows < 1 - 1e-3).all()  # padding keys dropped: rows no longer sum to 1 (§5.2)
    ref_v = v.reshape(4, 16, 16, -1)[:, :grid[0], :grid[1]].reshape(4, grid[0] * grid[1], -1)
    torch.testing.assert_close(part.values.double(), ref_v, rtol=0, atol=1e-5)
    # without rel-pos the reference would differ: the positional terms are exercised
    saved = attn.rel_pos_h.detach().clone(), attn.rel_pos_w.detach().clone()
    with torch.no_grad():
        attn.rel_pos_h.zero_()
        attn.rel_pos_w.zero_()
        plain = _crop(_reference_attention(attn, record["x"][0])[0], (16, 16), grid)
        attn.rel_pos_h.copy_(saved[0])
        attn.rel_pos_w.copy_(saved[1])
    assert (plain - ref).abs().max() > 1e-3


def test_head_index_checked():
    part = make_tiny_sam(0, "timm").encode(random_image(32, 32), round_to=16).parts[0]
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        part.head(4)


@pytest.mark.parametrize("backend", ["segment_anything", "timm"])
def test_hook_removed_after_pass_and_after_failure(backend, monkeypatch):
    b = make_tiny_sam(0, backend)
    attn = b.encoder.blocks[-1].attn
    b.encode(random_image(40, 40), round_to=16)
    assert len(attn._forward_hooks) == 0

    def boom(*args, **kwargs):
        raise RuntimeError("encoder failed")

    monkeypatch.setattr(b.encoder.blocks[-1].mlp, "forward", boom)
    with pytest.raises(RuntimeError, match="encoder failed"):
        b.encode(random_image(40, 40), round_to=16)
    assert len(attn._forward_hooks) == 0


def test_both_backends_agree_on_a_saved_meta_checkpoint(tmp_path):
    path = save_tiny_sam_checkpoint(tmp_path / "sam_tiny.pth", seed=7)
    sa = load_sam("test", path, backend="segment_anything")
    tm = load_sam("test", path, backend="timm")
    assert (sa.backend, tm.backend) == ("segment_anything", "timm")
    img = random_image(70, 100, seed=8)
    for halves in (False, True):
        a = sa.encode(img, round_to=16, split_halves=halves)
        b = tm.encode(img, round_to=16, split_halves=halves)
        assert len(a.parts) == len(b.parts) == (2 if halves else 1)
        for pa, pb in zip(a.parts, b.parts):
            assert pa.grid == pb.grid
            # 1e-6: spec §14 item 1 (the issue asks ≤ 1e-5; measured 1.5e-7, values 7e-7)
            torch.testing.assert_close(pa.attention(), pb.attention(), rtol=0, atol=1e-6)
            torch.testing.assert_close(pa.values, pb.values, rtol=0, atol=1e-4)
    # and both equal the weights in the file (the loader did not silently keep random weights)
    state = tiny_sam_state_dict(seed=7)
    torch.testing.assert_close(sa.encoder.blocks[-1].attn.rel_pos_h, state["image_encoder.blocks.1.attn.rel_pos_h"])
    torch.testing.assert_close(tm.encoder.blocks[0].mlp.fc1.weight, state["image_encoder.blocks.0.mlp.lin1.weight"])


def test_timm_layout_file_loads_into_timm_backend(tmp_path):
    tm = make_tiny_sam(3, "timm")
    path = tmp_path / "timm_sam.pth"
    torch.save(tm.model.state_dict(), path)
    loaded = load_sam("test", path, backend="timm")
    torch.testing.assert_close(loaded.encoder.blocks[1].attn.rel_pos_w, tm.encoder.blocks[1].attn.rel_pos_w)
    with pytest.raises(CheckpointError, match="backend='timm'"):
        load_sam("test", path, backend="segment_anything")


# ------------------------------------------------------------------------------------------------ halves, refine
def test_halves_are_the_separate_encodings_of_each_half():
    b = make_tiny_sam(4, "segment_anything")
    img = random_image(40, 100, seed=9)
    enc = b.encode(img, round_to=16, split_halves=True, keep_for_refine=True)
    assert enc.rounded_size == (48, 112) and enc.original_size == (40, 100)
    geometry = sam_input_geometry(40, 100, round_to=16, img_size=256, split_halves=True)
    assert [p.grid for p in enc.parts] == list(geometry.grids) == [(13, 16), (13, 16)]
    rounded = round_up_image(torch.from_numpy(img).permute(2, 0, 1), 16)
    for part, half in zip(enc.parts, (rounded[:, :, :56], rounded[:, :, 56:])):
        alone = b.encode(half.contiguous(), round_to=1).parts[0]  # round_to=1: no second rounding
        torch.testing.assert_close(part.attention(), alone.attention(), rtol=0, atol=0)
        torch.testing.assert_close(part.values, alone.values, rtol=0, atol=0)
    # left and right differ (the halves are not the same part twice)
    assert (enc.parts[0].values - enc.parts[1].values).abs().max() > 1e-3
    # the predictor holds the full rounded image (§5.1 step 5, T-Q14)
    assert enc.predictor.original_size == (48, 112)
    assert enc.predictor.input_size == sam_input_geometry(48, 112, round_to=1, img_size=256).input_sizes[0]


def test_predictor_kept_for_refinement_runs_the_decoder():
    b = make_tiny_sam(0, "segment_anything")
    enc = b.encode(torch.from_numpy(random_image(70, 100)).permute(2, 0, 1), round_to=16, keep_for_refine=True)
    pred = enc.predictor
    assert pred.original_size == (80, 112) and pred.features.shape == (1, 32, 16, 16)
    masks, _, low = pred.predict_torch(
        torch.tensor([[[50.0, 40.0]]]), torch.ones(1, 1), multimask_output=False)
    assert masks.shape == (1, 1, 80, 112) and low.shape == (1, 1, 64, 64)
    assert b.encode(random_image(70, 100), round_to=16).predictor is None


def test_refinement_refused_on_timm():
    b = make_tiny_sam(0, "timm")
    assert not b.can_refine
    with pytest.raises(ValueError, match='backend="segment_anything"') as err:
        b.encode(random_image(40, 40), round_to=16, keep_for_refine=True)
    assert "cass_plugins[sam]" in str(err.value)


def test_backbone_attributes():
    for backend in ("segment_anything", "timm"):
        b = make_tiny_sam(0, backend)
        assert (b.kind, b.backend, b.patch_size, b.img_size, b.num_heads, b.head_dim) == (
            "test", backend, 16, 256, 4, 16)
        assert b.can_refine == (backend == "segment_anything")
        assert b.dtype == torch.float32 and b.device.type == "cpu"
    with pytest.raises(TypeError, match="load_sam"):
        SamBackbone(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("image, err, fragment", [
    (np.zeros((10, 10, 3), np.float32), TypeError, "uint8"),
    (torch.zeros(10, 10, 3, dtype=torch.uint8), ValueError, r"\(3, H, W\)"),
    (np.zeros((10, 10), np.uint8), ValueError, r"\(H, W, 3\)"),
    ([[0]], TypeError, "uint8"),
])
def test_encode_refuses_bad_images(image, err, fragment):
    with pytest.raises(err, match=fragment):
        make_tiny_sam(0, "timm").encode(image, round_to=16)


# ------------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_encoder_float32_capture_and_fp32_decoder(tmp_path, precision, dtype):
    path = save_tiny_sam_checkpoint(tmp_path / "sam_tiny.pth", seed=1)
    full = load_sam("test", path).encode(random_image(64, 64), round_to=16, keep_for_refine=True)
    half = load_sam("test", path, precision=precision)
    assert half.dtype == dtype and half.model.pixel_mean.dtype == dtype  # normalisation in the encoder's dtype
    assert {p.dtype for p in half.model.mask_decoder.parameters()} == {torch.float32}
    assert {p.dtype for p in half.model.prompt_encoder.parameters()} == {torch.float32}
    enc = half.encode(random_image(64, 64), round_to=16, keep_for_refine=True)
    part = enc.parts[0]
    assert part.values.dtype == part.head(0).dtype == enc.predictor.features.dtype == torch.float32
    # half precision: close to the fp32 encoding (measured 1e-3 of the scale for fp16, 8e-3 for bf16), not equal
    ref = full.parts[0].values
    assert (part.values - ref).abs().max() < 0.1 * ref.abs().max()


def test_vit_h_fp16_refused_before_loading(monkeypatch):
    monkeypatch.setattr(sam_mod, "build_sam", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match="precision='fp32'"):
        load_sam("vit_h", "random", precision="fp16")


# ------------------------------------------------------------------------------------------------ architectures
@pytest.mark.parametrize("kind", ["vit_b", "vit_l", "vit_h"])
def test_configs_match_meta_and_timm_architectures(kind):
    import timm
    from segment_anything import sam_model_registry
    from timm.models.vision_transformer_sam import checkpoint_filter_fn

    cfg = SAM_CONFIGS[kind]
    with torch.device("meta"):  # shapes only: no memory, no init cost
        meta = sam_model_registry[kind]()
        ours = build_sam(kind)
        tm = build_sam(kind, "timm")
        ref_timm = timm.create_model(cfg["timm_name"], pretrained=False, num_classes=0)
    def shapes(m: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}

    assert shapes(ours) == shapes(meta)
    assert shapes(tm) == shapes(ref_timm)
    filtered = {k: tuple(v.shape) for k, v in checkpoint_filter_fn(meta.state_dict(), tm).items()}
    assert filtered == shapes(tm)
    windows = [blk.window_size for blk in meta.image_encoder.blocks]
    assert tuple(i for i, w in enumerate(windows) if w == 0) == cfg["global_attn_indexes"]
    assert windows[-1] == 0  # the captured block is global (§5.2)
    assert cfg["url"].endswith(cfg["checkpoint"]) and cfg["url"].startswith("https://dl.fbaipublicfiles.com/")
    assert tm.blocks[0].norm1.eps == meta.image_encoder.blocks[0].norm1.eps == 1e-6


def test_tiny_config_low_res_mask_is_four_times_the_grid():
    model = build_sam("test")
    assert tuple(model.prompt_encoder.mask_input_size) == (64, 64)
    assert model.image_encoder.img_size == 256


# ------------------------------------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found.*'random'"):
        load_sam("test", tmp_path / "nope.pth")


def test_truncated_file(tmp_path):
    path = save_tiny_sam_checkpoint(tmp_path / "sam.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_sam("test", path)


def test_clip_file_named(tmp_path):
    from conftest import make_tiny_clip

    path = tmp_path / "clip.pth"
    torch.save(make_tiny_clip().state_dict(), path)
    with pytest.raises(CheckpointError, match="CLIP checkpoint.*--pretrained.*--sam-weights"):
        load_sam("test", path)


def test_dino_file_named(tmp_path):
    from conftest import make_tiny_vfm

    path = tmp_path / "dino.pth"
    torch.save(make_tiny_vfm().state_dict(), path)
    with pytest.raises(CheckpointError, match="timm/DINO ViT.*--vfm-weights"):
        load_sam("test", path, backend="timm")


def test_unrelated_file(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a SAM checkpoint.*sam_vit_b_01ec64.pth"):
        load_sam("vit_b", path)


def test_kind_mismatch_named_before_building(tmp_path, monkeypatch):
    # a file shaped like SAM ViT-L (width 1024, 24 blocks): only the keys the detection reads
    fake = {"image_encoder.patch_embed.proj.weight": torch.zeros(1024, 3, 1, 1)}
    fake.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(24)})
    path = tmp_path / "sam_vit_l.pth"
    torch.save(fake, path)
    monkeypatch.setattr(sam_mod, "build_sam", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(CheckpointError, match=r"SAM ViT-L checkpoint.*--sam vit_l"):
        load_sam("vit_b", path)
    tiny = save_tiny_sam_checkpoint(tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match=r"does not fit --sam vit_h.*tiny test SAM.*--sam test"):
        load_sam("vit_h", tiny)


def test_strict_load_names_missing_keys(tmp_path):
    state = {k: v for k, v in tiny_sam_state_dict().items() if not k.startswith("mask_decoder.")}
    path = tmp_path / "encoder_only_meta.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing.*mask_decoder"):
        load_sam("test", path)
    assert load_sam("test", path, backend="timm").backend == "timm"  # the timm filter drops the decoder keys


def test_none_checkpoint_offline(monkeypatch):
    with pytest.raises(WeightsUnavailableError, match="sam_vit_b_01ec64.pth.*--sam-weights FILE") as err:
        load_sam("vit_b", None)
    assert "checkpoint=FILE" in str(err.value)
    monkeypatch.setattr(sam_mod._loading, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(sam_mod, "build_sam", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(WeightsUnavailableError, match="unreachable.*dl.fbaipublicfiles.com.*sam_vit_l_0b3195.pth"):
        load_sam("vit_l", None, backend="timm")
    with pytest.raises(WeightsUnavailableError, match="'random'"):
        load_sam("test", None)


def test_segment_anything_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # makes `import segment_anything` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "cass_plugins\[sam\]".*backend="timm"'):
        load_sam("test", "random")
    with pytest.raises(ImportError, match="cass_plugins"):
        build_sam("test")
    assert load_sam("test", "random", backend="timm").backend == "timm"


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(kind="vit_x"), "unknown SAM kind 'vit_x'"),
    (dict(kind="test", backend="hf"), "unknown SAM backend 'hf'"),
    (dict(kind="test", precision="fp8"), "precision='fp8'"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_sam(checkpoint="random", **kwargs)
