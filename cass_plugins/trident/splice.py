"""Trident's splice: the CLIP input re-resize, the window maps' alignment and their average (pure tensor maths).

docs/spec/trident.md §2.1 (``seg_utils/utils.py:9-25``), §4 (``open_clip/transformer.py:586-618``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["align_to_clip_grid", "clip_input_size", "resize_to_patch_multiple", "splice_windows"]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def clip_input_size(height: int, width: int, patch: int, crop: int) -> tuple[int, int]:
    """The CLIP input size of §2.1: both sides multiples of ``patch`` and at least ``crop``.

    The long side goes up to a multiple of the patch, the short side is scaled by the same factor (``int``), then
    both are rounded up to multiples of the patch and raised to the crop. An input whose sides are already multiples
    is kept, except that it too is raised to the crop (T-Q7, fixed: the official early return lets a side below the
    crop through, and its splice then fails on a shape mismatch; no shipped configuration reaches it).
    """
    if height < 1 or width < 1 or patch < 1 or crop < 1:
        raise ValueError(f"sizes must be positive, got {height}x{width}, patch {patch}, crop {crop}")
    if height % patch == 0 and width % patch == 0:
        return max(height, crop), max(width, crop)
    long = max(height, width)
    target = _round_up(long, patch)
    h = _round_up(int(height * target / long), patch)
    w = _round_up(int(width * target / long), patch)
    return max(h, crop), max(w, crop)


def resize_to_patch_multiple(image: Tensor, patch: int, crop: int) -> Tensor:
    """§2.1: bilinearly resize the CLIP-normalised ``(B, 3, h, w)`` input to :func:`clip_input_size`.

    The resize acts on the normalised float image without antialiasing, as the official code does; the aspect
    ratio can change slightly (T-Q6, reproduced: 448×597 → 464×608).
    """
    h, w = image.shape[-2:]
    size = clip_input_size(h, w, patch, crop)
    if size == (h, w):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


def align_to_clip_grid(maps: Tensor, clip_grid: tuple[int, int]) -> tuple[Tensor, int]:
    """§4 step 2: bring the window maps onto a multiple of the CLIP grid before splicing.

    Args:
        maps: ``(B, D, gv_h, gv_w)`` per-window maps on the block's output grid (the VFM grid for ProxyCLIP).
        clip_grid: ``(gc_h, gc_w)`` the CLIP token grid of one window.

    Returns:
        the maps on ``(gc_h·r, gc_w·r)`` and ``r``: ``r = gv // gc`` when the output grid is a multiple of the CLIP
        grid (the maps are kept as they are), else ``round(gv / gc)`` with a bilinear resize (H/14 with DINO /16:
        21 → 24). ``r`` is taken along the rows; the columns follow the same rule.
    """
    gv, gc = maps.shape[-2], clip_grid[0]
    ratio = gv // gc if gv % gc == 0 else max(1, round(gv / gc))
    target = (clip_grid[0] * ratio, clip_grid[1] * ratio)
    if tuple(maps.shape[-2:]) == target:
        return maps, ratio
    return F.interpolate(maps, size=target, mode="bilinear", align_corners=False), ratio


def splice_windows(maps: Tensor, boxes: Sequence[tuple[int, int, int, int]], grid: tuple[int, int]) -> Tensor:
    """§4 step 3: the mean of the window maps at each position of the image grid.

    Args:
        maps: ``(B, D, h, w)`` one map per window, already on the splice grid.
        boxes: ``(y1, y2, x1, x2)`` of each window on that grid (the pipeline's window order and convention).
        grid: ``(GH, GW)`` the image on the splice grid.

    Returns:
        ``(D, GH, GW)`` float32 (float64 for float64 maps); every position must be covered by a window.
    """
    if maps.shape[0] != len(boxes):
        raise ValueError(f"{maps.shape[0]} window maps for {len(boxes)} boxes")
    dtype = torch.promote_types(maps.dtype, torch.float32)
    acc = maps.new_zeros((maps.shape[1], *grid), dtype=dtype)
    count = maps.new_zeros(grid, dtype=dtype)
    for window, (y1, y2, x1, x2) in zip(maps, boxes):
        if (y2 - y1, x2 - x1) != tuple(window.shape[-2:]):
            raise ValueError(f"window box {(y1, y2, x1, x2)} does not match its map of {tuple(window.shape[-2:])}")
        acc[:, y1:y2, x1:x2] += window.to(dtype)
        count[y1:y2, x1:x2] += 1
    if bool((count == 0).any()):
        raise ValueError("the windows leave positions of the grid uncovered")
    return acc / count
