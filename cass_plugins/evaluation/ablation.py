"""CASS's component ablation (Table 3, cass.md §8) as named configurations, and the harness that runs them.

Each row is a set of :class:`~cass_plugins.core.config.Config` overrides applied over the method preset
(``cass-official`` by default) and its dataset values. A row switches components *off*; what it leaves unset is the
preset's value, so the rows follow the preset (e.g. ``cass-paper``'s energy low rank, or ``eigenscaling=False`` in
the VOC20 and Cityscapes values of ``cass-official``).

How the rows are read (the paper names the rows, not their settings):

- ``vanilla`` (#1): CASS's last block with every component off: NACLIP-reduced (k-k attention + Gaussian ω,
  no residual, no FFN) with CLS out of the attention, no OPS/OTA. Its published numbers (58.9 / 35.3 / 23.4) are
  NACLIP's without PAMR.
- ``+vfm-graph`` (#2): the VFM graph fused *without matching*: VFM head i with CLIP head i (``matching=
  "sequential"``), the full graph (``lowrank=None``), no eigenscaling. The fusion weight is still ``λ·w`` with ``w``
  the pair's spectral distance (the weighting belongs to the fusion, not to the matching).
- ``+matching`` (#3): complementary Hungarian matching; still the full graph and no eigenscaling.
- ``+low-rank`` (#4): the preset's low rank (``randomized``, r = 10 in ``cass-official``); no eigenscaling.
- ``+eigenscaling`` (#5): dynamic eigenscaling on (where the dataset values keep it on).
- ``+ops`` (#6): the object presence prior.
- ``+ota`` (#7): object-guided text adjustment: the full model (``full`` is accepted as its alias).

cass.md §8 lists these seven configurations; the full model is the last of them.

Beyond the paper, two rows add Trident's SAM stages (docs/spec/trident.md §5-§8) to the full CASS model; no
published system offers these combinations. They need a SAM model (``run_ablation(..., sam=...)``,
``cass-ablate --sam-weights FILE``) and run only when named (``all`` is the paper's seven rows):

- ``+sam-refine`` (#8): full CASS, then SAM prompt refinement of its labels (§8);
- ``+sam-aggregate`` (#9): full CASS in splice mode (window outputs spliced before the head), SAM aggregation on
  SAM's grid (§5-§6), then SAM refinement.

``cass-ablate`` (:mod:`cass_plugins.cli.ablate`) runs a list of rows over images (timing, and pixel agreement of the label maps with the full model)
or over a dataset's validation split (mIoU; the paper's value is shown when the dataset is in Table 3).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "ABLATION_ROWS", "ABLATION_LABELS", "PUBLISHED_MIOU", "FULL_ROW", "PAPER_ROWS", "AblationResult",
    "ablation_config", "resolve_rows", "row_needs_sam", "run_ablation", "format_table",
]

log = logging.getLogger(__name__)

_OFF_TEXT = {"presence_prior": False, "ota": False}

#: Table 3 rows as Config overrides over the method preset, in order.
ABLATION_ROWS: dict[str, dict[str, Any]] = {
    "vanilla": {"spectral": False, **_OFF_TEXT},
    "+vfm-graph": {"spectral": True, "matching": "sequential", "lowrank": None, "eigenscaling": False, **_OFF_TEXT},
    "+matching": {"spectral": True, "lowrank": None, "eigenscaling": False, **_OFF_TEXT},
    "+low-rank": {"spectral": True, "eigenscaling": False, **_OFF_TEXT},
    "+eigenscaling": {"spectral": True, **_OFF_TEXT},
    "+ops": {"spectral": True, "presence_prior": True, "ota": False},
    "+ota": {"spectral": True, "presence_prior": True, "ota": True},
    "+sam-refine": {"components": ("spectral", "ops", "ota", "sam_refine")},
    "+sam-aggregate": {"components": ("spectral", "ops", "ota", "sam_aggregate", "sam_refine"), "mode": "splice"},
}

#: The rows of the paper's Table 3 (what ``all`` runs); the others extend it.
PAPER_ROWS: tuple[str, ...] = ("vanilla", "+vfm-graph", "+matching", "+low-rank", "+eigenscaling", "+ops", "+ota")

def row_needs_sam(row: str) -> bool:
    """Whether an ablation row switches on a SAM component (``ComponentSpec.needs_sam``)."""
    from cass_plugins.core.registry import REGISTRY

    return any(REGISTRY.component(c).needs_sam for c in ABLATION_ROWS[row].get("components", ()))

#: The full model's row (the reference of the agreement column).
FULL_ROW = "+ota"

#: Row labels as the paper's table prints them.
ABLATION_LABELS: dict[str, str] = {
    "vanilla": "#1 vanilla",
    "+vfm-graph": "#2 + VFM graph",
    "+matching": "#3 + matching",
    "+low-rank": "#4 + low rank",
    "+eigenscaling": "#5 + eigenscaling",
    "+ops": "#6 + OPS",
    "+ota": "#7 + OTA (full)",
    "+sam-refine": "#8 CASS + SAM refine",
    "+sam-aggregate": "#9 CASS + SAM aggregate + refine",
}

#: Published mIoU of each row (cass.md §8, CLIP B/16 + DINO B/8) on VOC21, Context59, COCO-Stuff.
PUBLISHED_MIOU: dict[str, dict[str, float]] = {
    "voc21": {"vanilla": 58.9, "+vfm-graph": 62.9, "+matching": 63.2, "+low-rank": 64.5, "+eigenscaling": 64.8,
              "+ops": 65.0, "+ota": 65.8},
    "context59": {"vanilla": 35.3, "+vfm-graph": 37.7, "+matching": 38.0, "+low-rank": 38.4, "+eigenscaling": 38.6,
                  "+ops": 39.4, "+ota": 40.2},
    "coco_stuff164k": {"vanilla": 23.4, "+vfm-graph": 25.2, "+matching": 25.4, "+low-rank": 25.8,
                       "+eigenscaling": 25.9, "+ops": 26.6, "+ota": 26.7},
}

_ALIASES = {"full": FULL_ROW}


def resolve_rows(rows: str | Iterable[str] | None) -> list[str]:
    """Row names in table order from a list or a comma-separated string (``None`` / ``"all"``: every row).

    Accepts the names of :data:`ABLATION_ROWS`, ``full`` and the row numbers ``1`` … ``9`` (``all`` = the paper's
    rows 1-7).

    Raises:
        ValueError: an unknown row, naming the valid ones.
    """
    if rows is None or rows == "all":
        return list(PAPER_ROWS)
    items = [r.strip() for r in (rows.split(",") if isinstance(rows, str) else rows) if r.strip()]
    names = list(ABLATION_ROWS)
    out = []
    for item in items:
        key = item.lstrip("#")
        if key.isdigit() and 1 <= int(key) <= len(names):
            key = names[int(key) - 1]
        key = _ALIASES.get(key, key)
        if key not in ABLATION_ROWS:
            raise ValueError(f"unknown ablation row {item!r}; choose from {names}, 'full', 1-{len(names)} or 'all'")
        if key not in out:
            out.append(key)
    return sorted(out, key=names.index)


def ablation_config(row: str, preset: str = "cass-official", dataset: str | None = None, **overrides: Any):
    """The resolved :class:`~cass_plugins.core.config.Config` of one row (preset + dataset values + row + overrides)."""
    from cass_plugins.core.config import resolve_config

    (name,) = resolve_rows([row])
    return resolve_config(preset, dataset, **{**ABLATION_ROWS[name], **overrides})


@dataclass
class AblationResult:
    """One row of the ablation table.

    Attributes:
        row: the row name (key of :data:`ABLATION_ROWS`).
        num_images: images segmented.
        seconds_per_image: mean wall-clock time of ``Segmenter.segment`` (warm-up excluded).
        agreement: percentage of pixels whose label equals the full model's (``None`` without a reference).
        miou: mIoU in percent when labels were given.
        config: the resolved configuration.
    """

    row: str
    num_images: int
    seconds_per_image: float
    agreement: float | None = None
    miou: float | None = None
    config: Any = None

    @property
    def label(self) -> str:
        return ABLATION_LABELS.get(self.row, self.row)

    @property
    def images_per_second(self) -> float:
        return 1.0 / self.seconds_per_image if self.seconds_per_image > 0 else float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compact(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    # reference label maps are kept for the whole run: store them small
    return labels.to(torch.uint8 if num_classes <= 256 else torch.int16).cpu()


def run_ablation(
    clip_model: nn.Module,
    vfm: nn.Module | None,
    images: Sequence[Any],
    *,
    rows: str | Iterable[str] | None = None,
    vocabulary: Any = None,
    labels: Sequence[torch.Tensor] | None = None,
    num_classes: int | None = None,
    preset: str = "cass-official",
    dataset: str | None = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    warmup: int = 1,
    agreement: bool | None = None,
    progress: bool = False,
    sam: Any = None,
    compile: bool = False,  # noqa: A002 - Segmenter's own keyword
    **overrides: Any,
) -> list[AblationResult]:
    """Segment ``images`` with every row and measure time, agreement with the full model and (with labels) mIoU.

    Args:
        clip_model: the CLIP model (patched and unpatched per row by :class:`~cass_plugins.pipeline.segmenter.Segmenter`).
        vfm: the VFM; rows with spectral distillation need one.
        images: anything ``Segmenter.segment`` accepts (paths, PIL images, arrays, tensors); read once per row.
        rows: row names (default: all, in table order).
        vocabulary: the classes.
        labels: one ``(H, W)`` label map per image (255 = ignore) → the mIoU column.
        num_classes: classes of the metric (default: the vocabulary's).
        preset, dataset, tokenizer, device, **overrides: as :class:`~cass_plugins.pipeline.segmenter.Segmenter`; the
            overrides apply to every row (after the row's own).
        warmup: untimed ``segment`` calls on the first image before each row is timed.
        agreement: compare label maps with the full model (default: only when there are no labels). The full row is
            run first, and added to the table when it was not requested.
        progress: show a progress bar.
        sam: the SAM model (:func:`~cass_plugins.load_sam`) of the SAM rows (``+sam-refine``, ``+sam-aggregate``);
            given to those rows only.
        compile: ``torch.compile`` the towers of every row (``Segmenter(compile=True)``; the warm-up absorbs the
            compilation).

    Returns:
        one :class:`AblationResult` per row, in table order.
    """
    from cass_plugins.evaluation.metrics import IoUAccumulator
    from cass_plugins.pipeline.segmenter import Segmenter
    from cass_plugins.pipeline.vocabulary import Vocabulary

    names = resolve_rows(rows)
    sam_rows = [r for r in names if row_needs_sam(r)]
    if sam_rows and sam is None:
        raise ValueError(f"rows {sam_rows} need a SAM model: pass sam=cass_plugins.load_sam(...) (--sam-weights FILE)")
    if sam is not None and not sam_rows:
        raise ValueError("a SAM model was given but no requested row uses it: add --rows +sam-refine,+sam-aggregate")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} label maps for {len(images)} images")
    if not images:
        raise ValueError("no images to segment")
    vocab = Vocabulary.parse(vocabulary) if vocabulary is not None else None
    if vocab is None:
        raise ValueError("run_ablation needs a vocabulary (class names)")
    n_cls = num_classes if num_classes is not None else vocab.num_classes
    with_agreement = (labels is None) if agreement is None else agreement
    if with_agreement and FULL_ROW not in names:
        names = [*names, FULL_ROW]
    order = sorted(names, key=lambda r: (r != FULL_ROW, list(ABLATION_ROWS).index(r)))  # reference first
    reference: list[torch.Tensor] = []
    results: dict[str, AblationResult] = {}
    for row in order:
        kw = {**ABLATION_ROWS[row], **overrides}
        seg = Segmenter(clip_model, vfm, vocabulary=vocab, preset=preset, dataset=dataset, tokenizer=tokenizer,
                        device=device, sam=sam if row_needs_sam(row) else None, compile=compile, **kw)
        with seg:
            dev = seg.device
            for _ in range(warmup):
                seg.segment(images[0])
            acc = IoUAccumulator(n_cls) if labels is not None else None
            same = total = 0
            elapsed = 0.0
            for i, image in enumerate(_progress(images, row, progress)):
                _sync(dev)
                t0 = time.perf_counter()
                result = seg.segment(image)
                _sync(dev)
                elapsed += time.perf_counter() - t0
                pred = result.labels
                if acc is not None:
                    acc.update(pred, labels[i])
                if with_agreement:
                    if row == FULL_ROW:
                        reference.append(_compact(pred, n_cls))
                    else:
                        same += int((pred.cpu() == reference[i].to(pred.dtype)).sum())
                        total += pred.numel()
            agree = None
            if with_agreement:
                agree = 100.0 if row == FULL_ROW else 100.0 * same / max(total, 1)
            results[row] = AblationResult(
                row=row, num_images=len(images), seconds_per_image=elapsed / len(images), agreement=agree,
                miou=acc.compute()["mIoU"] if acc is not None else None, config=seg.config,
            )
    return [results[r] for r in sorted(results, key=list(ABLATION_ROWS).index)]


def _progress(items: Sequence[Any], row: str, show: bool) -> Iterator[Any]:
    if not show:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=ABLATION_LABELS.get(row, row), unit="img")


def _describe_row(row: str) -> str:
    return ", ".join(f"{k}={v}" for k, v in ABLATION_ROWS[row].items()) or "(preset)"


def format_table(results: Sequence[AblationResult], dataset: str | None = None) -> str:
    """The results as a Markdown table (mIoU and the paper's mIoU columns appear when available)."""
    has_miou = any(r.miou is not None for r in results)
    has_agree = any(r.agreement is not None for r in results)
    published = PUBLISHED_MIOU.get(dataset or "")
    head = ["row", "configuration", "s / image", "images / s"]
    head += ["agreement with full (%)"] if has_agree else []
    head += ["mIoU"] if has_miou else []
    head += [f"paper mIoU ({dataset})"] if published and has_miou else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for r in results:
        cells = [r.label, _describe_row(r.row), f"{r.seconds_per_image:.3f}", f"{r.images_per_second:.2f}"]
        if has_agree:
            cells.append("-" if r.agreement is None else f"{r.agreement:.2f}")
        if has_miou:
            cells.append("-" if r.miou is None else f"{r.miou:.2f}")
        if published and has_miou:
            cells.append(f"{published[r.row]:.1f}" if r.row in published else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
