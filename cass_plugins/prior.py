"""Object presence prior (OPS, cass.md §3): blend patch logits with the image-level text similarity."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PresencePriorHead"]


class PresencePriorHead(nn.Module):
    """``S* = (1 − γ)·S + γ·P`` with ``P[b, c] = cos(v_img[b], t_c)`` broadcast over every patch.

    Works on plain tensors; the image embedding is the CLIP image embedding of the whole image (or of the crop,
    in the Cityscapes preset) and ``text`` the UNADJUSTED query embeddings (cass.md §9).

    Args:
        gamma: weight of the prior, in [0, 1]; 0 disables it (logits returned untouched).
    """

    def __init__(self, gamma: float) -> None:
        super().__init__()
        gamma = float(gamma)
        if not (math.isfinite(gamma) and 0.0 <= gamma <= 1.0):
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.gamma = gamma

    @staticmethod
    def prior(image_embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each image embedding with each query (no softmax, no temperature).

        Args:
            image_embedding: (B, d) or (d,).
            text: (Q, d).

        Returns:
            (B, Q) in the promoted dtype of the inputs (at least float32).
        """
        if image_embedding.dim() == 1:
            image_embedding = image_embedding.unsqueeze(0)
        if image_embedding.dim() != 2 or text.dim() != 2 or image_embedding.shape[-1] != text.shape[-1]:
            raise ValueError(f"expected image_embedding (B, d) and text (Q, d), got "
                             f"{tuple(image_embedding.shape)} and {tuple(text.shape)}")
        dtype = torch.promote_types(torch.promote_types(image_embedding.dtype, text.dtype), torch.float32)
        img = F.normalize(image_embedding.to(dtype), dim=-1)
        txt = F.normalize(text.to(device=img.device, dtype=dtype), dim=-1)
        return img @ txt.T

    def forward(self, logits: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Blend ``logits`` (B, Q, ...) with ``prior`` (B, Q) or (1, Q), broadcast over the trailing dims.

        The sum is computed in the promoted dtype and returned in ``logits.dtype``; with γ = 0 ``logits`` itself
        is returned.
        """
        if self.gamma == 0.0:
            return logits
        if prior.dim() == 1:
            prior = prior.unsqueeze(0)
        if logits.dim() < 2 or prior.dim() != 2 or prior.shape[1] != logits.shape[1] \
                or prior.shape[0] not in (1, logits.shape[0]):
            raise ValueError(f"expected logits (B, Q, ...) and prior (B, Q), got "
                             f"{tuple(logits.shape)} and {tuple(prior.shape)}")
        dtype = torch.promote_types(logits.dtype, prior.dtype)
        p = prior.to(device=logits.device, dtype=dtype).reshape(*prior.shape, *([1] * (logits.dim() - 2)))
        out = (1.0 - self.gamma) * logits.to(dtype) + self.gamma * p
        return out.to(logits.dtype)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"
