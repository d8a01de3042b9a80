"""``cass-eval``'s tables: the papers' eight-column table, the per-dataset per-class table, the summary block."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cass_plugins.evaluation.datasets import DATASETS
from cass_plugins.evaluation.metrics import IoUAccumulator

__all__ = ["PAPER_ORDER", "fmt", "format_dataset_table", "format_paper_table", "format_scores", "summary"]

#: Column order of the papers' main table (cass.md §8): V21 PC60 Obj V20 PC59 Stuff City ADE.
PAPER_ORDER: tuple[str, ...] = (
    "voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff164k", "cityscapes", "ade20k",
)


def fmt(v: Any) -> str:
    """A score with two decimals; ``–`` for a missing or NaN one."""
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def summary(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The paper's 8 columns (+ avg over the evaluated ones) for mIoU and aAcc, and which columns are partial."""
    cols = [DATASETS[n].display_name for n in PAPER_ORDER]
    out: dict[str, Any] = {"columns": cols + ["avg"]}
    for metric in ("mIoU", "aAcc"):
        row: dict[str, Any] = {}
        for name, col in zip(PAPER_ORDER, cols):
            sec = sections.get(name)
            row[col] = sec.get(metric) if sec is not None else None
        present = [v for v in row.values() if v is not None]
        row["avg"] = round(sum(present) / len(present), 2) if present else None
        out[metric] = row
    out["evaluated"] = [DATASETS[n].display_name for n in PAPER_ORDER if n in sections]
    out["incomplete"] = [DATASETS[n].display_name for n in PAPER_ORDER if n in sections and not sections[n]["complete"]]
    return out


def format_paper_table(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table in the papers' column order (V21 PC60 Obj V20 PC59 Stuff City ADE avg), rows mIoU / aAcc.

    Datasets that were not evaluated show ``–``; ``avg`` is over the evaluated ones; a ``*`` marks datasets
    scored on a subset (``--limit`` or an interrupted run).
    """
    table = summary(sections)
    cols = table["columns"]
    incomplete = set(table["incomplete"])
    head = [c + ("*" if c in incomplete else "") for c in cols]
    lines = ["| | " + " | ".join(head) + " |", "|---|" + "---:|" * len(cols)]
    for metric in ("mIoU", "aAcc"):
        lines.append(f"| {metric} | " + " | ".join(fmt(table[metric][c]) for c in cols) + " |")
    n = len(table["evaluated"])
    notes = []
    if n < len(PAPER_ORDER):
        notes.append(f"avg over the {n} evaluated dataset(s)")
    if incomplete:
        parts = [
            f"{sections[k]['display_name']} {sections[k]['num_images']}/{sections[k]['num_images_total']}"
            for k in PAPER_ORDER if k in sections and not sections[k]["complete"]
        ]
        notes.append("* scored on a subset: " + ", ".join(parts) + " images")
    if notes:
        text = "; ".join(notes)
        lines += ["", text[0].upper() + text[1:] + "."]
    return "\n".join(lines)


def format_dataset_table(section: Mapping[str, Any]) -> str:
    """Per-class IoU / Acc table of one dataset's result section (rebuilt from its stored areas)."""
    acc = IoUAccumulator.from_state(section["state"])
    return acc.markdown_table(list(section["IoU"].keys()))


def format_scores(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per dataset (mIoU, aAcc, mAcc, images scored), with a warning line for out-of-range labels."""
    lines = []
    for sec in sections.values():
        lines.append(f"{sec['display_name']}: mIoU {fmt(sec['mIoU'])}, aAcc {fmt(sec['aAcc'])}, "
                     f"mAcc {fmt(sec['mAcc'])} ({sec['num_images']}/{sec['num_images_total']} images)")
        if sec["invalid_label_pixels"]:
            lines.append(f"  warning: {sec['invalid_label_pixels']} label pixels outside 0..{len(sec['IoU']) - 1} "
                         "were not scored (wrong label encoding?)")
    return "\n".join(lines)
