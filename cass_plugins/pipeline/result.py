"""``SegmentationResult``: what :meth:`~cass_plugins.pipeline.segmenter.Segmenter.segment` returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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

    def masks(self, dilate: int = 0, *, only_present: bool = True) -> dict[str, Tensor]:
        """Boolean ``(H, W)`` mask per class present in :attr:`labels` (all classes with ``only_present=False``),
        grown by ``dilate`` pixels (a Euclidean disk; for inpainting, so the seam falls outside the object).
        Masks of neighbouring classes overlap once dilated. See :mod:`cass_plugins.pipeline.export`."""
        from cass_plugins.pipeline.export import class_masks

        names = self.vocabulary.class_names
        return {k: torch.from_numpy(v) for k, v in class_masks(self.labels, names, dilate, only_present=only_present).items()}

    def to_coco(self, image_id: int = 1, file_name: str | None = None, *, dilate: int = 0) -> dict[str, Any]:
        """This image as a COCO JSON document: one ``iscrowd=1`` RLE annotation per present class (compressed
        ``counts`` string, what ``pycocotools.mask.encode`` gives), categories = the classes (id = index + 1)."""
        from cass_plugins.pipeline.export import coco_annotations, coco_document

        h, w = (int(s) for s in self.labels.shape)
        image = {"id": int(image_id), "file_name": file_name or f"{image_id}", "height": h, "width": w}
        names = self.vocabulary.class_names
        return coco_document([image], names, coco_annotations(self.labels, names, image_id, dilate=dilate))

    def save_masks(self, folder: str | Path, dilate: int = 0) -> dict[str, Path]:
        """Write ``folder/<class>.png`` (255 inside, 0 outside) per present class; returns class name → path.
        Class names are made portable, unique file names (:func:`~cass_plugins.pipeline.export.mask_filenames`)."""
        from cass_plugins.pipeline.export import write_mask_pngs

        return write_mask_pngs(folder, self.labels, self.vocabulary.class_names, dilate)

    def save_npz(self, path: str | Path) -> Path:
        """Write a compressed ``.npz`` with ``labels``, ``probs`` (float16 ``(C, H, W)``), ``class_names`` and
        ``synonyms`` (:func:`~cass_plugins.pipeline.export.save_npz`); needs :attr:`probs` (``segment(maps=True)``)."""
        from cass_plugins.pipeline.export import save_npz

        voc = self.vocabulary
        return save_npz(path, self.labels, self.probs, voc.class_names, [list(c) for c in voc.classes])
