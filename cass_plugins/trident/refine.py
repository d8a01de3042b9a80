"""Trident's SAM prompt refinement (docs/spec/trident.md §8): prompts from the coarse map, one mask-decoder call
per class, and the merge of the accepted masks.

The prompt construction (§8 steps 1-4) and the merge (steps 7-8) are pure tensor functions; only
:func:`refine_labels` touches SAM, through a ``segment_anything.SamPredictor`` whose image is already set. Official
code: ``YuHengsss/Trident:seg_utils/utils.py:27-197`` (``split_connected_regions``, ``map_refinement_coarse``, the
refinement loop) called from ``trident.py:277-283``.

Settings section ``sam_refine`` (:class:`SamRefineConfig`), defaults from §9.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cass_plugins.core.settings import Settings, setting

__all__ = [
    "Region",
    "SamRefineConfig",
    "downsample",
    "find_regions",
    "get_preprocess_shape",
    "mark_uncertain",
    "mask_prompt",
    "merge_refined",
    "refine_labels",
    "scale_prompts",
]


@dataclass(frozen=True)
class SamRefineConfig(Settings):
    """Settings of the SAM refinement (section ``sam_refine``; trident.md §8, §9, T-Q9)."""

    section: ClassVar[str] = "sam_refine"

    coarse_thresh: float = setting(
        0.2, range=(0.0, 1.0),
        doc="τ_c: classes and pixels with probability below it are not prompted (0 = nothing excluded)",
    )
    min_area: int = setting(225, range=(1, None), doc="smallest region prompted, in pixels at half resolution")
    mask_alpha: float = setting(0.005, range=(0.0, None), doc="α: scale of the mask prompt (α·P where P > τ_c)")
    iou_thresh: float = setting(0.8, range=(0.0, 1.0), doc="a SAM mask is accepted iff its IoU prediction > this")
    down_ratio: int = setting(2, range=(1, None), doc="r: prompts are built on the maps downsampled by r (official 2)")
    unbatched_mask: bool = setting(
        True,
        doc="pass the mask prompt as 1×L×L without batch dim, as the official code does (T-Q9); false = 1×1×L×L",
    )


@dataclass(frozen=True)
class Region:
    """One prompted region of a class at half resolution (§8 step 3).

    Attributes:
        cls: class index.
        mask: (h, w) bool, the 8-connected component.
        point: ``(x, y)``, the row-major first argmax of ``P↓_cls·1_R``.
        box: ``(x_min, y_min, x_max, y_max)``, inclusive (``torchvision.ops.masks_to_boxes``).
    """

    cls: int
    mask: torch.Tensor
    point: tuple[int, int]
    box: tuple[int, int, int, int]


# ---------------------------------------------------------------------------------------------------- prompts
def downsample(probs: torch.Tensor, labels: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """§8 step 1: ``P↓`` (bilinear, align_corners False) and ``L↓`` (PyTorch 'nearest') at ``(H0//r, W0//r)``.

    Args:
        probs: (C, H0, W0) class probabilities.
        labels: (H0, W0) integer labels.
        ratio: r ≥ 1.

    Returns:
        ``(P↓ (C, h, w) float, L↓ (h, w) int64)``.
    """
    _check_maps(probs, labels)
    if int(ratio) != ratio or ratio < 1:
        raise ValueError(f"down ratio must be an integer >= 1, got {ratio!r}")
    h0, w0 = labels.shape
    size = (h0 // int(ratio), w0 // int(ratio))
    if min(size) < 1:
        raise ValueError(f"a {h0}×{w0} map is smaller than the down ratio {ratio}: use a smaller down_ratio")
    p = probs if probs.is_floating_point() else probs.float()
    probs_half = F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)[0]
    # 'nearest' on a float copy: integer interpolation is not supported on every device.
    labels_half = F.interpolate(labels[None, None].double(), size=size, mode="nearest")[0, 0].long()
    return probs_half, labels_half


def mark_uncertain(labels_half: torch.Tensor, probs_half: torch.Tensor, coarse_thresh: float) -> torch.Tensor:
    """§8 step 2: a copy of ``L↓`` with label ``C`` (never prompted) where ``max_c P↓ < τ_c``, only if ``τ_c > 0``."""
    _check_maps(probs_half, labels_half)
    out = labels_half.clone().long()
    if coarse_thresh > 0:
        out[probs_half.max(dim=0).values < coarse_thresh] = probs_half.shape[0]
    return out


def find_regions(
    probs_half: torch.Tensor, labels_half: torch.Tensor, coarse_thresh: float, min_area: int
) -> list[Region]:
    """§8 step 3 (``split_connected_regions``): the prompted regions of every class, class by class.

    For each class c < C whose ``max P↓_c ≥ τ_c``: the 8-connected components of ``{L↓ = c}``
    (``scipy.ndimage.label`` with a 3×3 ones structure, equal to ``skimage.measure.label(connectivity=2)``) with at
    least ``min_area`` pixels, in label order.

    Args:
        probs_half: (C, h, w) ``P↓``.
        labels_half: (h, w) ``L↓`` after :func:`mark_uncertain` (label C is never a class).
        coarse_thresh: τ_c.
        min_area: smallest component kept, in half-resolution pixels.
    """
    _check_maps(probs_half, labels_half, allow_extra_label=True)
    if int(min_area) != min_area or min_area < 1:
        raise ValueError(f"min_area must be an integer >= 1, got {min_area!r}")
    probs_np = probs_half.detach().cpu().numpy()
    labels_np = labels_half.detach().cpu().numpy()
    structure = np.ones((3, 3), dtype=bool)
    regions: list[Region] = []
    for c in range(probs_np.shape[0]):
        if probs_np[c].max() < coarse_thresh:
            continue
        components, count = ndimage.label(labels_np == c, structure=structure)
        if count == 0:
            continue
        areas = np.bincount(components.ravel(), minlength=count + 1)
        for k in range(1, count + 1):
            if areas[k] < min_area:
                continue
            region = components == k
            # np.argmax returns the first maximum of the row-major flattening (§12 answer 15).
            y, x = divmod(int(np.argmax(probs_np[c] * region)), region.shape[1])
            ys, xs = np.nonzero(region)
            regions.append(Region(
                cls=c,
                mask=torch.from_numpy(region).to(probs_half.device),
                point=(x, y),
                box=(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
            ))
    return regions


def get_preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """SAM's ``ResizeLongestSide.get_preprocess_shape``: ``scale = long/max(h, w)``, each side ``int(x·scale + 0.5)``."""
    if h < 1 or w < 1 or long_side < 1:
        raise ValueError(f"sizes must be positive, got h={h}, w={w}, long_side={long_side}")
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def mask_prompt(
    prob_half_c: torch.Tensor,
    original_size: tuple[int, int],
    coarse_thresh: float,
    alpha: float,
    low_res: int = 256,
) -> torch.Tensor:
    """§8 step 4, mask prompt of one class (one per class, shared by its regions).

    ``P↓_c`` is resized bilinearly (align_corners False) to ``get_preprocess_shape(H0, W0, low_res)`` of the
    *original* size (T-Q14), zero-padded right and bottom to ``low_res²``, and set to ``α·value`` where
    ``value > τ_c``, 0 elsewhere.

    Args:
        prob_half_c: (h, w) half-resolution probability of the class.
        original_size: ``(H0, W0)``.
        coarse_thresh: τ_c.
        alpha: α.
        low_res: the decoder's mask-input side (256 for SAM; 4 × the embedding grid, §12 answer 16).

    Returns:
        (1, low_res, low_res) float32, without batch dimension (T-Q9).
    """
    if prob_half_c.dim() != 2:
        raise ValueError(f"prob_half_c must be (h, w), got shape {tuple(prob_half_c.shape)}")
    nh, nw = get_preprocess_shape(int(original_size[0]), int(original_size[1]), int(low_res))
    x = F.interpolate(prob_half_c.float()[None, None], size=(nh, nw), mode="bilinear", align_corners=False)
    x = F.pad(x, (0, low_res - nw, 0, low_res - nh))[0]
    return torch.where(x > coarse_thresh, alpha * x, torch.zeros_like(x))


def scale_prompts(
    points: torch.Tensor, boxes: torch.Tensor, half_size: tuple[int, int], long_side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """§8 step 4, points and boxes from the half-resolution frame to SAM's input frame (T-Q14, reproduced).

    x is scaled by ``w'/w`` and y by ``h'/h`` with ``(h', w') = get_preprocess_shape(h, w, long_side)`` of the
    half-resolution map ``(h, w)``.

    Args:
        points: (n, 2) ``(x, y)``.
        boxes: (n, 4) ``(x_min, y_min, x_max, y_max)``.
        half_size: ``(h, w)``.
        long_side: SAM's input side (the image encoder's ``img_size``, 1024 for SAM).

    Returns:
        ``(points, boxes)`` float32.
    """
    if points.dim() != 2 or points.shape[-1] != 2 or boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"points must be (n, 2) and boxes (n, 4), got {tuple(points.shape)}, {tuple(boxes.shape)}")
    h, w = int(half_size[0]), int(half_size[1])
    nh, nw = get_preprocess_shape(h, w, int(long_side))
    xy = torch.tensor([nw / w, nh / h], dtype=torch.float64, device=points.device)
    p = points.to(torch.float64) * xy
    b = boxes.to(torch.float64) * xy.repeat(2)
    return p.float(), b.float()


# ---------------------------------------------------------------------------------------------------- merge
def merge_refined(
    probs: torch.Tensor,
    labels: torch.Tensor,
    accepted: Mapping[int, Sequence[tuple[torch.Tensor, torch.Tensor]]],
) -> torch.Tensor:
    """§8 steps 7-8 (``map_refinement_coarse`` + the fallback): refined labels from the accepted SAM masks.

    Per class c with accepted masks: ``U_c`` = union of the masks, ``S_c = max_i σ(ℓ_i)·P_c``,
    ``R_c = S_c·1[U_c]``; ``R_c = 0`` for the other classes. The label is ``argmax_c R_c`` (lowest index on ties),
    and ``labels`` wherever ``Σ_c R_c = 0``. Failed regions never change the labels (T-Q10), so they are not inputs.

    Args:
        probs: (C, H0, W0) probabilities.
        labels: (H0, W0) coarse labels after ``prob_thd``.
        accepted: class → list of ``(mask (H0, W0) bool, logits (H0, W0))``.

    Returns:
        (H0, W0) int64.
    """
    _check_maps(probs, labels)
    num_classes = probs.shape[0]
    dtype = torch.promote_types(probs.dtype, torch.float32)
    refined = torch.zeros(probs.shape, dtype=dtype, device=probs.device)
    for c, items in accepted.items():
        if not 0 <= int(c) < num_classes:
            raise ValueError(f"accepted masks for class {c}, but there are {num_classes} classes (0..{num_classes - 1})")
        if len(items) == 0:
            continue
        union = torch.zeros(labels.shape, dtype=torch.bool, device=probs.device)
        score = torch.zeros(labels.shape, dtype=dtype, device=probs.device)
        for mask, logit in items:
            if mask.shape != labels.shape or logit.shape != labels.shape:
                raise ValueError(
                    f"class {c}: mask {tuple(mask.shape)} and logits {tuple(logit.shape)} must match the labels' "
                    f"{tuple(labels.shape)}"
                )
            union |= mask.to(device=probs.device, dtype=torch.bool)
            score = torch.maximum(score, torch.sigmoid(logit.to(device=probs.device, dtype=dtype)) * probs[c].to(dtype))
        refined[int(c)] = score * union
    out = refined.argmax(dim=0)
    fallback = refined.sum(dim=0) == 0
    return torch.where(fallback, labels.to(device=probs.device, dtype=torch.int64), out)


# ---------------------------------------------------------------------------------------------------- SAM call
def refine_labels(
    probs: torch.Tensor, labels: torch.Tensor, predictor: Any, config: SamRefineConfig
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Trident's SAM refinement, §8 steps 1-8.

    Args:
        probs: (C, H0, W0) probabilities after the synonym max, at the original size.
        labels: (H0, W0) labels after ``prob_thd``, in ``0..C-1``.
        predictor: a ``segment_anything.SamPredictor`` whose image is set (the image rounded up to a multiple of
            the CLIP patch, T-Q14). Its prompt encoder and mask decoder must be float32 (§12 answer 17); features
            from a half-precision encoder are cast to float32 for the call.
        config: the ``sam_refine`` section.

    Returns:
        ``(labels (H0, W0) int64, info)``; ``info`` holds ``regions`` (class → region count), ``accepted`` (total
        accepted masks), ``accepted_per_class`` and ``iou`` (class → IoU predictions of its regions). When no mask
        is accepted, ``labels`` is returned unchanged (step 5).
    """
    if not isinstance(config, SamRefineConfig):
        raise TypeError(f"config must be a SamRefineConfig, got {type(config).__name__}")
    _check_maps(probs, labels)
    if not torch.isfinite(probs).all():
        raise ValueError("probs contains NaN or infinity: refine the output of a finite forward pass")
    low_res, long_side = _check_predictor(predictor)
    h0, w0 = labels.shape
    labels = labels.long()

    probs_half, labels_half = downsample(probs, labels, config.down_ratio)
    labels_half = mark_uncertain(labels_half, probs_half, config.coarse_thresh)
    regions = find_regions(probs_half, labels_half, config.coarse_thresh, config.min_area)
    half_size = tuple(labels_half.shape)

    by_class: dict[int, list[Region]] = {}
    for region in regions:
        by_class.setdefault(region.cls, []).append(region)
    info: dict[str, Any] = {
        "regions": {c: len(r) for c, r in by_class.items()}, "accepted": 0, "accepted_per_class": {}, "iou": {},
    }

    device = predictor.device
    accepted: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    features = predictor.features
    # §12 answer 17: the decoder runs in float32 even when the encoder ran in half precision (official line 133).
    if features is not None and features.dtype != torch.float32:
        predictor.features = features.float()
    try:
        for c, class_regions in by_class.items():
            points = torch.tensor([r.point for r in class_regions], dtype=torch.float64)
            boxes = torch.tensor([r.box for r in class_regions], dtype=torch.float64)
            points, boxes = scale_prompts(points, boxes, half_size, long_side)
            mask_in = mask_prompt(probs_half[c], (h0, w0), config.coarse_thresh, config.mask_alpha, low_res)
            if not config.unbatched_mask:
                mask_in = mask_in[None]
            n = len(class_regions)
            _, iou, low_res_logits = predictor.predict_torch(
                points[:, None, :].to(device),
                torch.ones((n, 1), dtype=torch.int, device=device),
                boxes.to(device),
                mask_in.to(device),
                multimask_output=False,
                return_logits=True,
            )
            scores = iou.reshape(n).float()
            info["iou"][c] = [float(s) for s in scores]
            keep = scores > config.iou_thresh  # strict (official line 158)
            k = int(keep.sum())
            info["accepted_per_class"][c] = k
            if k == 0:
                continue
            info["accepted"] += k
            logits = predictor.model.postprocess_masks(
                low_res_logits[keep.to(low_res_logits.device)], predictor.input_size, predictor.original_size
            )
            if tuple(logits.shape[-2:]) != (h0, w0):
                # The predictor holds the p-rounded image (§8 step 6, official lines 181-186).
                logits = F.interpolate(logits, size=(h0, w0), mode="bilinear", align_corners=False)
            logits = logits[:, 0].to(probs.device)
            accepted[c] = [(logit > 0, logit) for logit in logits]
    finally:
        predictor.features = features

    if not accepted:
        return labels, info
    return merge_refined(probs, labels, accepted), info


# ---------------------------------------------------------------------------------------------------- checks
def _check_maps(probs: torch.Tensor, labels: torch.Tensor, allow_extra_label: bool = False) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 3 or probs.shape[0] < 1:
        raise ValueError(f"probs must be a (C, H, W) tensor with C >= 1, got {getattr(probs, 'shape', type(probs))}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels must be an (H, W) tensor, got {getattr(labels, 'shape', type(labels))}")
    if tuple(labels.shape) != tuple(probs.shape[1:]):
        raise ValueError(f"labels {tuple(labels.shape)} and probs {tuple(probs.shape)} must share (H, W)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    top = probs.shape[0] + (1 if allow_extra_label else 0)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= top):
        raise ValueError(
            f"labels must lie in 0..{top - 1} for {probs.shape[0]} classes, got {int(labels.min())}..{int(labels.max())}"
            " (map ignore values to a class before refining)"
        )


def _check_predictor(predictor: Any) -> tuple[int, int]:
    """``(low_res, long_side)`` of a ready predictor, or a clear error."""
    model = getattr(predictor, "model", None)
    if model is None or not hasattr(predictor, "predict_torch"):
        raise TypeError(
            f"predictor must be a segment_anything SamPredictor (install cass_plugins[sam]), got {type(predictor).__name__}"
        )
    if not getattr(predictor, "is_image_set", False):
        raise RuntimeError("the SAM predictor holds no image: call set_image (SamBackbone.encode(keep_for_refine=True)) first")
    size = tuple(model.prompt_encoder.mask_input_size)
    if size[0] != size[1]:
        raise ValueError(f"SAM's mask input must be square (4 × a square embedding grid), got {size}")
    for part in ("prompt_encoder", "mask_decoder"):
        dtypes = {p.dtype for p in getattr(model, part).parameters()}
        if dtypes - {torch.float32}:
            raise ValueError(
                f"SAM's {part} is {sorted(map(str, dtypes))}; the refinement runs it in float32 (trident.md §12 answer "
                f"17): call sam.{part}.float() (the image encoder may stay in half precision)"
            )
    return int(size[0]), int(model.image_encoder.img_size)
