"""Dataset-level IoU metric with mmseg ``IoUMetric`` semantics (protocol.md §10).

Per image, pixels whose label is ``ignore_index`` are dropped; the per-class areas
``I = hist(pred[pred == label])``, ``P = hist(pred)``, ``G = hist(label)`` and ``U = P + G − I`` are summed over
the dataset (int64 here, float32 in mmseg; the difference is rounding only). Values outside ``0..n−1`` fall out
of the histograms, as with ``torch.histc``. Then, in percent:

* ``IoU_k = I_k / U_k`` and ``Acc_k = I_k / G_k`` (NaN when the denominator is 0);
* ``mIoU`` / ``mAcc`` = nanmean over classes (a class never labelled and never predicted is excluded; a class
  predicted but never labelled has IoU 0 and counts);
* ``aAcc = ΣI / ΣG``, the pixel accuracy over all non-ignored pixels.

``pAcc`` (the "pixel accuracy" row of the CASS paper's results table, cass.md §8) is reported as an alias of
``aAcc``: mmseg, which produced the published numbers, logs only aAcc, mIoU and mAcc, and aAcc is its overall
pixel accuracy. mAcc is the class-averaged accuracy, a different quantity.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["IoUAccumulator"]

_FORMAT = "cass_plugins.IoUAccumulator/1"
_AREAS = ("area_intersect", "area_union", "area_pred_label", "area_label")


def _nanmean(values: np.ndarray) -> float:
    # np.nanmean warns on an all-NaN input; an empty evaluation simply has no score.
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


class IoUAccumulator:
    """Accumulates per-class intersection / union / prediction / label areas over a dataset.

    Args:
        num_classes: number of classes n; predictions and labels are class indices 0..n−1.
        ignore_index: label value whose pixels are dropped (255 in every benchmark).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.area_intersect = torch.zeros(num_classes, dtype=torch.int64)
        self.area_union = torch.zeros(num_classes, dtype=torch.int64)
        self.area_pred_label = torch.zeros(num_classes, dtype=torch.int64)
        self.area_label = torch.zeros(num_classes, dtype=torch.int64)
        self.num_images = 0
        # Non-ignored pixels whose label / prediction lies outside 0..n−1: mmseg drops them silently; counting
        # them exposes a wrong label encoding (e.g. a missing reduce_zero_label) instead of a quietly low score.
        self.invalid_label_pixels = 0
        self.invalid_pred_pixels = 0

    # ------------------------------------------------------------------------------------------------------------
    def update(self, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> None:
        """Add one image: ``pred`` and ``label`` are integer maps of the same (H, W) shape (a leading 1 is allowed).

        Raises:
            TypeError: a floating-point prediction (logits or probabilities were passed instead of labels).
            ValueError: the shapes differ.
        """
        pred_t = torch.as_tensor(pred)
        label_t = torch.as_tensor(label, device=pred_t.device)
        if pred_t.is_floating_point() or pred_t.is_complex():
            raise TypeError(f"pred must be an integer label map, got dtype {pred_t.dtype}")
        if pred_t.dim() == 3 and pred_t.shape[0] == 1:
            pred_t = pred_t[0]
        if label_t.dim() == 3 and label_t.shape[0] == 1:
            label_t = label_t[0]
        if pred_t.shape != label_t.shape:
            raise ValueError(f"pred shape {tuple(pred_t.shape)} != label shape {tuple(label_t.shape)}")
        pred_t = pred_t.reshape(-1).long()
        label_t = label_t.reshape(-1).long()
        keep = label_t != self.ignore_index
        pred_t, label_t = pred_t[keep], label_t[keep]
        n = self.num_classes
        pred_ok = (pred_t >= 0) & (pred_t < n)
        label_ok = (label_t >= 0) & (label_t < n)
        hit = (pred_t == label_t) & pred_ok
        area_i = torch.bincount(pred_t[hit], minlength=n).cpu()
        area_p = torch.bincount(pred_t[pred_ok], minlength=n).cpu()
        area_g = torch.bincount(label_t[label_ok], minlength=n).cpu()
        self.area_intersect += area_i
        self.area_pred_label += area_p
        self.area_label += area_g
        self.area_union += area_p + area_g - area_i
        self.invalid_label_pixels += int((~label_ok).sum())
        self.invalid_pred_pixels += int((~pred_ok).sum())
        self.num_images += 1

    # ------------------------------------------------------------------------------------------------------------
    def _check_compatible(self, other: IoUAccumulator) -> None:
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge accumulators with (num_classes, ignore_index) = "
                f"{(self.num_classes, self.ignore_index)} and {(other.num_classes, other.ignore_index)}"
            )

    def merge(self, other: IoUAccumulator) -> IoUAccumulator:
        """Add another accumulator's areas into this one (in place) and return self."""
        self._check_compatible(other)
        for key in _AREAS:
            getattr(self, key).add_(getattr(other, key))
        self.num_images += other.num_images
        self.invalid_label_pixels += other.invalid_label_pixels
        self.invalid_pred_pixels += other.invalid_pred_pixels
        return self

    def _counters(self) -> list[int]:
        return [self.num_images, self.invalid_label_pixels, self.invalid_pred_pixels]

    def all_reduce(self) -> IoUAccumulator:
        """Sum the areas over all torch.distributed ranks, in place (no-op when not initialised); returns self.

        Every rank must hold an accumulator with the same num_classes. Call it once: a second call would sum the
        already-reduced totals again.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        flat = torch.cat([getattr(self, k) for k in _AREAS] + [torch.tensor(self._counters(), dtype=torch.int64)])
        # NCCL only reduces CUDA tensors; gloo / mpi work on CPU.
        if torch.distributed.get_backend() == "nccl":
            flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat = flat.cpu()
        n = self.num_classes
        for i, key in enumerate(_AREAS):
            setattr(self, key, flat[i * n:(i + 1) * n].clone())
        self.num_images, self.invalid_label_pixels, self.invalid_pred_pixels = (int(v) for v in flat[4 * n:])
        return self

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (plain ints and lists) for resuming or cross-process merging."""
        state: dict[str, Any] = {
            "format": _FORMAT,
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "num_images": self.num_images,
            "invalid_label_pixels": self.invalid_label_pixels,
            "invalid_pred_pixels": self.invalid_pred_pixels,
        }
        for key in _AREAS:
            state[key] = getattr(self, key).tolist()
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> IoUAccumulator:
        """Rebuild an accumulator from :meth:`state_dict` output.

        Raises:
            ValueError: unknown format, wrong lengths, or areas that violate U = P + G − I.
        """
        if state.get("format") != _FORMAT:
            raise ValueError(f"not an IoUAccumulator state (format {state.get('format')!r}, expected {_FORMAT!r})")
        acc = cls(int(state["num_classes"]), int(state["ignore_index"]))
        for key in _AREAS:
            values = torch.tensor(state[key], dtype=torch.int64)
            if values.shape != (acc.num_classes,):
                raise ValueError(f"{key} has {values.numel()} entries, expected {acc.num_classes}")
            setattr(acc, key, values)
        if not torch.equal(acc.area_union, acc.area_pred_label + acc.area_label - acc.area_intersect):
            raise ValueError("inconsistent state: area_union != area_pred_label + area_label - area_intersect")
        acc.num_images = int(state["num_images"])
        acc.invalid_label_pixels = int(state.get("invalid_label_pixels", 0))
        acc.invalid_pred_pixels = int(state.get("invalid_pred_pixels", 0))
        return acc

    # ------------------------------------------------------------------------------------------------------------
    def compute(self, digits: int | None = 2) -> dict[str, Any]:
        """Metrics in percent, rounded to ``digits`` decimals as mmseg reports them (None: unrounded).

        Returns:
            dict with ``aAcc``, ``mIoU``, ``mAcc``, ``pAcc`` (= aAcc) as floats, per-class ``IoU`` and ``Acc``
            lists (NaN for classes excluded from the means), and ``num_images``, ``num_pixels``
            (non-ignored pixels with a valid label), ``invalid_label_pixels``, ``invalid_pred_pixels``.
        """
        inter = self.area_intersect.double().numpy()
        union = self.area_union.double().numpy()
        gt = self.area_label.double().numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / union  # 0/0 → NaN: never labelled and never predicted
            acc = inter / gt
        total = gt.sum()
        a_acc = inter.sum() / total if total > 0 else math.nan

        def pct(x: float | np.ndarray) -> Any:
            x = np.asarray(x, dtype=np.float64) * 100.0
            return np.round(x, digits) if digits is not None else x

        out: dict[str, Any] = {
            "aAcc": float(pct(a_acc)),
            "mIoU": float(pct(_nanmean(iou))),
            "mAcc": float(pct(_nanmean(acc))),
        }
        out["pAcc"] = out["aAcc"]
        out["IoU"] = [float(v) for v in pct(iou)]
        out["Acc"] = [float(v) for v in pct(acc)]
        out["num_images"] = self.num_images
        out["num_pixels"] = int(total)
        out["invalid_label_pixels"] = self.invalid_label_pixels
        out["invalid_pred_pixels"] = self.invalid_pred_pixels
        return out

    def markdown_table(self, class_names: Sequence[str], digits: int = 2) -> str:
        """Per-class IoU / Acc table followed by a summary row (aAcc, mIoU, mAcc), as Markdown.

        Raises:
            ValueError: ``class_names`` does not have num_classes entries.
        """
        if len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for {self.num_classes} classes")
        res = self.compute(digits)

        def fmt(v: float) -> str:
            return "nan" if math.isnan(v) else f"{v:.{digits}f}"

        lines = ["| class | IoU | Acc |", "|---|---:|---:|"]
        for name, i, a in zip(class_names, res["IoU"], res["Acc"]):
            # '|' would break the row; class names with synonyms only contain ', '.
            lines.append(f"| {str(name).replace('|', '/')} | {fmt(i)} | {fmt(a)} |")
        lines += [
            "",
            "| aAcc | mIoU | mAcc |",
            "|---:|---:|---:|",
            f"| {fmt(res['aAcc'])} | {fmt(res['mIoU'])} | {fmt(res['mAcc'])} |",
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"IoUAccumulator(num_classes={self.num_classes}, num_images={self.num_images})"
