"""Object presence prior (OPS; CASS §3.3, Eq. 8–9; docs/spec/cass.md §3): blend patch logits with the image-level
text similarity."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cass_plugins.core.hookspecs import LogitsContext, hookimpl
from cass_plugins.core.patch import cosine_prior
from cass_plugins.core.settings import Settings, setting

__all__ = ["PresencePriorHead", "PresencePriorConfig", "PresencePriorPlugin", "PRIOR_LEGACY_KEYS"]


@dataclass(frozen=True)
class PresencePriorConfig(Settings):
    """Settings of the presence prior (``ops``); per-dataset values in docs/spec/cass.md §7."""

    gamma: float = setting(0.2, range=(0.0, 1.0), doc="γ of S* = (1 − γ)·S + γ·P")


#: Flat keys of versions before 0.2.
PRIOR_LEGACY_KEYS = {"gamma": "gamma"}


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
        """Cosine similarity of each image embedding with each query (:func:`~cass_plugins.core.patch.cosine_prior`).

        Args:
            image_embedding: (B, d) or (d,).
            text: (Q, d).

        Returns:
            (B, Q) in the promoted dtype of the inputs (at least float32).
        """
        return cosine_prior(image_embedding, text)

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


class PresencePriorPlugin:
    """OPS as a component (``components=["ops"]``): blends each window's logits with the presence prior."""

    def __init__(self, config: PresencePriorConfig, runtime: Any = None) -> None:
        self.config = config
        self.head = PresencePriorHead(config.gamma)

    @hookimpl
    def cass_refine_logits(self, ctx: LogitsContext) -> None:
        if ctx.prior is None:
            raise RuntimeError("the presence prior was not computed; run through PatchHandle.logits or a Segmenter")
        ctx.logits = self.head(ctx.logits, ctx.prior)
