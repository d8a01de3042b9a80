"""Trident's splice mode and SAM aggregation (docs/spec/trident.md §2–§7, §13, §14 items 2–7).

References are written here from the spec's formulas in float64; SAM is a stub exposing constructed values and
attention, so thresholds and masks are known exactly.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cass_plugins import Segmenter
from cass_plugins.adapters.proxyclip import proxy_graph
from cass_plugins.core.config import resolve_config
from cass_plugins.core.settings import SettingError
from cass_plugins.pipeline.windows import SlidingWindowAccumulator, window_grid
from cass_plugins.trident.affinity import aggregate, row_thresholds, sam_affinity
from cass_plugins.trident.splice import align_to_clip_grid, clip_input_size, splice_windows
from conftest import make_tiny_clip, make_tiny_vfm


# ----------------------------------------------------------------------------------------------- stub SAM
class StubPart:
    """A SAM part with given per-head values ``(h, M, d)`` and attention ``(h, M, M)`` on grid ``(gh, gw)``."""

    def __init__(self, values: torch.Tensor, attention: torch.Tensor, grid: tuple[int, int]) -> None:
        self.values, self._attention, self.grid = values, attention, grid
        self.num_heads = values.shape[0]
        self.head_calls = 0

    def head(self, index: int) -> torch.Tensor:
        self.head_calls += 1
        return self._attention[index]


class StubEncoding:
    def __init__(self, parts, predictor=None) -> None:
        self.parts, self.predictor = parts, predictor


class StubSam:
    """Encodes every image to the same parts; counts encoder passes."""

    can_refine = False

    def __init__(self, parts) -> None:
        self.parts, self.calls, self.options = parts, 0, []

    def encode(self, image, **options):
        self.calls += 1
        self.options.append(options)
        return StubEncoding(self.parts)


def random_part(heads: int, grid: tuple[int, int], dim: int, seed: int, dtype=torch.float64) -> StubPart:
    g = torch.Generator().manual_seed(seed)
    m = grid[0] * grid[1]
    values = torch.randn(heads, m, dim, generator=g, dtype=dtype)
    attention = torch.softmax(torch.randn(heads, m, m, generator=g, dtype=dtype) * 2, dim=-1)
    # drop a few keys as the padding crop does: rows no longer sum to 1 (§5.2)
    attention = attention * (torch.rand(heads, m, m, generator=g, dtype=dtype) > 0.1)
    return StubPart(values, attention, grid)


def reference_affinity(values, attention, cos_fac, neg_fallback=None, cap=0.9):
    """§5.3 straight from the spec, all heads at once, float64."""
    v = values.double()
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    c = v @ v.transpose(1, 2)  # (h, M, M)
    eps = cos_fac * c.mean(dim=(0, 2))  # mean over heads and keys, per query row
    if neg_fallback is not None:
        eps = torch.where(eps < 0, torch.full_like(eps, neg_fallback), eps)
    eps = torch.minimum(eps, torch.full_like(eps, cap))
    masked = attention.double() * (c > eps[None, :, None])
    mean = masked.mean(dim=0)
    return mean / mean.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------- geometry (§14.6)
@pytest.mark.parametrize(
    "resized, crop, stride, expected, grid, n_windows",
    [
        ((448, 597), 336, 224, (464, 608), (29, 38), 6),  # VOC 500×375 at S=448
        ((336, 448), 336, 112, (336, 448), (21, 28), 2),  # VOC20 at S=336, stride 112
        ((576, 768), 336, 224, (576, 768), (36, 48), 9),  # Context at S=576: unchanged
        ((688, 1376), 336, 224, (688, 1376), (43, 86), 18),  # Cityscapes 2048×1024 at S=688
    ],
)
def test_clip_input_size_matches_the_spec_table(resized, crop, stride, expected, grid, n_windows):
    size = clip_input_size(*resized, patch=16, crop=crop)
    assert size == expected
    assert (size[0] // 16, size[1] // 16) == grid
    assert len(window_grid(*size, crop, stride)) == n_windows


def test_clip_input_size_raises_sides_to_the_crop_and_rounds_with_the_long_side():
    assert clip_input_size(320, 480, 16, 336) == (336, 480)  # T-Q7 fixed: already multiples, one side < crop
    # long side 597 → 608 (×608/597), short side int(300·608/597) = 305 → 320 → raised to the crop
    assert clip_input_size(300, 597, 16, 224) == (320, 608)
    assert clip_input_size(597, 300, 16, 224) == (608, 320)  # transposed input, transposed answer


def test_clip_input_size_hand_worked_patch_14():
    # L = 401, L' = 406 (29·14); h' = int(400·406/401) = int(404.98) = 404 → rounded up to 406; w' = 406
    assert clip_input_size(400, 401, 14, 336) == (406, 406)


# ----------------------------------------------------------------------------------------------- affinity (§14.2)
@pytest.mark.parametrize("cos_fac", [0.0, 1.2, 3.0])
@pytest.mark.parametrize("neg_fallback", [None, 0.6])
def test_affinity_matches_the_float64_restatement(cos_fac, neg_fallback):
    part = random_part(heads=3, grid=(3, 5), dim=4, seed=7)
    # shift some rows' values so their mean cosine is negative (the fallback then acts) and others positive
    part.values[:, :4] *= -1
    got = sam_affinity(part, cos_fac, neg_fallback)
    ref = reference_affinity(part.values, part._attention, cos_fac, neg_fallback)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert torch.allclose(got.sum(dim=1), torch.ones(15, dtype=torch.float64))
    assert bool((got.diagonal() > 0).all())


def test_threshold_fallback_and_cap_act_on_the_rows_they_should():
    # one head, 3 tokens in 2-D: rows 0/1 nearly parallel, row 2 opposite → row means of C known by hand
    values = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]]], dtype=torch.float64)
    c_mean = torch.tensor([(1 + 0.8 - 1) / 3, (0.8 + 1 - 0.8) / 3, (-1 - 0.8 + 1) / 3], dtype=torch.float64)
    torch.testing.assert_close(row_thresholds(values, 1.0), c_mean)
    fallback = row_thresholds(values, 1.0, neg_fallback=0.6)
    assert fallback.tolist()[2] == pytest.approx(0.6) and fallback[0] == c_mean[0]
    capped = row_thresholds(values, 3.0)  # 3 · 1/3 = 1.0 on row 1 → capped at 0.9; row 0: 3·0.2667 = 0.8
    assert capped[1].item() == pytest.approx(0.9) and capped[0].item() == pytest.approx(0.8)


def test_affinity_comparison_is_strict_and_per_head():
    # orthogonal values: C = I; cos_fac = 0 gives ε = 0 and every off-diagonal C = 0 is dropped (strict >)
    values = torch.eye(4, dtype=torch.float64)[None].repeat(2, 1, 1)
    attention = torch.full((2, 4, 4), 0.25, dtype=torch.float64)
    part = StubPart(values, attention, (2, 2))
    torch.testing.assert_close(sam_affinity(part, cos_fac=0.0), torch.eye(4, dtype=torch.float64))
    # head 1 sees tokens 0 and 1 as parallel: only head 1 keeps (0, 1) and (1, 0)
    values = values.clone()
    values[1, 1] = values[1, 0]
    attention = torch.stack([torch.full((4, 4), 0.25), torch.arange(16.0).reshape(4, 4) / 100]).double()
    a = sam_affinity(StubPart(values, attention, (2, 2)), cos_fac=0.0)
    bar = torch.diag(attention[0].diagonal() + attention[1].diagonal()) / 2
    bar[0, 1], bar[1, 0] = attention[1, 0, 1] / 2, attention[1, 1, 0] / 2
    torch.testing.assert_close(a, bar / bar.sum(dim=1, keepdim=True))
    assert a[0, 1] != a[1, 0]  # the attention is asymmetric, so is A


def test_affinity_is_unchanged_by_permuting_heads_and_reads_one_head_at_a_time():
    part = random_part(heads=4, grid=(2, 3), dim=5, seed=3)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = StubPart(part.values[perm], part._attention[perm], part.grid)
    torch.testing.assert_close(sam_affinity(part), sam_affinity(permuted), rtol=0, atol=1e-14)
    assert part.head_calls == 4  # each head's attention requested once, never the (h, M, M) stack


# ----------------------------------------------------------------------------------------------- splice (§14.3)
def test_splice_equals_the_sliding_window_accumulator_at_patch_resolution():
    p, crop, stride = 16, 64, 32
    height, width = 96, 160
    windows = window_grid(height, width, crop, stride)
    boxes = [(y1 // p, y2 // p, x1 // p, x2 // p) for (y1, y2, x1, x2) in windows]
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(len(boxes), 5, crop // p, crop // p, generator=g)
    acc = SlidingWindowAccumulator(5, height // p, width // p, dtype=torch.float32)
    acc.add_batch(boxes, maps)  # window maps at their own size: the accumulator's resize is the identity
    torch.testing.assert_close(splice_windows(maps, boxes, (height // p, width // p)), acc.result())


def test_splice_averages_by_hand_and_refuses_gaps():
    maps = torch.tensor([[[[1.0, 2.0]]], [[[10.0, 20.0]]]])  # two 1×2 windows overlapping in one column
    out = splice_windows(maps, [(0, 1, 0, 2), (0, 1, 1, 3)], (1, 3))
    assert out.tolist() == [[[1.0, (2.0 + 10.0) / 2, 20.0]]]
    with pytest.raises(ValueError, match="uncovered"):
        splice_windows(maps, [(0, 1, 0, 2), (0, 1, 2, 4)], (1, 5))  # column 4 uncovered


def test_align_keeps_multiples_and_resizes_others():
    maps = torch.randn(2, 3, 42, 42)
    same, ratio = align_to_clip_grid(maps, (21, 21))  # DINO /8 under CLIP /16: splice at twice the resolution
    assert ratio == 2 and same is maps
    maps = torch.randn(2, 3, 21, 21)
    out, ratio = align_to_clip_grid(maps, (24, 24))  # H/14 + DINO /16 (§4 step 2)
    assert ratio == 1
    torch.testing.assert_close(out, F.interpolate(maps, size=(24, 24), mode="bilinear", align_corners=False))


# ----------------------------------------------------------------------------------------------- aggregate (§6)
def test_aggregate_resizes_then_applies_a_row_major():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(3, 2, 3, generator=g, dtype=torch.float64)
    a = torch.softmax(torch.randn(12, 12, generator=g, dtype=torch.float64), dim=1)
    out = aggregate(features, [a], [(3, 4)])
    z = F.interpolate(features[None], size=(3, 4), mode="bilinear", align_corners=False)[0]
    ref = torch.einsum("mn,dn->dm", a, z.reshape(3, 12)).reshape(3, 3, 4)
    torch.testing.assert_close(out, ref)


def test_aggregate_halves_are_block_diagonal():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    a_left = torch.softmax(torch.randn(8, 8, generator=g, dtype=torch.float64), dim=1)
    a_right = torch.softmax(torch.randn(8, 8, generator=g, dtype=torch.float64), dim=1)
    out = aggregate(features, [a_left, a_right], [(2, 4), (2, 4)])
    assert out.shape == (2, 2, 8)
    left = aggregate(features[:, :, :3], [a_left], [(2, 4)])
    right = aggregate(features[:, :, 3:], [a_right], [(2, 4)])
    torch.testing.assert_close(out, torch.cat([left, right], dim=2))
    changed = features.clone()
    changed[:, :, 3:] += 5.0  # the right half of the input never reaches the left half of the output
    torch.testing.assert_close(aggregate(changed, [a_left, a_right], [(2, 4), (2, 4)])[:, :, :4], out[:, :, :4])


# ----------------------------------------------------------------------------------------------- proxy mean (§14.5)
def test_proxy_mean_batch_is_the_mean_of_the_window_means():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 6, 3, 3, generator=g)
    e = F.normalize(feats.flatten(2).double(), dim=1)
    s = e.transpose(1, 2) @ e
    mu = (s[0].mean() + s[1].mean()) / 2
    ref = 3.0 * (s - 1.2 * mu)
    masked = (ref < 0) & ~torch.eye(9, dtype=torch.bool)
    ref = ref.masked_fill(masked, float("-inf"))
    torch.testing.assert_close(proxy_graph(feats, mean="batch").double(), ref, rtol=0, atol=1e-5)
    window = proxy_graph(feats, mean="window")
    assert not torch.equal(window, proxy_graph(feats, mean="batch"))
    same = feats[:1].repeat(3, 1, 1, 1)  # identical windows: the batch mean is each window's mean
    torch.testing.assert_close(proxy_graph(same, mean="batch"), proxy_graph(same, mean="window"))


# ----------------------------------------------------------------------------------------------- pipeline
VOCAB = ["cat", "dog; puppy", "sky"]


def _photo(height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, height, width, generator=g) * 255).to(torch.uint8)


def identity_sam(grid: tuple[int, int], heads: int = 2) -> StubSam:
    """Mutually orthogonal values: C = I, every ε_i > 0, only the diagonal survives → A = I (§14 item 4)."""
    m = grid[0] * grid[1]
    values = torch.eye(m)[None].repeat(heads, 1, 1)
    attention = torch.softmax(torch.randn(heads, m, m), dim=-1)
    return StubSam([StubPart(values, attention, grid)])


def test_splice_mode_reduces_to_proxyclip_with_one_window_and_an_identity_affinity():
    clip, vfm = make_tiny_clip(), make_tiny_vfm(patch_size=16)
    image = _photo(64, 64)
    common = {"crop": 64, "stride": 32, "short_side": 64}
    sam = identity_sam((4, 4))
    with Segmenter(clip, vfm, preset="trident-coarse", vocabulary=VOCAB, sam=sam, **common) as seg:
        spliced = seg.segment(image, maps=False)
    assert sam.calls == 1 and spliced.record["sam_grids"] == [(4, 4)]
    with Segmenter(clip, vfm, preset="proxyclip", vocabulary=VOCAB, **common) as seg:
        x, _ = seg.preprocess(image)
        text = seg.text_embeddings(seg.vocabulary)
        window = seg.handle.logits(x, text)[0]  # one window = the batch: the same mean(S)
    torch.testing.assert_close(spliced.logits, window, rtol=0, atol=1e-5)


def test_splice_mode_runs_every_window_in_one_forward_and_records_them():
    clip, vfm = make_tiny_clip(), make_tiny_vfm(patch_size=16)
    sam = identity_sam((3, 4))
    forwards = []
    hook = vfm.blocks[0].register_forward_hook(lambda m, a, o: forwards.append(a[0].shape[0]))
    try:
        with Segmenter(clip, vfm, preset="trident-coarse", vocabulary=VOCAB, sam=sam, crop=64, stride=32,
                       short_side=72, window_batch=1) as seg:
            result = seg.segment(_photo(60, 80))
    finally:
        hook.remove()
    # 72×96 → (§2.1) 80×96: 2 × 2 windows of 64 at stride 32, all in one VFM forward despite window_batch=1
    assert result.record["windows"] == [(y, y + 64, x, x + 64) for y in (0, 16) for x in (0, 32)]
    assert forwards == [4]
    assert result.labels.shape == (60, 80) and result.probs.shape == (3, 60, 80)


def test_cass_components_compose_with_sam_aggregation_in_splice_mode():
    clip, vfm = make_tiny_clip(), make_tiny_vfm()
    sam = StubSam([random_part(4, (3, 4), 8, seed=5, dtype=torch.float32)])
    with Segmenter(clip, vfm, preset="cass-official", vocabulary=VOCAB, sam=sam, mode="splice", crop=64, stride=32,
                   short_side=64, components=["spectral", "ops", "ota", "sam_aggregate"]) as seg:
        result = seg.segment(_photo(64, 80))
        # the CASS block ran on every window (one matching each), the prior/OTA on the one aggregated map
        assert len(result.record["matching"]) == len(result.record["windows"]) == 2
        assert result.record["sam_grids"] == [(3, 4)] and "ota_clusters" in result.record
        assert torch.isfinite(result.logits).all()
    with Segmenter(clip, vfm, preset="cass-official", vocabulary=VOCAB, mode="splice", crop=64, stride=32,
                   short_side=64) as seg:  # splice without SAM: the map stays on the CLIP grid
        assert seg.segment(_photo(64, 80), maps=False).logits.shape[-2:] == (4, 5)
        with pytest.raises(TypeError, match="not a PreparedImage"):
            seg.segment(seg.prepare(_photo(64, 80)))


def test_sam_is_checked_before_anything_runs():
    clip, vfm = make_tiny_clip(), make_tiny_vfm(patch_size=16)
    with pytest.raises(ValueError, match="need a SAM model.*--sam-weights"):
        Segmenter(clip, vfm, preset="trident", vocabulary=VOCAB)
    with pytest.raises(ValueError, match="no component uses it"):
        Segmenter(clip, vfm, preset="proxyclip", vocabulary=VOCAB, sam=identity_sam((2, 2)))
    with pytest.raises(ValueError, match="prompt encoder and mask decoder"):
        Segmenter(clip, vfm, preset="trident", vocabulary=VOCAB, sam=identity_sam((2, 2)))  # can_refine False
    assert not hasattr(clip.visual, "_cass_patch_handle")  # every refusal left the model unpatched


def test_configurations_splice_mode_refuses():
    with pytest.raises(SettingError, match="only mode='splice' builds"):
        resolve_config("cass-official", components=["spectral", "sam_aggregate"])
    with pytest.raises(SettingError, match="cdam.*splice"):
        resolve_config("cass-official", baseline="naclip", components=["cdam"], mode="splice")
    with pytest.raises(SettingError, match="proxy_mean='batch'.*splice"):
        resolve_config("proxyclip", **{"proxyclip.proxy_mean": "batch"})
    with pytest.raises(SettingError, match="prior_source='image'"):
        resolve_config("trident", components=["sam_aggregate", "ops"], prior_source="crop")
    assert resolve_config("cass-official", components=["ops", "sam_refine"]).pipeline.mode == "slide"


# §9, written from the spec's table: short side, stride, prob_thd, cos_fac, refine_neg_cos, coarse_thresh
SPEC_TABLE = {
    "voc21": (448, 224, 0.2, 1.2, True, 0.2),
    "context60": (576, 224, 0.15, 1.2, True, 0.15),
    "coco_object": (448, 224, 0.25, 1.2, True, 0.25),
    "voc20": (336, 112, 0.0, 0.0, True, 0.2),
    "context59": (576, 224, 0.0, 1.2, True, 0.15),
    "coco_stuff164k": (448, 224, 0.0, 1.2, True, 0.05),
    "cityscapes": (688, 224, 0.0, 3.0, False, 0.10),
    "ade20k": (576, 224, 0.0, 1.2, False, 0.05),
}


@pytest.mark.parametrize("dataset", sorted(SPEC_TABLE))
def test_trident_presets_follow_the_per_dataset_table(dataset):
    short, stride, prob_thd, cos_fac, neg_cos, coarse = SPEC_TABLE[dataset]
    config = resolve_config("trident", dataset)
    p = config.pipeline
    assert (p.short_side, p.crop, p.stride, p.prob_thd, p.logit_scale, p.mode) == (short, 336, stride, prob_thd, 40.0,
                                                                                  "splice")
    assert config.baseline == "proxyclip" and config.block.proxy_mean == "batch"
    assert (config.block.beta, config.block.gamma) == (1.2, 3.0) and p.class_files == "proxyclip"
    aggregate_cfg = config["sam_aggregate"]
    assert aggregate_cfg.cos_fac == cos_fac and (aggregate_cfg.neg_fallback is None) == neg_cos
    assert aggregate_cfg.split == ("halves" if dataset == "cityscapes" else "none")
    assert config["sam_refine"].coarse_thresh == coarse and config["sam_refine"].iou_thresh == 0.8
    assert config["sam_refine"].min_area == 225 and config["sam_refine"].mask_alpha == 0.005
    assert config.components == ("sam_aggregate", "sam_refine")
    assert resolve_config("trident-coarse", dataset).components == ("sam_aggregate",)


# ----------------------------------------------------------------------------------------------- end to end (§14.9)
@pytest.mark.parametrize("preset", ["trident", "trident-coarse"])
def test_trident_end_to_end_with_a_tiny_random_sam(preset):
    from tiny_sam import make_tiny_sam, random_image

    clip, vfm, sam = make_tiny_clip(), make_tiny_vfm(patch_size=16), make_tiny_sam()
    encode = sam.encode
    calls = []
    sam.encode = lambda *a, **k: calls.append(k) or encode(*a, **k)
    image = torch.from_numpy(random_image(70, 100)).permute(2, 0, 1).contiguous()
    extra = {"sam_refine.min_area": 4, "sam_refine.coarse_thresh": 0.0} if preset == "trident" else {}
    with Segmenter(clip, vfm, preset=preset, vocabulary=VOCAB, sam=sam, crop=64, stride=32, short_side=64,
                   **extra) as seg:
        first, second = seg.segment(image), seg.segment(image)
    assert first.labels.shape == (70, 100) and first.labels.dtype == torch.int64
    assert set(first.labels.unique().tolist()) <= {0, 1, 2}
    assert torch.equal(first.labels, second.labels) and torch.isfinite(first.logits).all()
    # SAM saw the original image rounded up to multiples of 16 (80×112 → 183×256 of the 256² input): 11×16 tokens
    assert first.record["sam_grids"] == [(11, 16)]
    refine = preset == "trident"
    assert calls == [{"round_to": 16, "split_halves": False, "keep_for_refine": refine}] * 2  # one pass per image
    assert ("sam_refine" in first.record) == refine
    if refine:
        assert first.record["sam_refine"]["regions"]  # prompts were built from the coarse map


def test_sam_refine_composes_with_a_slide_mode_baseline_as_the_manual_pipeline():
    """CASS (slide windows) + sam_refine equals CASS's own labels refined by hand with the same SAM (§8)."""
    from tiny_sam import make_tiny_sam, random_image

    from cass_plugins.trident.refine import SamRefineConfig, refine_labels

    clip, vfm, sam = make_tiny_clip(), make_tiny_vfm(), make_tiny_sam()
    with torch.no_grad():  # random IoU heads predict ≈ −0.2; lift them so masks are accepted
        sam.model.mask_decoder.iou_prediction_head.layers[-1].bias += 1.1
    image = torch.from_numpy(random_image(70, 100)).permute(2, 0, 1).contiguous()
    settings = {"crop": 64, "stride": 32, "short_side": 64}
    refine = {"sam_refine.min_area": 4, "sam_refine.coarse_thresh": 0.0}
    with Segmenter(clip, vfm, preset="cass-official", vocabulary=VOCAB, **settings) as seg:
        coarse = seg.segment(image)
    with Segmenter(clip, vfm, preset="cass-official", vocabulary=VOCAB, sam=sam, **settings, **refine,
                   components=["spectral", "ops", "ota", "sam_refine"]) as seg:
        refined = seg.segment(image)
    predictor = sam.encode(image, round_to=16, keep_for_refine=True).predictor
    expected, info = refine_labels(coarse.probs, coarse.labels, predictor,
                                   SamRefineConfig(min_area=4, coarse_thresh=0.0))
    assert info["accepted"] > 0 and not torch.equal(expected, coarse.labels)  # the refinement did something
    assert torch.equal(refined.labels, expected)
    assert refined.record["sam_refine"]["accepted"] == info["accepted"]
    torch.testing.assert_close(refined.probs, coarse.probs)  # probabilities are the coarse ones


def test_cass_eval_trident_runs_on_the_eight_dataset_layouts(tmp_path, monkeypatch, capsys):
    """``cass-eval --preset trident`` with a local SAM checkpoint on every benchmark's folder layout (one image each,
    each dataset's own preset values; the protocol's sizes shrunk so tiny models stay fast)."""
    import json

    import numpy as np
    from test_datasets import _ade, _cityscapes, _coco, _grid, _voc2010, _voc2012
    from tiny_sam import save_tiny_sam_checkpoint

    from cass_plugins.cli import common as cli_common
    from cass_plugins.cli.evaluate import main
    from cass_plugins.evaluation.datasets import convert_coco_labels
    from conftest import TINY_CLIP, _register_tiny_clip

    _voc2012(tmp_path, _grid([0, 1, 15, 20, 255]))
    _voc2010(tmp_path, _grid([0, 1, 30, 59]))
    coco = _coco(tmp_path, _grid([0, 12, 89, 91, 181, 255]))
    convert_coco_labels(coco, "object"), convert_coco_labels(coco, "stuff")
    _cityscapes(tmp_path, _grid([0, 18, 255, 7]))
    _ade(tmp_path, _grid([0, 1, 2, 150, 255]))
    _register_tiny_clip()
    monkeypatch.setattr(cli_common, "load_vfm", lambda *a, **k: make_tiny_vfm(patch_size=16))
    sam_file = save_tiny_sam_checkpoint(tmp_path / "sam_tiny.pth")
    datasets = ["voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff164k", "cityscapes", "ade20k"]
    out = tmp_path / "trident.json"
    argv = [arg for name in datasets for arg in ("--dataset", name)]
    argv += ["--data-root", str(tmp_path), "--preset", "trident", "--clip", TINY_CLIP, "--pretrained", "random",
             "--sam", "test", "--sam-weights", str(sam_file), "--device", "cpu", "--limit", "1", "--no-progress",
             "--out", str(out), "--set", "short_side=64", "crop=64", "stride=32"]
    assert main(argv) == 0
    results = json.loads(out.read_text())["datasets"]
    for name in datasets:
        section = results[name]
        assert np.isfinite(section["mIoU"]), name
        config = section["config"]
        assert config["pipeline"]["mode"] == "splice" and config["components"] == ["sam_aggregate", "sam_refine"]
    assert results["cityscapes"]["config"]["sam_aggregate"]["split"] == "halves"
    assert results["voc20"]["config"]["sam_aggregate"]["cos_fac"] == 0.0
    assert results["ade20k"]["config"]["sam_aggregate"]["neg_fallback"] == 0.6


def test_sam_on_another_device_than_the_clip_is_refused():
    clip, vfm = make_tiny_clip(), make_tiny_vfm(patch_size=16)
    sam = identity_sam((2, 2))
    sam.device = torch.device("meta")  # a device the CLIP is not on (no GPU needed to show the check)
    with pytest.raises(ValueError, match="SAM is on meta but the CLIP model on cpu: pass device="):
        Segmenter(clip, vfm, preset="trident-coarse", vocabulary=VOCAB, sam=sam)
    assert not hasattr(clip.visual, "_cass_patch_handle")
