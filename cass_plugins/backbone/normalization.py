"""Input normalisations: CLIP's (the 0–255 statistics of the mmseg-based reference code, docs/spec/protocol.md §6)
and the conversion of a CLIP-normalised crop to a VFM's input (docs/spec/cass.md §2.1, §9)."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "CLIP_MEAN_255", "CLIP_STD_255", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "clip_normalize", "to_vfm_normalization",
]

CLIP_MEAN_255: tuple[float, float, float] = (122.771, 116.746, 104.094)
CLIP_STD_255: tuple[float, float, float] = (68.501, 66.632, 70.323)
#: OpenAI CLIP's own 0–1 statistics (its preprocessing ``Normalize``). Not CLIP_*_255 / 255: the 255-scale values are
#: rounded to 3 decimals (e.g. 68.501 / 255 = 0.2686314 vs 0.26862954). ProxyCLIP undoes the 0–255 normalisation
#: of its crops with these (ProxyCLIP ``myutils.py``), see ``adapters.proxyclip``.
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _channel_view(values: Sequence[float], like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device).view(-1, 1, 1)


def clip_normalize(img_0_255: torch.Tensor) -> torch.Tensor:
    """Apply ``(x − CLIP_MEAN_255) / CLIP_STD_255`` per RGB channel.

    Args:
        img_0_255: ``(3, H, W)`` or ``(B, 3, H, W)`` RGB on the 0–255 scale (uint8 or float).

    Returns:
        Float tensor (float32 for integer input, otherwise the input's float dtype).
    """
    if img_0_255.dim() not in (3, 4) or img_0_255.shape[-3] != 3:
        raise ValueError(f"clip_normalize expects (3, H, W) or (B, 3, H, W), got shape {tuple(img_0_255.shape)}.")
    dtype = img_0_255.dtype if img_0_255.is_floating_point() else torch.float32
    x = img_0_255.to(dtype)
    return (x - _channel_view(CLIP_MEAN_255, x, dtype)) / _channel_view(CLIP_STD_255, x, dtype)


def to_vfm_normalization(
    clip_normalized: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    clip_mean: Sequence[float] = CLIP_MEAN_255,
    clip_std: Sequence[float] = CLIP_STD_255,
) -> torch.Tensor:
    """Re-normalise a CLIP-normalised image for a vision foundation model (0–1 scale statistics).

    Undoes CLIP's normalisation with ``clip_mean``/``clip_std`` (0–255 scale), divides by 255 and applies
    ``(x − mean) / std``. The three steps are folded into one affine map whose coefficients are computed in float64
    and applied in float64 (float32 on MPS, which has no float64), so the result equals the step-by-step
    computation up to the output dtype's rounding.

    The default undo constants are the exact inverse of :func:`clip_normalize` (CASS's rule). ProxyCLIP's code undoes
    the normalisation with OpenAI CLIP's 0–1 constants instead (:data:`OPENAI_CLIP_MEAN`/``STD`` × 255): its
    adapter passes those (docs/baselines.md, "VFM input rule").

    Args:
        clip_normalized: ``(3, H, W)`` or ``(B, 3, H, W)`` output of :func:`clip_normalize`.
        mean: the VFM's per-channel mean on the 0–1 scale (ImageNet's by default, as DINO / DINOv2).
        std: the VFM's per-channel std on the 0–1 scale.
        clip_mean: the per-channel mean the crop is taken to be normalised with, 0–255 scale.
        clip_std: the per-channel std, 0–255 scale.

    Returns:
        Tensor of the input's dtype and shape.
    """
    if clip_normalized.dim() not in (3, 4) or clip_normalized.shape[-3] != 3:
        raise ValueError(
            f"to_vfm_normalization expects (3, H, W) or (B, 3, H, W), got shape {tuple(clip_normalized.shape)}."
        )
    if any(len(v) != 3 for v in (mean, std, clip_mean, clip_std)):
        raise ValueError("mean, std, clip_mean and clip_std must have 3 entries (RGB).")
    x = clip_normalized
    # y = ((x·σ_c + μ_c) / 255 − μ) / σ = x·a + b
    a = [sc / (255.0 * s) for sc, s in zip(clip_std, std)]
    b = [(mc / 255.0 - m) / s for mc, m, s in zip(clip_mean, mean, std)]
    # MPS has no float64; float32 there is still within ~1e-6 of the exact map.
    work = torch.float32 if x.device.type == "mps" else torch.float64
    y = x.to(work) * _channel_view(a, x, work) + _channel_view(b, x, work)
    return y.to(x.dtype if x.is_floating_point() else torch.float32)
