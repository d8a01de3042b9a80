"""``SegmentationResult``: what :meth:`~cass_plugins.pipeline.segmenter.Segmenter.segment` returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cass_plugins.pipeline.vocabulary import Vocabulary

__all__ = ["SegmentationResult"]


@dataclass
class SegmentationResult:
    """Output of :meth:`Segmenter.segment`, at the original image size unless ``segment(..., maps=False)``.

    Attributes:
        labels: ``(H, W)`` int64 class indices into ``vocabulary.class_names`` (always at the original size).
        probs: ``(C, H, W)`` per-class probabilities (max over synonyms, not renormalised); ``None`` with
            ``maps=False``.
        logits: ``(Q, H, W)`` raw cosine logits per query (after the prior and PAMR, before the logit scale); with
            ``maps=False`` the ``(Q, h, w)`` logits at the resized input's size, before PAMR, from which the labels
            were upsampled.
        vocabulary: the vocabulary used.
        record: per-image inspection data: ``"windows"`` the ``(y1, y2, x1, x2)`` box of every window (one
            whole-image box in whole mode); ``"matching"`` one :class:`~cass_plugins.cass.matching.HeadMatching` per
            window in the same order (assignment, weights, margin, cost; empty without spectral distillation;
            for baselines with two graphs the first graph's, all of them under ``"matching_per_source"``);
            ``"ota_clusters"`` the OTA clusters as tuples of query names; and what components added through
            ``ImageContext.record``.
    """

    labels: Tensor
    probs: Tensor | None
    logits: Tensor
    vocabulary: Vocabulary
    record: dict[str, Any] = field(default_factory=dict)

    def class_areas(self) -> dict[str, float]:
        """Fraction of the image assigned to each class (classes with zero area included)."""
        counts = torch.bincount(self.labels.flatten().cpu(), minlength=self.vocabulary.num_classes)
        total = float(self.labels.numel())
        return {name: counts[i].item() / total for i, name in enumerate(self.vocabulary.class_names)}
