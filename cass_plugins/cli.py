"""``cass-segment``: segment images with arbitrary class names and write overlays, label maps and areas."""
from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .loading import DEFAULT_CLIP, DEFAULT_VFM, load_clip, load_vfm
from .presets import list_presets

__all__ = ["main", "add_model_arguments", "models_from_args", "parse_overrides"]

log = logging.getLogger("cass_plugins")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags shared by ``cass-segment``, ``cass-eval`` and ``cass-ablate``."""
    g = parser.add_argument_group("models")
    g.add_argument("--clip", default=DEFAULT_CLIP[0], help="open_clip model name (default: %(default)s)")
    g.add_argument(
        "--pretrained", default=DEFAULT_CLIP[1],
        help="open_clip pretrained tag (e.g. openai) or a local checkpoint file; 'random' for random weights "
        "(default: %(default)s)",
    )
    g.add_argument("--vfm", default=DEFAULT_VFM, help="timm VFM name; 'none' disables spectral distillation "
                   "(default: %(default)s)")
    g.add_argument("--vfm-weights", default="pretrained",
                   help="'pretrained' (download via timm), a local checkpoint file, or 'random' (default: %(default)s)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    g.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"), help="model precision")


def models_from_args(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(clip_model, tokenizer, vfm_or_None)`` from the shared flags."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was requested but no CUDA device is available; use --device cpu")
    clip, tokenizer = load_clip(args.clip, args.pretrained, device=args.device, precision=args.precision)
    vfm = None
    if args.vfm and args.vfm.lower() != "none":
        vfm = load_vfm(args.vfm, args.vfm_weights, device=args.device, precision=args.precision)
    return clip, tokenizer, vfm


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lowrank=exact", "fusion_lambda=1"]`` → ``{"lowrank": "exact", "fusion_lambda": 1}``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: --set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = None if value.lower() == "none" else value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cass-segment",
        description=(
            "Training-free open-vocabulary segmentation of images with CASS (or another baseline). For every image "
            "writes <stem>_overlay.png (colours + legend), <stem>_labels.png (class index per pixel) and "
            "<stem>.json (class areas, vocabulary, resolved configuration) into --out."
        ),
        epilog=(
            'Example: cass-segment photo.jpg --classes "truck; sheep; sky, clouds" --out out/  '
            "(';' separates classes, ',' synonyms of one class)."
        ),
    )
    p.add_argument("images", nargs="+", type=Path, help="image files (any format Pillow reads)")
    voc = p.add_mutually_exclusive_group(required=True)
    voc.add_argument("--classes", help='class names, e.g. "truck; sheep; sky, clouds"')
    voc.add_argument("--classes-file", type=Path, help="file with one class per line, synonyms separated by ', '")
    voc.add_argument("--dataset-classes", help="a built-in vocabulary: voc21, context60, ade20k, ...")
    p.add_argument("--preset", default="cass-official", help=f"method preset: {', '.join(list_presets())}")
    p.add_argument("--dataset", help="use that dataset's hyper-parameters of the preset (cass.md §7)")
    p.add_argument("--baseline", help="last-block baseline (naclip, sclip, clearclip, proxyclip, vanilla, ...)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override any configuration key")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--out", type=Path, default=Path("cass_out"), help="output folder (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug information (matching margins...)")
    add_model_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    from .image import load_image
    from .segmenter import Segmenter
    from .visualize import legend_overlay, save_label_map
    from .vocabulary import Vocabulary

    if args.classes is not None:
        vocabulary = Vocabulary.parse(args.classes)
    elif args.classes_file is not None:
        vocabulary = Vocabulary.from_file(args.classes_file)
    else:
        vocabulary = Vocabulary.builtin(args.dataset_classes)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise SystemExit(f"error: image file(s) not found: {', '.join(missing)}")
    overrides = parse_overrides(args.set)
    clip, tokenizer, vfm = models_from_args(args)
    if vfm is None:
        overrides.setdefault("spectral", False)
    segmenter = Segmenter(
        clip, vfm, vocabulary=vocabulary, preset=args.preset, dataset=args.dataset, baseline=args.baseline,
        tokenizer=tokenizer, **overrides,
    )
    if args.print_config:
        print(segmenter.describe())
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with segmenter:
        for path in tqdm(args.images, desc="segmenting", unit="img", disable=len(args.images) < 2):
            result = segmenter.segment(path)
            areas = result.class_areas()
            stem = path.stem
            legend_overlay(load_image(path), result.labels, vocabulary.class_names, areas, alpha=args.alpha).save(
                args.out / f"{stem}_overlay.png"
            )
            save_label_map(args.out / f"{stem}_labels.png", result.labels)
            summary = {
                "image": str(path),
                "size": list(result.labels.shape),
                "classes": list(vocabulary.class_names),
                "synonyms": [list(c) for c in vocabulary.classes],
                "areas": areas,
                "config": segmenter.config.to_dict(),
            }
            (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {3 * len(args.images)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
