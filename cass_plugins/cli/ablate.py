"""``cass-ablate``: the ablation rows (Table 3) on images or a dataset (rows: :mod:`cass_plugins.evaluation.ablation`).

Everything that can be checked without the models (rows, ``--set`` values, images, classes, the dataset folder)
is checked before they load; a wrong input exits with status 2 and one line naming it.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cass_plugins.cli.common import (
    CliParser, add_model_arguments, models_from_args, sam_from_args, vfm_name, vfm_requested,
)
from cass_plugins.core.config import parse_overrides, resolve_config
from cass_plugins.evaluation.ablation import (
    ABLATION_LABELS, ABLATION_ROWS, ablation_config, format_table, resolve_rows, run_ablation,
)
from cass_plugins.pipeline.vocabulary import Vocabulary

__all__ = ["build_parser", "main"]

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def build_parser() -> argparse.ArgumentParser:
    """The ``cass-ablate`` argument parser (model flags shared with ``cass-segment``)."""
    p = CliParser(
        prog="cass-ablate",
        description=(
            "Run CASS's component ablation (Table 3 rows) over images or a dataset and print a Markdown table: "
            "time per image and pixel agreement with the full model, or mIoU when --data-root gives labels."
        ),
        epilog="Rows: " + "; ".join(f"{ABLATION_LABELS[r]} = {r}" for r in ABLATION_ROWS),
    )
    p.add_argument("images", nargs="*", type=Path, help="image files or folders (ignored with --data-root)")
    p.add_argument("--rows", default="all", help="comma-separated rows (names, numbers 1-9, 'full'; default: all = the paper's 1-7; "
                   "8 '+sam-refine' and 9 '+sam-aggregate' add Trident's SAM stages to CASS and need --sam-weights)")
    voc = p.add_mutually_exclusive_group()
    voc.add_argument("--classes", help='class names, e.g. "truck; sheep; sky, clouds"')
    voc.add_argument("--classes-file", type=Path, help="one class per line, synonyms separated by ', '")
    voc.add_argument("--dataset-classes", help="a built-in vocabulary (voc21, context59, ...)")
    p.add_argument("--dataset", help="dataset hyper-parameters of the preset (and its classes, by default)")
    p.add_argument("--data-root", type=Path, help="the dataset's folder: evaluate on its validation split (mIoU)")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--preset", default="cass-official", help="method preset the rows modify (default: %(default)s)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a key in every row")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each row (default: %(default)s)")
    p.add_argument("--agreement", action="store_true", help="also compute agreement with the full model on a dataset")
    p.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    add_model_arguments(p)
    return p


def _expand_images(paths: Sequence[Path]) -> list[Path]:
    """Image files of ``paths`` (folders searched recursively, sorted).

    Raises:
        FileNotFoundError: a path is neither a file nor a folder.
    """
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in _IMAGE_SUFFIXES)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} is neither an image file nor a folder")
    return out


def _vocabulary(args: argparse.Namespace) -> Vocabulary:
    if args.classes is not None:
        return Vocabulary.parse(args.classes)
    if args.classes_file is not None:
        if not args.classes_file.is_file():
            raise FileNotFoundError(f"--classes-file {args.classes_file} does not exist")
        return Vocabulary.from_file(args.classes_file)
    if args.dataset_classes or args.dataset:
        return Vocabulary.builtin(args.dataset_classes or args.dataset)
    raise ValueError("give the classes (--classes, --classes-file, --dataset-classes or --dataset)")


def _one_line(err: BaseException) -> str:
    # KeyError's str() is the repr of its message; multi-line messages would break the one-line error.
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """``cass-ablate``: print the ablation table (see ``cass-ablate --help``).

    Returns:
        0 on success; wrong inputs found before the models load exit with status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive number of images, got {args.limit}")
    labels = None
    num_classes = None
    try:
        rows = resolve_rows(args.rows)
        if not vfm_requested(args) and any(ABLATION_ROWS[r].get("spectral") or "spectral" in ABLATION_ROWS[r].get("components", ()) for r in rows):
            raise ValueError("rows with the VFM graph need a VFM (--vfm); run --rows vanilla without one")
        overrides = parse_overrides(args.set, resolve_config(args.preset, args.dataset))
        # each row's configuration with the overrides, as run_ablation will build it
        configs = [ablation_config(row, args.preset, args.dataset, **overrides) for row in rows]
        if args.data_root is not None:
            if not args.dataset:
                raise ValueError("--data-root needs --dataset (which benchmark the folder holds)")
            from cass_plugins.evaluation.datasets import SegmentationDataset

            data = SegmentationDataset(args.dataset, args.data_root)
            n = len(data) if args.limit is None else min(args.limit, len(data))
            items = [data[i] for i in range(n)]
            images: list[Any] = [it["image_path"] for it in items]
            labels = [it["label"] for it in items]
            num_classes = data.info.num_classes
        else:
            images = _expand_images(args.images)
            images = images[: args.limit] if args.limit is not None else images
            if not images:
                raise ValueError("no images: give image files/folders, or --dataset with --data-root")
        vocabulary = _vocabulary(args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(_one_line(e))

    try:
        sam = sam_from_args(args, configs)
    except (ValueError, ImportError, FileNotFoundError, RuntimeError) as e:
        parser.error(_one_line(e))
    clip, tokenizer, vfm = models_from_args(args)
    results = run_ablation(
        clip, vfm, images, rows=rows, vocabulary=vocabulary, labels=labels, num_classes=num_classes,
        preset=args.preset, dataset=args.dataset, tokenizer=tokenizer, warmup=args.warmup,
        agreement=True if args.agreement else None, progress=True, sam=sam, compile=args.compile, **overrides,
    )
    device = next(clip.parameters()).device
    title = (f"CASS ablation: {len(images)} image(s), preset {args.preset}"
             f"{', dataset ' + args.dataset if args.dataset else ''}, {args.clip} + {vfm_name(args)}, {device}")
    table = format_table(results, args.dataset if labels is not None else None)
    print(f"{title}\n\n{table}")
    if args.out is not None:
        args.out.write_text(f"{title}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
