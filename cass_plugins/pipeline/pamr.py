"""PAMR: pixel-adaptive mask refinement (baselines.md §4, protocol.md §9).

Each pixel's mask becomes an affinity-weighted mean of its 8 dilated neighbours per dilation. The affinity
``softmax_p(mean_channels(−|I(x) − I(x+o_p)| / (1e-8 + 0.1·σ(x))))`` is computed once from the guide image; σ is the
unbiased local standard deviation over the dilated 3×3 neighbourhoods (centre included once per dilation). Borders
use replicate padding.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PAMR", "apply_pamr", "neighbour_offsets"]


def neighbour_offsets(dilation: int) -> list[tuple[int, int]]:
    """The 8 ``(dy, dx)`` offsets of one dilation, in the reference order (row-major, centre skipped)."""
    d = dilation
    return [(-d, -d), (-d, 0), (-d, d), (0, -d), (0, d), (d, -d), (d, 0), (d, d)]


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    # View of x(y + dy, x + dx) for every pixel, taken from an input replicate-padded by `pad` on every side.
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


class PAMR(nn.Module):
    """Pixel-adaptive mask refinement with a fixed affinity.

    Args:
        num_iter: number of propagation steps (0 returns the mask unchanged, apart from the resize and dtype).
        dilations: neighbourhood dilations ``D``; ``8·|D|`` neighbours per pixel.
    """

    def __init__(self, num_iter: int = 1, dilations: Sequence[int] = (8, 16)) -> None:
        super().__init__()
        if num_iter < 0:
            raise ValueError(f"num_iter must be >= 0, got {num_iter}.")
        if not dilations or any(int(d) != d or d < 1 for d in dilations):
            raise ValueError(f"dilations must be a non-empty sequence of positive integers, got {dilations!r}.")
        self.num_iter = int(num_iter)
        self.dilations = tuple(int(d) for d in dilations)

    def extra_repr(self) -> str:
        return f"num_iter={self.num_iter}, dilations={self.dilations}"

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """Neighbour weights ``(B, 8·|D|, H, W)`` (they sum to 1 over dim 1) for a guide image ``(B, K, H, W)``."""
        height, width = image.shape[-2:]
        neighbours, samples = [], []
        for d in self.dilations:
            padded = F.pad(image, (d, d, d, d), mode="replicate")
            shifted = [_shifted(padded, d, dy, dx, height, width) for dy, dx in neighbour_offsets(d)]
            neighbours.extend(shifted)
            # The std sample holds the centre once per dilation (9 values per dilation, 9·|D| in all).
            samples.append(image)
            samples.extend(shifted)
        std = torch.stack(samples, dim=2).std(dim=2, unbiased=True)  # (B, K, H, W)
        diff = torch.stack(neighbours, dim=2).sub_(image.unsqueeze(2)).abs_()  # (B, K, P, H, W)
        logits = -diff / (1e-8 + 0.1 * std.unsqueeze(2))
        return torch.softmax(logits.mean(dim=1), dim=1)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Refine ``mask`` ``(B, C, h, w)`` guided by ``image`` ``(B, K, H, W)``.

        The mask is first resized to ``(H, W)`` (bilinear, ``align_corners=True``, as the reference; a no-op when the
        sizes match). Computation runs in the image's dtype (at least float32); the result has the mask's dtype.
        """
        if image.dim() != 4 or mask.dim() != 4 or image.shape[0] != mask.shape[0]:
            raise ValueError(
                f"PAMR expects image (B, K, H, W) and mask (B, C, h, w) with the same B, got {tuple(image.shape)} "
                f"and {tuple(mask.shape)}."
            )
        work = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
        image = image.to(work)
        height, width = image.shape[-2:]
        out_dtype = mask.dtype
        m = mask.to(work)
        if tuple(m.shape[-2:]) != (height, width):
            m = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=True)
        if self.num_iter == 0:
            return m.to(out_dtype)
        aff = self.affinity(image)
        for _ in range(self.num_iter):
            # Accumulate neighbour by neighbour instead of stacking (B, C, 8·|D|, H, W): the mask holds one plane per
            # query at the original image size, so the stacked tensor is what makes the reference run out of memory.
            new = torch.zeros_like(m)
            p = 0
            for d in self.dilations:
                padded = F.pad(m, (d, d, d, d), mode="replicate")
                for dy, dx in neighbour_offsets(d):
                    new.addcmul_(_shifted(padded, d, dy, dx, height, width), aff[:, p : p + 1])
                    p += 1
            m = new
        return m.to(out_dtype)


def apply_pamr(
    image: torch.Tensor,
    logits: torch.Tensor,
    num_iter: int,
    dilations: Sequence[int] = (8, 16),
) -> torch.Tensor:
    """Run :class:`PAMR` on logits, skipping it with a warning if it fails at run time (NACLIP / CASS behaviour).

    Shapes are checked before running, so the ``RuntimeError`` caught here (``torch.OutOfMemoryError`` is one) comes
    from the computation itself, typically running out of memory on a large image with many queries; the reference
    logs a warning and keeps the unrefined logits for that image, and so does this function.

    Args:
        image: guide image ``(3, H, W)`` or ``(B, 3, H, W)``, the normalised input resized to the logits' size.
        logits: ``(K, H, W)`` or ``(B, K, H, W)`` logits.
        num_iter: propagation steps; 0 returns ``logits`` untouched.
        dilations: neighbourhood dilations.

    Returns:
        Refined logits with the shape and dtype of ``logits`` (the input itself if skipped).
    """
    if num_iter == 0:
        return logits
    unbatched = logits.dim() == 3
    img = image.unsqueeze(0) if image.dim() == 3 else image
    msk = logits.unsqueeze(0) if unbatched else logits
    if img.dim() != 4 or msk.dim() != 4 or img.shape[0] != msk.shape[0]:
        raise ValueError(
            f"apply_pamr expects image (3, H, W) / (B, 3, H, W) and logits (K, H, W) / (B, K, H, W) with the same B, "
            f"got {tuple(image.shape)} and {tuple(logits.shape)}."
        )
    module = PAMR(num_iter, dilations)
    try:
        out = module(img, msk)
    except RuntimeError as err:  # includes torch.OutOfMemoryError
        warnings.warn(f"PAMR skipped for this image ({type(err).__name__}: {err}).", RuntimeWarning, stacklevel=2)
        return logits
    return out.squeeze(0) if unbatched else out
