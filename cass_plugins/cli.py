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

from .loading import DEFAULT_CLIP, DEFAULT_VFM, WeightsUnavailableError, load_clip, load_vfm
from .presets import Config, list_presets, resolve_config

__all__ = ["main", "add_model_arguments", "models_from_args", "parse_overrides", "resolve_cli_config"]

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
    """``["key=value", ...]`` → ``{key: value}``; values are JSON / Python literals, else strings.

    ``none``/``null`` → None, ``true``/``false`` (any case) → bool, ``0.1`` → float, ``[0,1]`` or ``(0,1)`` →
    list/tuple, anything else stays a string (``lowrank=energy``).

    Raises:
        ValueError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        low = text.strip().lower()
        value: Any
        if low in ("none", "null"):
            value = None
        elif low in ("true", "false"):
            value = low == "true"
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    value = text.strip()
        out[key] = value
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
            "examples:\n"
            '  cass-segment photo.jpg --classes "truck; sheep; sky, clouds" --out out/\n'
            "  cass-segment a.jpg b.png --dataset-classes voc21 --dataset voc21\n"
            "  cass-segment --print-config --dataset cityscapes --set gamma=0.2 lowrank=exact\n"
            "\n"
            "vocabulary: ';' separates classes, ',' the synonyms of one class; a pixel gets the class of its best\n"
            "  synonym, and the first class is the background when a threshold (prob_thd) applies.\n"
            "hyper-parameters: --preset picks the method, --dataset that preset's values for a benchmark (e.g. voc21:\n"
            "  whole-image mode and a background threshold), --set KEY=VALUE overrides any key; --print-config\n"
            "  shows the result.\n"
            "offline: pass checkpoint files, e.g. --pretrained ViT-B-16.pt --vfm-weights dino_vitbase8_pretrain.pth\n"
            "  ('random' for both gives a meaningless but complete smoke test)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", type=Path,
                   help="image files (any format Pillow reads; grayscale, RGBA and 16-bit are converted)")
    voc = p.add_mutually_exclusive_group()  # one is required unless --print-config
    voc.add_argument("--classes", help='class names, e.g. "truck; sheep; sky, clouds"')
    voc.add_argument("--classes-file", type=Path, help="file with one class per line, synonyms separated by ', '")
    voc.add_argument("--dataset-classes", help="a built-in vocabulary: voc21, context60, ade20k, ...")
    p.add_argument("--preset", default="cass-official", help=f"method preset: {', '.join(list_presets())}")
    p.add_argument("--dataset", help="use that dataset's hyper-parameters of the preset (cass.md §7)")
    p.add_argument("--baseline", help="last-block baseline (naclip, sclip, clearclip, proxyclip, vanilla, ...)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override any configuration key")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (preset + --dataset + --set, as JSON) and exit; "
                   "needs no images and loads no model")
    p.add_argument("--out", type=Path, default=Path("cass_out"), help="output folder (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug information (matching margins...)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the on-disk text-embedding cache (~/.cache/cass_plugins)")
    add_model_arguments(p)
    return p


def resolve_cli_config(args: argparse.Namespace, overrides: dict[str, Any]) -> Config:
    """The configuration ``patch_clip`` resolves for these flags, without building any model (``--print-config``).

    Mirrors :func:`~cass_plugins.patch_clip`: preset (+ dataset values), the baseline's block defaults, the
    ``--set`` overrides; spectral distillation drops CLS from the patch attention, and ``--vfm none`` switches it off.
    """
    from .plugins import REGISTRY

    overrides = dict(overrides)
    if args.vfm is None or args.vfm.lower() == "none":
        overrides.setdefault("spectral", False)
    config = resolve_config(args.preset, args.dataset)
    if args.baseline is not None:
        factory = REGISTRY.baseline(args.baseline)
        config = config.replace(baseline=args.baseline, **getattr(factory, "block_defaults", {}))
    if overrides:
        config = config.replace(**overrides)
    if config.spectral:
        config = config.replace(include_cls=False)
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    from .image import load_image
    from .segmenter import Segmenter, _parse_vocabulary
    from .visualize import legend_overlay, save_label_map
    from .vocabulary import Vocabulary

    try:
        overrides = parse_overrides(args.set)
    except ValueError as err:
        raise SystemExit(f"error: {err} (put the image files before --set, or end the --set list with --)")
    if args.print_config:
        try:
            print(resolve_cli_config(args, overrides).describe())
        except ValueError as err:
            parser.error(str(err))
        return 0
    if not args.images:
        parser.error("give at least one image file")
    if args.classes is None and args.classes_file is None and args.dataset_classes is None:
        parser.error("give the classes: --classes \"cat; dog, puppy; sky\", --classes-file FILE or --dataset-classes NAME")
    try:
        if args.classes is not None:
            vocabulary = _parse_vocabulary(args.classes)  # the Segmenter's check: a blank string is no vocabulary
        elif args.classes_file is not None:
            vocabulary = Vocabulary.from_file(args.classes_file)
        else:
            vocabulary = Vocabulary.builtin(args.dataset_classes)
    except (ValueError, OSError) as err:
        parser.error(f"bad vocabulary: {err}")
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise SystemExit(f"error: image file(s) not found: {', '.join(missing)}")
    try:
        clip, tokenizer, vfm = models_from_args(args)
    except (WeightsUnavailableError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    if vfm is None:
        overrides.setdefault("spectral", False)
    segmenter = Segmenter(
        clip, vfm, vocabulary=vocabulary, preset=args.preset, dataset=args.dataset, baseline=args.baseline,
        tokenizer=tokenizer, text_cache=not args.no_cache, **overrides,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stems = _unique_stems(args.images)
    with segmenter:
        for path, stem in tqdm(list(zip(args.images, stems)), desc="segmenting", unit="img",
                               disable=len(args.images) < 2):
            try:
                result = segmenter.segment(path)
            except (ValueError, FileNotFoundError) as err:  # unreadable image: say which, without a traceback
                raise SystemExit(f"error: {path}: {err}") from err
            areas = result.class_areas()
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


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    """File stems, made unique (``a/x.jpg`` and ``b/x.png`` → ``x``, ``x_1``) so no output overwrites another."""
    seen: set[str] = set()
    out = []
    for p in paths:
        stem, k = p.stem, 0
        while stem in seen:
            k += 1
            stem = f"{p.stem}_{k}"
        seen.add(stem)
        out.append(stem)
    return out


if __name__ == "__main__":
    sys.exit(main())
