"""Trident's SAM refinement (docs/spec/trident.md §8): prompts, merge, the decoder call (stub and tiny real SAM)."""
from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cass_plugins.core.settings import SettingError
from cass_plugins.trident.refine import (
    SamRefineConfig,
    downsample,
    find_regions,
    get_preprocess_shape,
    mark_uncertain,
    mask_prompt,
    merge_refined,
    refine_labels,
    scale_prompts,
)


# ---------------------------------------------------------------------------------------------------- references
def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of 1-D linear resizing with align_corners=False (half-pixel centres)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for d in range(n_out):
        src = max((d + 0.5) * scale - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[d, i0] += 1.0 - lam
        m[d, i1] += lam
    return m


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) → (..., h, w), separable float64 re-computation of bilinear resizing."""
    wy = _bilinear_matrix(x.shape[-2], size[0])
    wx = _bilinear_matrix(x.shape[-1], size[1])
    return wy @ x.double() @ wx.T


def _merge_reference(probs, labels, accepted):
    """§8 steps 7-8 in float64, straight from the spec."""
    c_count = probs.shape[0]
    r = torch.zeros(probs.shape, dtype=torch.float64)
    for c, items in accepted.items():
        union = torch.zeros(labels.shape, dtype=torch.bool)
        s = torch.zeros(labels.shape, dtype=torch.float64)
        for mask, logit in items:
            union |= mask
            s = torch.maximum(s, torch.sigmoid(logit.double()) * probs[c].double())
        r[c] = s * union
    out = labels.clone().long()
    for y in range(labels.shape[0]):
        for x in range(labels.shape[1]):
            col = r[:, y, x]
            if col.sum() != 0:
                best = max(range(c_count), key=lambda k: (col[k].item(), -k))  # lowest index among the maxima
                out[y, x] = best
    return out


# ---------------------------------------------------------------------------------------------------- settings
def test_config_defaults_and_refusals() -> None:
    cfg = SamRefineConfig()
    assert (cfg.coarse_thresh, cfg.min_area, cfg.mask_alpha, cfg.iou_thresh, cfg.down_ratio, cfg.unbatched_mask) == (
        0.2, 225, 0.005, 0.8, 2, True
    )
    for bad in ({"coarse_thresh": 1.5}, {"min_area": 0}, {"mask_alpha": -0.1}, {"iou_thresh": -0.01},
                {"down_ratio": 0}, {"min_area": 2.5}, {"iou_thresh": float("nan")}):
        with pytest.raises(SettingError, match="sam_refine." + next(iter(bad))):
            SamRefineConfig(**bad)


# ---------------------------------------------------------------------------------------------------- steps 1-2
def test_downsample_ratio2_block_mean_and_nearest_topleft() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.arange(24).reshape(4, 6) % 2
    labels[0, 1] = 1  # the top-left of a 2×2 block decides, so a change at (0, 1) must not show
    p, lab = downsample(probs, labels, 2)
    # Exact 2× bilinear with half-pixel centres samples between the pixels 2i and 2i+1: the 2×2 block mean.
    expected = probs.reshape(2, 2, 2, 3, 2).mean(dim=(2, 4))
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-12)
    assert torch.equal(lab, labels[0::2, 0::2])  # PyTorch 'nearest': src = floor(dst·in/out) = 2·dst


def test_downsample_odd_sizes_match_float64_reference() -> None:
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (7, 11), generator=g)
    p, lab = downsample(probs, labels, 3)
    assert p.shape == (3, 2, 3) and lab.shape == (2, 3)
    torch.testing.assert_close(p, _bilinear(probs, (2, 3)), rtol=0, atol=1e-12)
    rows = [math.floor(d * 7 / 2) for d in range(2)]  # [0, 3]
    cols = [math.floor(d * 11 / 3) for d in range(3)]  # [0, 3, 7]
    assert torch.equal(lab, labels[rows][:, cols])


def test_downsample_refuses_map_smaller_than_ratio() -> None:
    with pytest.raises(ValueError, match="smaller than the down ratio"):
        downsample(torch.rand(2, 1, 5), torch.zeros(1, 5, dtype=torch.long), 2)


def test_mark_uncertain() -> None:
    probs = torch.tensor([[[0.1, 0.5, 0.19]], [[0.15, 0.3, 0.2]]])  # (2, 1, 3); max per pixel: .15, .5, .2
    labels = torch.tensor([[1, 0, 0]])
    assert mark_uncertain(labels, probs, 0.2).tolist() == [[2, 0, 0]]  # 0.2 is not below 0.2
    assert mark_uncertain(labels, probs, 0.0).tolist() == [[1, 0, 0]]
    assert labels.tolist() == [[1, 0, 0]]  # input untouched


# ---------------------------------------------------------------------------------------------------- step 3
def _region_scene() -> tuple[torch.Tensor, torch.Tensor]:
    """7×9 half-resolution scene, 3 classes (see test_find_regions for the hand-worked answers)."""
    labels = torch.zeros(7, 9, dtype=torch.long)
    # class 1: a mirrored L of 5 pixels plus (4, 0), touching (3, 1) only diagonally → one 8-connected region of 6.
    for y, x in [(1, 3), (2, 3), (3, 3), (3, 2), (3, 1), (4, 0)]:
        labels[y, x] = 1
    labels[0, 7] = labels[1, 7] = 1  # a second class-1 component of 2 pixels
    labels[5:7, 5:8] = 2  # a 2×3 class-2 block (6 pixels)
    labels[6, 0] = 2  # a lone class-2 pixel
    probs = torch.full((3, 7, 9), 0.1)
    probs[1] = 0.3
    probs[1, 1, 3] = probs[1, 3, 1] = 0.9  # tie: row-major first is (y=1, x=3); column-major first would be (3, 1)
    probs[1, 0, 7] = 0.99  # the dropped component and a class-2 pixel hold larger values: outside the region
    probs[1, 5, 5] = 0.95
    probs[2] = 0.5
    probs[2, 6, 7] = 0.8
    return probs, labels


def test_find_regions_hand_worked() -> None:
    probs, labels = _region_scene()
    regions = find_regions(probs, labels, coarse_thresh=0.2, min_area=6)
    assert [r.cls for r in regions] == [1, 2]  # class 0 skipped: max P_0 = 0.1 < 0.2
    one, two = regions
    assert int(one.mask.sum()) == 6 and bool(one.mask[4, 0])  # joined only through the diagonal
    assert one.point == (3, 1)
    assert one.box == (0, 1, 3, 4)  # inclusive (x_min, y_min, x_max, y_max)
    assert int(two.mask.sum()) == 6 and two.point == (7, 6) and two.box == (5, 5, 7, 6)


def test_find_regions_area_filter_is_inclusive_and_counts_8_connected() -> None:
    probs, labels = _region_scene()
    # 4-connectivity would give 5 + 1 pixels for the L: nothing of class 1 would reach 6.
    assert [int(r.mask.sum()) for r in find_regions(probs, labels, 0.2, 7)] == []
    areas = sorted((r.cls, int(r.mask.sum())) for r in find_regions(probs, labels, 0.2, 1))
    assert areas == [(1, 2), (1, 6), (2, 1), (2, 6)]


def test_find_regions_class_skip_and_first_argmax_on_ties() -> None:
    probs, labels = _region_scene()
    # τ_c = 0.05: class 0 is prompted; its 48 pixels form one region (all joined around the shapes).
    regions = [r for r in find_regions(probs, labels, 0.05, 6) if r.cls == 0]
    assert len(regions) == 1
    assert int(regions[0].mask.sum()) == 63 - 15
    assert regions[0].point == (0, 0)  # P_0 is flat: the first class-0 pixel in row-major order
    assert regions[0].box == (0, 0, 8, 6)
    probs[2] = 0.15  # max P_2 < τ_c: class 2 is skipped although its block is large enough
    assert [r.cls for r in find_regions(probs, labels, 0.2, 6)] == [1]


def test_find_regions_refuses_labels_outside_classes() -> None:
    probs, labels = _region_scene()
    labels[0, 0] = 4  # C = 3: label 3 (uncertain) is allowed, 4 is not
    with pytest.raises(ValueError, match=r"0\.\.3"):
        find_regions(probs, labels, 0.2, 6)


# ---------------------------------------------------------------------------------------------------- step 4
@pytest.mark.parametrize(
    ("h", "w", "long_side", "expected"),
    [(375, 500, 1024, (768, 1024)), (384, 512, 1024, (768, 1024)), (688, 512, 1024, (1024, 762)),
     (7, 9, 64, (50, 64)), (187, 250, 256, (191, 256))],
)
def test_get_preprocess_shape(h: int, w: int, long_side: int, expected: tuple[int, int]) -> None:
    assert get_preprocess_shape(h, w, long_side) == expected


def test_scale_prompts_non_square() -> None:
    # half map 7×9, long side 64: (h', w') = (50, 64), so x × 64/9 and y × 50/7.
    points = torch.tensor([[3, 1], [0, 6]])
    boxes = torch.tensor([[0, 1, 3, 4]])
    p, b = scale_prompts(points, boxes, (7, 9), 64)
    assert p.dtype == b.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor([[64 / 3, 50 / 7], [0.0, 300 / 7]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(b, torch.tensor([[0.0, 50 / 7, 64 / 3, 200 / 7]]), rtol=0, atol=1e-5)


def test_mask_prompt_constant_threshold_and_padding() -> None:
    flat = torch.full((3, 4), 0.5)
    # original 6×8 → get_preprocess_shape(6, 8, 16) = (12, 16): rows 12..15 are padding.
    m = mask_prompt(flat, (6, 8), coarse_thresh=0.2, alpha=0.005, low_res=16)
    assert m.shape == (1, 16, 16)
    torch.testing.assert_close(m[0, :12], torch.full((12, 16), 0.0025))
    assert torch.count_nonzero(m[0, 12:]) == 0
    # portrait original 8×6 → (16, 12): columns 12..15 are padding.
    m = mask_prompt(flat, (8, 6), 0.2, 0.005, 16)
    assert torch.count_nonzero(m[0, :, :12]) == 16 * 12 and torch.count_nonzero(m[0, :, 12:]) == 0
    # strict threshold: a value equal to τ_c gives 0
    assert torch.count_nonzero(mask_prompt(torch.full((3, 4), 0.25), (6, 8), 0.25, 1.0, 16)) == 0


def test_mask_prompt_matches_float64_reference() -> None:
    g = torch.Generator().manual_seed(2)
    prob = torch.rand(5, 7, generator=g)
    original = (11, 15)  # the half map 5×7 is not exactly half of it (T-Q14)
    m = mask_prompt(prob, original, coarse_thresh=0.4, alpha=0.3, low_res=64)
    nh, nw = 47, 64  # get_preprocess_shape(11, 15, 64): 11·64/15 = 46.93 → 47
    up = _bilinear(prob, (nh, nw))
    expected = torch.zeros(64, 64, dtype=torch.float64)
    expected[:nh, :nw] = torch.where(up > 0.4, 0.3 * up, torch.zeros_like(up))
    assert m.shape == (1, 64, 64)
    torch.testing.assert_close(m[0].double(), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- steps 7-8
def _merge_case():
    probs = torch.tensor([
        [[0.1, 0.0, 0.1], [0.5, 0.5, 0.7]],
        [[0.6, 0.1, 0.2], [0.25, 0.2, 0.3]],
        [[0.3, 0.9, 0.7], [0.25, 0.3, 0.0]],
    ])
    labels = torch.tensor([[1, 1, 0], [0, 2, 1]])
    m1 = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    m2 = torch.tensor([[0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    m3 = torch.tensor([[0, 1, 1], [1, 0, 1]], dtype=torch.bool)

    def logits_on(m: torch.Tensor, a: float) -> torch.Tensor:  # logits > 0 exactly on the mask, as SAM's would be
        return torch.where(m, torch.tensor(a), torch.tensor(-a))

    accepted = {1: [(m1, logits_on(m1, 2.0)), (m2, logits_on(m2, 1.0))], 2: [(m3, logits_on(m3, 1.0))]}
    return probs, labels, accepted


def test_merge_hand_worked() -> None:
    probs, labels, accepted = _merge_case()
    # (0,0) only class 1 covers; (0,1) σ(1)·.9 beats σ(2)·.1; (0,2) only class 2; (1,0) exact tie σ(1)·.25 → the
    # lower index 1; (1,1) uncovered → coarse 2 (not argmax P = 0); (1,2) covered by class 2 with P_2 = 0 → coarse 1.
    assert merge_refined(probs, labels, accepted).tolist() == [[1, 2, 2], [1, 2, 1]]


def test_merge_matches_float64_reference_random() -> None:
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(4, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (5, 7), generator=g)
    accepted = {}
    for c, n in [(0, 1), (2, 3), (3, 2)]:
        logits = [torch.randn(5, 7, generator=g, dtype=torch.float64) * 2 for _ in range(n)]
        accepted[c] = [(lg > 0, lg) for lg in logits]
    out = merge_refined(probs, labels, accepted)
    assert out.dtype == torch.int64
    assert torch.equal(out, _merge_reference(probs, labels, accepted))


def test_merge_without_masks_is_the_coarse_map() -> None:
    probs, labels, _ = _merge_case()
    assert torch.equal(merge_refined(probs, labels, {}), labels)
    assert torch.equal(merge_refined(probs, labels, {1: []}), labels)


def test_merge_refuses_unknown_class() -> None:
    probs, labels, accepted = _merge_case()
    with pytest.raises(ValueError, match="class 3"):
        merge_refined(probs, labels, {3: accepted[1]})


# ---------------------------------------------------------------------------------------------------- stub predictor
class _StubPredictor:
    """Returns the given IoU scores and full-size logit maps, one response per predict_torch call, and records calls.

    ``postprocess_masks`` resizes bilinearly to ``original_size`` (identity when the sizes agree).
    """

    def __init__(self, responses, original_size, low_res=16, img_size=32):
        self.responses = list(responses)
        self.calls = []
        self.is_image_set = True
        self.features = torch.zeros(1, 4, 4, 4)
        self.device = torch.device("cpu")
        self.input_size = (21, 32)
        self.original_size = original_size
        self.model = SimpleNamespace(
            prompt_encoder=torch.nn.Module(), mask_decoder=torch.nn.Module(),
            image_encoder=SimpleNamespace(img_size=img_size), postprocess_masks=self._postprocess,
        )
        self.model.prompt_encoder.mask_input_size = (low_res, low_res)

    def _postprocess(self, masks, input_size, original_size):
        assert input_size == self.input_size and original_size == self.original_size
        if tuple(masks.shape[-2:]) == tuple(original_size):
            return masks
        return F.interpolate(masks, size=original_size, mode="bilinear", align_corners=False)

    def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True,
                      return_logits=False):
        self.calls.append({"points": point_coords, "labels": point_labels, "boxes": boxes, "mask": mask_input,
                           "multimask": multimask_output, "logits": return_logits})
        iou, maps = self.responses.pop(0)
        low = torch.stack(maps)[:, None]
        return low, torch.tensor(iou, dtype=torch.float32)[:, None], low


def _stub_scene():
    """8×12 image, half 4×6; class 1: two regions, class 2: one region, class 0 too weak to prompt."""
    h0, w0 = 8, 12
    probs = torch.full((3, h0, w0), 0.1)
    probs[1, 0:4, 0:4] = 0.7  # half-res block rows 0-1, cols 0-1
    probs[1, 6:8, 0:4] = 0.6  # half-res row 3, cols 0-1
    probs[2, 0:8, 8:12] = 0.8  # half-res cols 4-5
    labels = probs.argmax(0)
    return probs, labels


def _rect(h0, w0, y0, y1, x0, x1, a=3.0):
    m = torch.full((h0, w0), -a)
    m[y0:y1, x0:x1] = a
    return m


def test_refine_with_stub_accepts_strictly_above_threshold() -> None:
    probs, labels = _stub_scene()
    above = float(np.nextafter(np.float32(0.8), np.float32(1)))
    a = _rect(8, 12, 0, 6, 0, 6)  # class 1, region 0: accepted, grows the class-1 block
    b = _rect(8, 12, 0, 8, 0, 12)  # class 1, region 1: IoU exactly 0.8 → rejected; would cover everything
    c = _rect(8, 12, 0, 8, 7, 12)  # class 2: accepted
    stub = _StubPredictor([([0.9, 0.8], [a, b]), ([above], [c])], original_size=(8, 12))
    cfg = SamRefineConfig(min_area=2)
    out, info = refine_labels(probs, labels, stub, cfg)

    assert info["regions"] == {1: 2, 2: 1} and info["accepted"] == 2
    assert info["accepted_per_class"] == {1: 1, 2: 1}
    assert info["iou"][1] == pytest.approx([0.9, 0.8])
    expected = _merge_reference(probs, labels, {1: [(a > 0, a)], 2: [(c > 0, c)]})
    assert torch.equal(out, expected)
    # the rejected region (the whole image) changed nothing outside the accepted masks
    outside = ~(a > 0) & ~(c > 0)
    assert torch.equal(out[outside], labels[outside])
    assert out[5, 2] == 1 and labels[5, 2] == 0  # relabelled by the accepted class-1 mask

    # the calls: per class, n×1×2 points, ones n×1, n×4 boxes, the unbatched 1×L×L mask, single-mask logits
    one, two = stub.calls
    assert one["points"].shape == (2, 1, 2) and one["labels"].tolist() == [[1], [1]]
    assert one["boxes"].shape == (2, 4) and one["mask"].shape == (1, 16, 16)
    assert one["multimask"] is False and one["logits"] is True
    # half map 4×6, long side 32: (h', w') = (21, 32) → x × 32/6, y × 21/4. Region 0 is the half-res block
    # rows 0-1, cols 0-1 (first argmax (0, 0)); region 1 is row 3, cols 0-1 (first argmax (x=0, y=3)).
    torch.testing.assert_close(one["points"][:, 0], torch.tensor([[0.0, 0.0], [0.0, 3 * 21 / 4]]))
    torch.testing.assert_close(one["boxes"], torch.tensor([[0.0, 0.0, 32 / 6, 21 / 4], [0.0, 63 / 4, 32 / 6, 63 / 4]]))
    assert two["points"].shape == (1, 1, 2)


def test_refine_with_stub_batched_mask_option() -> None:
    probs, labels = _stub_scene()
    a = _rect(8, 12, 0, 6, 0, 6)
    stub = _StubPredictor([([0.5, 0.5], [a, a]), ([0.5], [a])], original_size=(8, 12))
    refine_labels(probs, labels, stub, SamRefineConfig(min_area=2, unbatched_mask=False))
    assert stub.calls[0]["mask"].shape == (1, 1, 16, 16)


def test_refine_with_stub_nothing_accepted_returns_input() -> None:
    probs, labels = _stub_scene()
    everything = _rect(8, 12, 0, 8, 0, 12)
    stub = _StubPredictor([([0.8, 0.1], [everything] * 2), ([0.8], [everything])], original_size=(8, 12))
    out, info = refine_labels(probs, labels, stub, SamRefineConfig(min_area=2))
    assert info["accepted"] == 0 and len(stub.calls) == 2
    assert torch.equal(out, labels) and out.dtype == torch.int64


def test_refine_with_stub_resizes_from_the_rounded_image() -> None:
    # The predictor holds a 10×12 image (rounded up), the maps are 8×12: logits are resized bilinearly to 8×12.
    probs, labels = _stub_scene()
    ramp = (torch.arange(10.0) - 4.5)[:, None].expand(10, 12).clone()  # class 1: > 0 on rows 5..9 of 10
    weak = torch.full((10, 12), -5.0)
    flat = torch.full((10, 12), 0.56)  # class 2 covers everything
    flat[:, 2:] = 0.635
    stub = _StubPredictor([([0.9, 0.1], [ramp, weak]), ([0.9], [flat])], original_size=(10, 12))
    out, info = refine_labels(probs, labels, stub, SamRefineConfig(min_area=2))
    assert out.shape == (8, 12) and info["accepted"] == 2
    # On 8 rows, bilinear (half-pixel) samples src = (d + 0.5)·1.25 − 0.5: the ramp is −0.625 on row 3 and
    # 0.625 on row 4. Where P_1 = P_2 = 0.1 (rows 4-5, columns 0-3), row 4 goes to class 1 where class 2's logit
    # is 0.56 and to class 2 where it is 0.635. Nearest (src = floor(1.25·d) = 5, ramp 0.5) would give columns 0-1
    # to class 2, align_corners=True (src = 9d/7, ramp 0.643) columns 2-3 to class 1.
    ramp8 = _bilinear(ramp, (8, 12))
    assert torch.equal(ramp8[:, 0] > 0, torch.arange(8) >= 4)
    assert out[4, :4].tolist() == [1, 1, 2, 2] and out[5, :4].tolist() == [1] * 4
    flat8 = _bilinear(flat, (8, 12))
    expected = _merge_reference(probs, labels, {1: [(ramp8 > 0, ramp8)], 2: [(flat8 > 0, flat8)]})
    assert torch.equal(out, expected)


def test_refine_refuses_bad_inputs_before_calling_sam() -> None:
    probs, labels = _stub_scene()
    stub = _StubPredictor([], original_size=(8, 12))
    with pytest.raises(ValueError, match="share"):
        refine_labels(probs, labels[:, :5], stub, SamRefineConfig())
    with pytest.raises(ValueError, match="integer"):
        refine_labels(probs, labels.float(), stub, SamRefineConfig())
    bad = probs.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        refine_labels(bad, labels, stub, SamRefineConfig())
    stub.is_image_set = False
    with pytest.raises(RuntimeError, match="set_image"):
        refine_labels(probs, labels, stub, SamRefineConfig())
    stub.is_image_set = True
    stub.model.mask_decoder = torch.nn.Linear(2, 2).half()
    with pytest.raises(ValueError, match=r"mask_decoder.*float\(\)"):
        refine_labels(probs, labels, stub, SamRefineConfig())
    with pytest.raises(TypeError, match="SamPredictor"):
        refine_labels(probs, labels, object(), SamRefineConfig())
    assert stub.calls == []


# ---------------------------------------------------------------------------------------------------- tiny real SAM
def _make_tiny_sam(seed: int = 0):
    """Tiny random segment_anything SAM (trident.md §14): grid 16×16, mask input 64×64. IoU head biased to ≈0.9."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )
    from segment_anything.modeling.common import LayerNorm2d

    torch.manual_seed(seed)
    encoder = ImageEncoderViT(
        img_size=256, patch_size=16, embed_dim=64, depth=2, num_heads=4, out_chans=32,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, rel_pos_zero_init=False,
        window_size=4, global_attn_indexes=(1,),
    )
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=16)
    decoder = MaskDecoder(
        transformer_dim=32, transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
        iou_head_hidden_dim=32,
    )
    with torch.no_grad():
        for module in prompt.modules():  # random affine LayerNorm2d, so a wrong normalisation axis cannot hide
            if isinstance(module, LayerNorm2d):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
        decoder.iou_prediction_head.layers[-1].bias += 1.1  # random heads predict ≈ −0.2: lift above 0.8
    return Sam(encoder, prompt, decoder).eval()


@pytest.fixture(scope="module")
def tiny_predictor():
    pytest.importorskip("segment_anything")
    from segment_anything import SamPredictor
    from skimage import data, transform

    photo = data.chelsea()  # 300×451 RGB
    # the refined maps are 70×100; SAM holds the image rounded up to multiples of p = 16 (T-Q14): 80×112
    rounded = (transform.resize(photo, (80, 112), anti_aliasing=True) * 255).round().astype(np.uint8)
    predictor = SamPredictor(_make_tiny_sam())
    predictor.set_image(rounded)
    return predictor


def _photo_probs(h0: int = 70, w0: int = 100):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h0), torch.linspace(0, 1, w0), indexing="ij")
    logits = torch.stack([3 * (1 - xx), 3 * xx * (yy < 0.5), 3 * xx * (yy >= 0.5)])
    probs = torch.softmax(2 * logits, dim=0)
    return probs, probs.argmax(0)


def _mask_downscaling_reference(seq: torch.nn.Sequential, m: torch.Tensor, batched: bool) -> torch.Tensor:
    """``mask_downscaling`` re-computed in float64; LayerNorm2d averages over dim 1 of the tensor it gets."""
    conv1, ln1, _, conv2, ln2, _, conv3 = seq

    def ln(x, mod):
        u = x.mean(1, keepdim=True)
        s = ((x - u) ** 2).mean(1, keepdim=True)
        return mod.weight.double()[:, None, None] * (x - u) / torch.sqrt(s + mod.eps) + mod.bias.double()[:, None, None]

    def conv(x, mod, stride):
        return F.conv2d(x, mod.weight.double(), mod.bias.double(), stride=stride)

    x = m.double()
    if not batched:  # an unbatched 1×g×g tensor: conv treats it as one image, LayerNorm2d then normalises rows
        x = x[None]
        x = conv(x, conv1, 2)[0]
        x = F.gelu(ln(x, ln1))
        x = conv(x[None], conv2, 2)[0]
        x = F.gelu(ln(x, ln2))
        return conv(x[None], conv3, 1)[0]
    x = F.gelu(ln(conv(x, conv1, 2), ln1))
    x = F.gelu(ln(conv(x, conv2, 2), ln2))
    return conv(x, conv3, 1)


def _capture_dense(predictor, probs, labels, cfg):
    seen = []
    hook = predictor.model.prompt_encoder.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((kwargs["masks"].detach().clone(), out[1].detach().clone())),
        with_kwargs=True,
    )
    try:
        result = refine_labels(probs, labels, predictor, cfg)
    finally:
        hook.remove()
    return result, seen


def test_unbatched_mask_quirk_with_tiny_sam(tiny_predictor) -> None:
    probs, labels = _photo_probs()
    downscale = tiny_predictor.model.prompt_encoder.mask_downscaling
    (_, _), seen = _capture_dense(tiny_predictor, probs, labels, SamRefineConfig(min_area=50))
    assert len(seen) == 3  # one decoder call per prompted class
    mask_in, dense = seen[0]
    assert mask_in.shape == (1, 64, 64) and dense.shape == (32, 16, 16)  # 1×4g×4g in, unbatched out
    assert torch.count_nonzero(mask_in) > 0
    torch.testing.assert_close(dense.double(), _mask_downscaling_reference(downscale, mask_in, False),
                               rtol=1e-4, atol=1e-4)

    (_, _), seen_b = _capture_dense(tiny_predictor, probs, labels,
                                    SamRefineConfig(min_area=50, unbatched_mask=False))
    mask_b, dense_b = seen_b[0]
    assert mask_b.shape == (1, 1, 64, 64) and torch.equal(mask_b[0], mask_in)
    torch.testing.assert_close(dense_b.double(), _mask_downscaling_reference(downscale, mask_b, True),
                               rtol=1e-4, atol=1e-4)
    assert (dense_b[0] - dense).abs().max() > 0.1  # normalising rows instead of channels changes the embedding


def test_refine_end_to_end_tiny_sam(tiny_predictor) -> None:
    probs, labels = _photo_probs()
    cfg = SamRefineConfig(min_area=50)
    out, info = refine_labels(probs, labels, tiny_predictor, cfg)
    again, _ = refine_labels(probs, labels, tiny_predictor, cfg)
    assert out.shape == (70, 100) and out.dtype == torch.int64
    assert set(out.unique().tolist()) <= {0, 1, 2}
    assert torch.equal(out, again)
    assert info["regions"] == {0: 1, 1: 1, 2: 1} and info["accepted"] >= 1
    assert (out != labels).any()  # the accepted masks relabel some pixels (6.7 % with this seed)
    assert tiny_predictor.features.dtype == torch.float32

    none, info_none = refine_labels(probs, labels, tiny_predictor, cfg.replace(iou_thresh=1.0))
    assert info_none["accepted"] == 0 and torch.equal(none, labels)


def test_refine_half_precision_features_are_cast_and_restored(tiny_predictor) -> None:
    probs, labels = _photo_probs()
    cfg = SamRefineConfig(min_area=50)
    reference, _ = refine_labels(probs, labels, tiny_predictor, cfg)
    full = tiny_predictor.features
    tiny_predictor.features = full.half()
    try:
        out, _ = refine_labels(probs, labels, tiny_predictor, cfg)
        assert tiny_predictor.features.dtype == torch.float16  # the caller's tensor is put back
    finally:
        tiny_predictor.features = full
    assert out.shape == reference.shape
    assert (out != reference).float().mean() < 0.01  # only half-precision rounding of the features differs
