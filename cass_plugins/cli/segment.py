"""``cass-segment``: segment images with arbitrary class names and write overlays, label maps and areas."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from cass_plugins.backbone.loading import WeightsUnavailableError
from cass_plugins.cli.common import CliParser, add_config_arguments, add_model_arguments, config_from_args, models_from_args
from cass_plugins.core.settings import SettingError

__all__ = ["main", "build_parser"]

log = logging.getLogger("cass_plugins")


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
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
            "  cass-segment --print-config --dataset cityscapes --set ops.gamma=0.2 spectral.lowrank=exact\n"
            "  cass-segment photo.jpg --classes \"cat; sky\" --baseline sclip --components spectral,ops,ota\n"
            "\n"
            "vocabulary: ';' separates classes, ',' the synonyms of one class; a pixel gets the class of its best\n"
            "  synonym, and the first class is the background when a threshold (prob_thd) applies.\n"
            "hyper-parameters: --preset picks the method, --dataset that preset's values for a benchmark (e.g. voc21:\n"
            "  whole-image mode and a background threshold), --baseline and --components compose methods,\n"
            "  --set section.key=VALUE overrides any setting; --print-config shows the result (every key).\n"
            "offline: pass state-dict files, e.g. --pretrained vit_b16_openai.pth --vfm-weights\n"
            "  dino_vitbase8_pretrain.pth ('random' for both gives a meaningless but complete dry run).\n"
            "exit status: 0 all written, 1 a runtime failure (or some images failed), 2 a usage error."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", type=Path,
                   help="image files (any format Pillow reads; grayscale, RGBA and 16-bit are converted)")
    voc = p.add_mutually_exclusive_group()  # one is required unless --print-config
    voc.add_argument("--classes", help='class names, e.g. "truck; sheep; sky, clouds"')
    voc.add_argument("--classes-file", type=Path, help="file with one class per line, synonyms separated by ', '")
    voc.add_argument("--dataset-classes", help="a built-in vocabulary: voc21, context60, ade20k, ...")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (preset + --dataset + --set, as JSON) and exit; "
                   "needs no images and loads no model")
    p.add_argument("--out", type=Path, default=Path("cass_out"), help="output folder (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug information (matching margins...)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    p.add_argument("--keep-going", action=argparse.BooleanOptionalAction, default=True,
                   help="report an image that fails and go on with the others (exit status 1 at the end); "
                   "--no-keep-going stops at the first (default: on)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the on-disk text-embedding cache (~/.cache/cass_plugins)")
    add_config_arguments(p)
    add_model_arguments(p)
    return p


class _CliError(Exception):
    """A user-facing failure: printed as one ``error:`` line, exit status ``code`` (2 usage, 1 runtime)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    """``cass-segment``: 0 when every image was written, 1 when some failed (``--keep-going``).

    Errors print one ``error:`` line to stderr and exit with status 2 (usage: arguments, paths, vocabulary,
    checkpoint files) or 1 (runtime: weights unavailable, a failing model); ``--debug`` shows the traceback instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(parser, args)
    except _CliError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.code) from None
    except Exception as err:  # anything unforeseen: one line, the traceback on request
        if args.debug:
            raise
        print(f"error: {_one_line(err)} (rerun with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _cli_vocabulary_message(err: Exception) -> str:
    # The Vocabulary error names an API keyword (allow_duplicates) that has no flag; say what works on the CLI.
    text = re.sub(r"\s*\(or pass allow_duplicates=True[^)]*\)", "", str(err))
    if "duplicate class name" in text:
        text += " (each name may appear once in --classes / the classes file: delete or rename the repeat)"
    return text


def _prepare_out(out: Path) -> None:
    """Create the output folder, or say why it cannot be used, before any model is loaded."""
    if out.exists() and not out.is_dir():
        raise _CliError(f"--out {out} is an existing file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _CliError(f"cannot create the --out folder {out}: {err.strerror or err}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise _CliError(f"--out {out} is not writable")


def _weights_record(value: str | None) -> dict[str, str | None]:
    """A pretrained tag as is; a local file by name and SHA-256 (which exact weights made these outputs)."""
    from cass_plugins.backbone.loading import file_sha256

    if value is not None and Path(value).expanduser().is_file():
        path = Path(value).expanduser()
        return {"file": path.name, "sha256": file_sha256(path)}
    return {"tag": value}


def _write_staged(out: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write every file under a temporary name in ``out``, then rename them all: no partial set on failure."""
    staged: list[tuple[Path, Path]] = []
    try:
        for name, write in writers.items():
            tmp = out / f".{name}.{os.getpid()}.tmp"
            staged.append((tmp, out / name))
            write(tmp)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in staged:
        os.replace(tmp, final)  # atomic on one file system, which the same folder guarantees


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cass_plugins import __version__
    from cass_plugins.pipeline.image import load_image
    from cass_plugins.backbone.loading import CheckpointError
    from cass_plugins.pipeline.segmenter import Segmenter, _parse_vocabulary
    from cass_plugins.pipeline.visualize import legend_overlay, save_label_map
    from cass_plugins.pipeline.vocabulary import Vocabulary

    try:
        config = config_from_args(args)  # every key and value checked before any model loads
    except SettingError as err:
        # an item without "=" is usually an image file that argparse took into the --set list
        swallowed = any("=" not in item for item in args.set)
        hint = " (put the image files before --set, or end the --set list with --)" if swallowed else ""
        raise _CliError(f"{err}{hint}") from err
    if args.print_config:
        print(config.describe())
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
        raise _CliError(f"bad vocabulary: {_cli_vocabulary_message(err)}") from err
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise _CliError(f"image file(s) not found: {', '.join(missing)}")
    _prepare_out(args.out)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise _CliError("--device cuda was requested but no CUDA device is available; use --device cpu")
    try:
        clip, tokenizer, vfm = models_from_args(args)
    except WeightsUnavailableError as err:
        raise _CliError(str(err), code=1) from err
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        raise _CliError(str(err)) from err
    try:
        segmenter = Segmenter(
            clip, vfm, vocabulary=vocabulary, preset=config, tokenizer=tokenizer, text_cache=not args.no_cache,
        )
    except (ValueError, TypeError) as err:  # configuration values the Segmenter rejects
        raise _CliError(str(err)) from err
    provenance = {
        "models": {"clip": args.clip, "pretrained": _weights_record(args.pretrained),
                   "vfm": args.vfm, "vfm_weights": _weights_record(args.vfm_weights)},
        "versions": {"cass_plugins": __version__, "torch": torch.__version__},
        "device": str(args.device),
        "precision": args.precision,
    }
    stems = _unique_stems(args.images)
    failed: list[str] = []
    with segmenter:
        for path, stem in tqdm(list(zip(args.images, stems)), desc="segmenting", unit="img",
                               disable=len(args.images) < 2):
            try:
                result = segmenter.segment(path, maps=False)  # labels only: bounded memory on large images
                areas = result.class_areas()
                summary = {
                    "image": str(path),
                    "size": list(result.labels.shape),
                    "classes": list(vocabulary.class_names),
                    "synonyms": [list(c) for c in vocabulary.classes],
                    "areas": areas,
                    "config": segmenter.config.to_dict(),
                    **provenance,
                }
                overlay = legend_overlay(load_image(path), result.labels, vocabulary.class_names, areas,
                                         alpha=args.alpha)
                _write_staged(args.out, {
                    f"{stem}_overlay.png": lambda p: overlay.save(p, format="PNG"),
                    f"{stem}_labels.png": lambda p: save_label_map(p, result.labels),
                    f"{stem}.json": lambda p: p.write_text(json.dumps(summary, indent=2, default=str)),
                })
            except Exception as err:  # one bad image must not cost the others (--keep-going)
                if args.debug:
                    raise
                message = str(err) if isinstance(err, (ValueError, FileNotFoundError)) else _one_line(err)
                message = message if str(path) in message else f"{path}: {message}"
                if not args.keep_going:
                    raise _CliError(message, code=1) from err
                print(f"error: {message} (skipped)", file=sys.stderr)
                failed.append(str(path))
    written = len(args.images) - len(failed)
    print(f"wrote {3 * written} files to {args.out}")
    if failed:
        print(f"error: {len(failed)} of {len(args.images)} images failed: {', '.join(failed)}", file=sys.stderr)
        return 1
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
