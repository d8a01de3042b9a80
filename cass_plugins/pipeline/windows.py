"""Sliding-window geometry and logit accumulation (protocol.md §7).

Windows are square crops of side ``crop`` placed every ``stride`` pixels, shifted back so the last one is flush with
the bottom / right border, with no padding. Each window's grid-level logits are bilinearly up-sampled to the window
size, summed into a canvas and divided by the per-pixel window count (cosine logits are averaged before any softmax).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Window", "window_grid", "SlidingWindowAccumulator", "iter_window_batches"]

Window = tuple[int, int, int, int]
"""``(y1, y2, x1, x2)``: rows ``y1:y2`` and columns ``x1:x2`` of the image."""


def _num_grids(side: int, crop: int, stride: int) -> int:
    return max(side - crop + stride - 1, 0) // stride + 1


def window_grid(H: int, W: int, crop: int, stride: int) -> list[Window]:
    """All sliding windows of an ``H × W`` image, row-major (rows outer, columns inner), as the reference loops.

    ``h_grids = max(H − crop + stride − 1, 0) // stride + 1`` (same for ``w``); window ``(i, j)`` starts at
    ``(i·stride, j·stride)``, ends at ``min(start + crop, side)`` and is shifted back to start at
    ``max(end − crop, 0)``. A side shorter than ``crop`` gives one window spanning the whole side.

    Args:
        H: image height.
        W: image width.
        crop: window side.
        stride: step between window starts; must not exceed ``crop`` (a larger step can leave pixels uncovered).

    Returns:
        List of ``(y1, y2, x1, x2)``.
    """
    for name, value in (("H", H), ("W", W), ("crop", crop), ("stride", stride)):
        if int(value) != value or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if stride > crop:
        raise ValueError(f"stride ({stride}) must not exceed crop ({crop}); larger strides can leave gaps.")
    windows: list[Window] = []
    for i in range(_num_grids(H, crop, stride)):
        y2 = min(i * stride + crop, H)
        y1 = max(y2 - crop, 0)
        for j in range(_num_grids(W, crop, stride)):
            x2 = min(j * stride + crop, W)
            x1 = max(x2 - crop, 0)
            windows.append((y1, y2, x1, x2))
    return windows


def iter_window_batches(windows: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Group windows into batches of equal-size windows, at most ``batch_size`` each.

    Only windows of the same ``(height, width)`` can be stacked into one tensor; interior windows all have the crop
    size, and windows differ only when a side is shorter than the crop. Groups come in order of first appearance,
    windows keep their relative order inside a group, so with one size the batches are consecutive runs of the input.
    (Accumulating in a different order than the reference changes sums only at the float-rounding level.)

    Args:
        windows: windows from :func:`window_grid`.
        batch_size: maximum windows per batch (≥ 1).

    Yields:
        Lists of windows sharing one size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    groups: dict[tuple[int, int], list[Window]] = {}
    for win in windows:
        y1, y2, x1, x2 = win
        groups.setdefault((y2 - y1, x2 - x1), []).append(win)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


class SlidingWindowAccumulator:
    """Sums up-sampled window logits into an ``(K, H, W)`` canvas and averages them by the window count.

    Args:
        num_channels: ``K``, the number of logit channels (queries).
        H: image height.
        W: image width.
        device: canvas device.
        dtype: canvas dtype (the reference accumulates in the input's dtype, float32).
    """

    def __init__(
        self,
        num_channels: int,
        H: int,
        W: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_channels <= 0 or H <= 0 or W <= 0:
            raise ValueError(f"num_channels, H and W must be positive, got {num_channels}, {H}, {W}.")
        self.num_channels = num_channels
        self.H = H
        self.W = W
        self.preds = torch.zeros(num_channels, H, W, device=device, dtype=dtype)
        self.count = torch.zeros(1, H, W, device=device, dtype=dtype)

    def _check_window(self, window: Window) -> tuple[int, int]:
        y1, y2, x1, x2 = window
        if not (0 <= y1 < y2 <= self.H and 0 <= x1 < x2 <= self.W):
            raise ValueError(f"Window {window} is empty or outside the {self.H}×{self.W} image.")
        return y2 - y1, x2 - x1

    def _check_logits(self, logits: torch.Tensor, expected_dim: int) -> None:
        if logits.dim() != expected_dim or logits.shape[-3] != self.num_channels:
            lead = "(K, h, w)" if expected_dim == 3 else "(B, K, h, w)"
            raise ValueError(
                f"Expected window logits {lead} with K = {self.num_channels}, got shape {tuple(logits.shape)}."
            )

    def _upsample(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # logits: (B, K, h', w'); identical sizes are an exact identity for align_corners=False, so skip the call.
        logits = logits.to(device=self.preds.device, dtype=self.preds.dtype)
        if tuple(logits.shape[-2:]) == size:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def add(self, window: Window, crop_logits: torch.Tensor) -> None:
        """Add one window's grid-level logits ``(K, h', w')``, up-sampled to the window size."""
        size = self._check_window(window)
        self._check_logits(crop_logits, 3)
        up = self._upsample(crop_logits.unsqueeze(0), size)[0]
        y1, y2, x1, x2 = window
        self.preds[:, y1:y2, x1:x2] += up
        self.count[:, y1:y2, x1:x2] += 1

    def add_batch(self, windows: Sequence[Window], logits: torch.Tensor) -> None:
        """Add a batch: ``logits`` is ``(B, K, h', w')`` for ``B`` windows of one size (see :func:`iter_window_batches`)."""
        self._check_logits(logits, 4)
        if len(windows) != logits.shape[0]:
            raise ValueError(f"{len(windows)} windows but logits for {logits.shape[0]}.")
        sizes = {self._check_window(win) for win in windows}
        if len(sizes) != 1:
            raise ValueError(f"add_batch needs windows of one size, got sizes {sorted(sizes)}.")
        up = self._upsample(logits, sizes.pop())
        for (y1, y2, x1, x2), win_logits in zip(windows, up):
            self.preds[:, y1:y2, x1:x2] += win_logits
            self.count[:, y1:y2, x1:x2] += 1

    def result(self) -> torch.Tensor:
        """Averaged logits ``(K, H, W)``; raises ``RuntimeError`` if some pixel was never covered."""
        uncovered = int((self.count == 0).sum())
        if uncovered:
            raise RuntimeError(
                f"{uncovered} of {self.H * self.W} pixels are covered by no window; every pixel must be covered "
                "before averaging (were all windows of window_grid added?)."
            )
        return self.preds / self.count
