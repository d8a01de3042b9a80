"""``cass-segment``: segment images with arbitrary class names and write overlays, label maps and areas."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cass_plugins.backbone.loading import WeightsUnavailableError
from cass_plugins.cli.common import (
    CliParser, add_config_arguments, add_model_arguments, config_from_args, models_from_args, sam_from_args, vfm_name,
)
from cass_plugins.core.settings import SettingError
from cass_plugins.pipeline.export import EXPORT_FORMATS, check_formats
from cass_plugins.video.io import VIDEO_INSTALL_HINT, VIDEO_SUFFIXES, is_video_path
from cass_plugins.video.temporal import TEMPORAL_MODES, TemporalConfig

__all__ = ["main", "build_parser"]

log = logging.getLogger("cass_plugins")


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(
        prog="cass-segment",
        description=(
            "Training-free open-vocabulary segmentation of images and videos with CASS (or another baseline). For "
            "every image writes <stem>_overlay.png (colours + legend), <stem>_labels.png (class index per pixel) and "
            "<stem>.json (class areas, vocabulary, resolved configuration) into --out. For every video (.mp4, .mkv, "
            ".webm, .avi, .mov ...; needs the [video] extra) writes <stem>_overlay.<ext> (same container where "
            "possible, MP4 otherwise), <stem>.json (per-frame class areas, flicker) and, with --frame-labels, "
            "<stem>_labels/<frame>.png. --export adds masks: <stem>/<class>.png (png), <stem>/segments.coco.json "
            "(coco-rle), <stem>/maps.npz (npz); for videos one folder per frame (<stem>/<frame>/<class>.png, "
            "<stem>/<frame>.npz) and one COCO file."
        ),
        epilog=(
            "examples:\n"
            '  cass-segment photo.jpg --classes "truck; sheep; sky, clouds" --out out/\n'
            "  cass-segment a.jpg b.png --dataset-classes voc21 --dataset voc21\n"
            "  cass-segment --print-config --dataset cityscapes --set ops.gamma=0.2 spectral.lowrank=exact\n"
            "  cass-segment photo.jpg --classes \"cat; sky\" --baseline sclip --components spectral,ops,ota\n"
            "  cass-segment clip.mp4 --classes \"person; dog; grass\" --every 2 --max-frames 300 --out out/\n"
            "  cass-segment photo.jpg --classes \"person; sky\" --export png --mask-dilate 8   # inpainting masks\n"
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
                   help="image files (any format Pillow reads; grayscale, RGBA and 16-bit are converted) and video "
                   "files (" + " ".join(VIDEO_SUFFIXES) + ")")
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
    p.add_argument("--batch-size", type=int, default=4,
                   help="images or video frames per batched forward, where the Segmenter has one (default: %(default)s)")
    ex = p.add_argument_group("mask export")
    ex.add_argument("--export", action="append", default=[], choices=EXPORT_FORMATS, metavar="FORMAT",
                    help="also write masks, repeatable: png (<stem>/<class>.png, 255 inside, for inpainting), "
                    "coco-rle (<stem>/segments.coco.json, pycocotools RLE), npz (<stem>/maps.npz: labels + float16 "
                    "per-class probabilities)")
    ex.add_argument("--mask-dilate", type=int, default=0, metavar="PX",
                    help="grow the png / coco-rle masks by PX pixels (inpainting needs a margin) (default: 0)")
    vid = p.add_argument_group("video")
    vid.add_argument("--every", type=int, default=None, metavar="N", help="segment every N-th frame (default: 1)")
    vid.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N segmented frames")
    vid.add_argument("--frame-labels", action="store_true", help="write every frame's label PNG (<stem>_labels/)")
    vid.add_argument("--temporal", choices=TEMPORAL_MODES, default=None,
                     help="temporal consistency (docs/video.md): on = stable CASS head assignment (where spectral "
                     "distillation runs) + motion-guarded logit smoothing; matching / smoothing = one of them; off "
                     "(default: on)")
    vid.add_argument("--smoothing", type=float, default=None, metavar="BETA",
                     help=f"weight of the previous frames in the logit moving average, [0, 1) (default: {TemporalConfig.smoothing})")
    vid.add_argument("--motion-threshold", type=float, default=None, metavar="T",
                     help="mean RGB change (0-1) of a logit cell above which smoothing restarts there "
                     f"(default: {TemporalConfig.motion_threshold})")
    vid.add_argument("--tie-margin", type=float, default=None, metavar="M",
                     help=f"cost margin within which the previous head assignment is kept (default: {TemporalConfig.tie_margin})")
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
    from cass_plugins import __version__
    from cass_plugins.backbone.loading import CheckpointError
    from cass_plugins.pipeline.segmenter import Segmenter, _parse_vocabulary
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
    videos = [p for p in args.images if is_video_path(p)]
    temporal = _temporal_from_args(args, bool(videos))
    try:
        exports = check_formats(args.export, args.mask_dilate)
    except ValueError as err:
        raise _CliError(str(err).replace("mask dilation", "--mask-dilate")) from err
    if args.batch_size < 1:
        raise _CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    if videos:
        _check_videos(videos)
    _prepare_out(args.out)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise _CliError("--device cuda was requested but no CUDA device is available; use --device cpu")
    try:
        sam = sam_from_args(args, config)  # SAM file problems surface before the CLIP loads
        clip, tokenizer, vfm = models_from_args(args)
    except WeightsUnavailableError as err:
        raise _CliError(str(err), code=1) from err
    except (CheckpointError, FileNotFoundError, ValueError, ImportError) as err:
        raise _CliError(str(err)) from err
    try:
        segmenter = Segmenter(
            clip, vfm, vocabulary=vocabulary, preset=config, tokenizer=tokenizer, text_cache=not args.no_cache,
            sam=sam, compile=args.compile,
        )
    except (ValueError, TypeError) as err:  # configuration values the Segmenter rejects
        raise _CliError(str(err)) from err
    provenance = {
        "models": {"clip": args.clip, "pretrained": _weights_record(args.pretrained),
                   "vfm": vfm_name(args), "vfm_weights": _weights_record(args.vfm_weights),
                   **({"sam": sam.kind, "sam_weights": _weights_record(args.sam_weights)} if sam is not None else {})},
        "versions": {"cass_plugins": __version__, "torch": torch.__version__},
        "device": str(args.device),
        "precision": args.precision,
    }
    stems = dict(zip(args.images, _unique_stems(args.images)))
    images = [p for p in args.images if not is_video_path(p)]
    failed: list[str] = []
    written = 0

    def fail(path: Path, err: Exception) -> None:
        if args.debug:
            raise err
        message = str(err) if isinstance(err, (ValueError, FileNotFoundError)) else _one_line(err)
        message = message if str(path) in message else f"{path}: {message}"
        if not args.keep_going:
            raise _CliError(message, code=1) from err
        print(f"error: {message} (skipped)", file=sys.stderr)
        failed.append(str(path))

    with segmenter:
        if images:
            written += _segment_images(args, segmenter, vocabulary, images, stems, exports, provenance, fail)
        for path in videos:
            try:
                written += _segment_one_video(args, segmenter, vocabulary, path, stems[path], exports, temporal,
                                              provenance)
            except _CliError:
                raise
            except Exception as err:  # one bad video must not cost the others (--keep-going)
                fail(path, err)
    print(f"wrote {written} files to {args.out}")
    if failed:
        print(f"error: {len(failed)} of {len(args.images)} images failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _temporal_from_args(args: argparse.Namespace, has_video: bool) -> TemporalConfig:
    """The video flags as a :class:`TemporalConfig`; refused without a video, or where they would not act."""
    from cass_plugins.video.temporal import resolve_temporal

    given = {flag: getattr(args, attr) for flag, attr in (
        ("--every", "every"), ("--max-frames", "max_frames"), ("--temporal", "temporal"),
        ("--smoothing", "smoothing"), ("--motion-threshold", "motion_threshold"), ("--tie-margin", "tie_margin"),
    ) if getattr(args, attr) is not None}
    if args.frame_labels:
        given["--frame-labels"] = True
    if given and not has_video:
        raise _CliError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to video inputs only "
                        f"({', '.join(VIDEO_SUFFIXES[:6])} ...), and none was given")
    if args.every is not None and args.every < 1:
        raise _CliError(f"--every must be >= 1 (1 = every frame, 2 = every other frame), got {args.every}")
    if args.max_frames is not None and args.max_frames < 1:
        raise _CliError(f"--max-frames must be >= 1, got {args.max_frames}")
    base = resolve_temporal(args.temporal or "on")
    values: dict[str, object] = {}
    if args.smoothing is not None:
        if not base.smoothing_on:
            raise _CliError(f"--smoothing has no effect with --temporal {args.temporal} (no smoothing); use "
                            "--temporal on or smoothing")
        values["smoothing"] = args.smoothing
    if args.motion_threshold is not None:
        if not base.smoothing_on:
            raise _CliError(f"--motion-threshold guards the smoothing, which --temporal {args.temporal} switches off")
        values["motion_threshold"] = args.motion_threshold
    if args.tie_margin is not None:
        if base.stable_matching is False:
            raise _CliError(f"--tie-margin belongs to the stable head assignment, which --temporal {args.temporal} "
                            "switches off")
        values["tie_margin"] = args.tie_margin
    try:
        return TemporalConfig(**{**base.__dict__, **values})
    except ValueError as err:
        raise _CliError(str(err)) from err


def _check_videos(videos: Sequence[Path]) -> None:
    """PyAV present and every video readable, before any model loads."""
    from cass_plugins.video.io import VideoError, probe_video, require_av

    try:
        require_av()
    except ImportError as err:
        raise _CliError(f"video input ({videos[0]}) needs PyAV: {VIDEO_INSTALL_HINT}") from err
    for path in videos:
        try:
            probe_video(path)
        except VideoError as err:
            raise _CliError(str(err)) from err


def _write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name in the same folder, then rename: no half-written file on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _export(result: object, folder: Path, exports: Sequence[str], dilate: int, *, npz_name: str = "maps.npz",
            masks_folder: Path | None = None) -> dict[str, str]:
    """Write the per-image exports (not coco-rle, which the caller collects); returns what was written where."""
    from cass_plugins.pipeline.export import write_mask_pngs

    out: dict[str, str] = {}
    if "png" in exports:
        target = masks_folder or folder
        files = write_mask_pngs(target, result.labels, result.vocabulary.class_names, dilate)
        out["png"] = str(target)
        out["mask_files"] = {name: p.name for name, p in files.items()}
    if "npz" in exports:
        folder.mkdir(parents=True, exist_ok=True)
        _write_file(folder / npz_name, lambda p: result.save_npz(p))
        out["npz"] = str(folder / npz_name)
    return out


def _segment_images(args: argparse.Namespace, segmenter: object, vocabulary: object, paths: Sequence[Path],
                    stems: dict[Path, str], exports: Sequence[str], provenance: dict,
                    fail: Callable[[Path, Exception], None]) -> int:
    """Segment the image inputs (through ``segment_many`` when the Segmenter has it); returns the files written."""
    from tqdm import tqdm

    from cass_plugins.pipeline.image import load_image
    from cass_plugins.pipeline.visualize import legend_overlay, save_label_map

    maps = "npz" in exports  # the probabilities are exported; otherwise labels only, memory bounded
    pending: deque[tuple[Path, torch.Tensor]] = deque()

    def loaded() -> Iterator[torch.Tensor]:
        for path in paths:
            try:
                image = load_image(path)
            except Exception as err:  # a bad file is reported and skipped (--keep-going) before the model sees it
                fail(path, err)
                continue
            pending.append((path, image))
            yield image

    many = getattr(segmenter, "segment_many", None)
    results = (many(loaded(), vocabulary, batch_size=args.batch_size, maps=maps) if many is not None
               else (segmenter.segment(image, maps=maps) for image in loaded()))
    written = 0
    bar = tqdm(total=len(paths), desc="segmenting", unit="img", disable=len(paths) < 2)
    with bar:
        for result in results:
            path, image = pending.popleft()
            stem = stems[path]
            bar.update(1)
            try:
                areas = result.class_areas()
                summary = {
                    "image": str(path),
                    "size": list(result.labels.shape),
                    "classes": list(result.vocabulary.class_names),
                    "synonyms": [list(c) for c in result.vocabulary.classes],
                    "areas": areas,
                    "config": segmenter.config.to_dict(),
                    **provenance,
                }
                overlay = legend_overlay(image, result.labels, result.vocabulary.class_names, areas, alpha=args.alpha)
                if exports:
                    folder = args.out / stem
                    summary["exports"] = _export(result, folder, exports, args.mask_dilate)
                    if "coco-rle" in exports:
                        doc = result.to_coco(image_id=1, file_name=path.name, dilate=args.mask_dilate)
                        _write_file(folder / "segments.coco.json", lambda p: p.write_text(json.dumps(doc)))
                        summary["exports"]["coco-rle"] = str(folder / "segments.coco.json")
                    written += len(summary["exports"].get("mask_files", {})) + ("npz" in exports) + ("coco-rle" in exports)
                _write_staged(args.out, {
                    f"{stem}_overlay.png": lambda p: overlay.save(p, format="PNG"),
                    f"{stem}_labels.png": lambda p: save_label_map(p, result.labels),
                    f"{stem}.json": lambda p: p.write_text(json.dumps(summary, indent=2, default=str)),
                })
                written += 3
            except Exception as err:  # one bad image must not cost the others (--keep-going)
                fail(path, err)
    return written


def _segment_one_video(args: argparse.Namespace, segmenter: object, vocabulary: object, path: Path, stem: str,
                       exports: Sequence[str], temporal: TemporalConfig, provenance: dict) -> int:
    """Segment one video: overlay video, per-frame JSON, optional label PNGs and exports; returns files written."""
    from tqdm import tqdm

    from cass_plugins.pipeline.export import coco_annotations, coco_document
    from cass_plugins.pipeline.visualize import legend_overlay, save_label_map
    from cass_plugins.video.io import VideoWriter, output_format, probe_video
    from cass_plugins.video.segment import segment_video

    info = probe_video(path)
    every = args.every or 1
    frames = segment_video(segmenter, path, vocabulary, every=every, max_frames=args.max_frames, temporal=temporal,
                           batch_size=args.batch_size, maps="npz" in exports)
    suffix, container, codec = output_format(path)
    final = args.out / f"{stem}_overlay{suffix}"
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    expected = -(-info.frames // every) if info.frames else None
    if expected is not None and args.max_frames is not None:
        expected = min(expected, args.max_frames)
    names = list(vocabulary.class_names)
    per_frame: list[dict] = []
    images_coco: list[dict] = []
    annotations: list[dict] = []
    changed: list[float] = []
    previous = None
    written = 0
    labels_dir = args.out / f"{stem}_labels"
    try:
        with VideoWriter(tmp, info.fps / every if info.fps else 25, container, codec) as writer, \
                tqdm(frames, total=expected, desc=stem, unit="frame", disable=None) as bar:
            for frame in bar:
                result = frame.result
                areas = result.class_areas()
                writer.write(np.asarray(legend_overlay(frame.image, result.labels, names, None, alpha=args.alpha,
                                                       only_present=False)))
                entry = {"index": frame.index, "time": frame.time, "areas": areas, "temporal": frame.temporal}
                if previous is not None:
                    changed.append(float((result.labels != previous).float().mean()))
                    entry["changed"] = changed[-1]
                previous = result.labels
                tag = f"{frame.index:06d}"
                if args.frame_labels:
                    labels_dir.mkdir(exist_ok=True)
                    _write_file(labels_dir / f"{tag}.png", lambda p: save_label_map(p, result.labels))
                    written += 1
                if exports:
                    entry["exports"] = _export(result, args.out / stem, exports, args.mask_dilate,
                                               npz_name=f"{tag}.npz", masks_folder=args.out / stem / tag)
                    written += len(entry["exports"].get("mask_files", {})) + ("npz" in exports)
                if "coco-rle" in exports:
                    h, w = result.labels.shape
                    images_coco.append({"id": frame.index, "file_name": tag, "height": int(h), "width": int(w)})
                    annotations += coco_annotations(result.labels, names, frame.index, dilate=args.mask_dilate,
                                                    first_id=len(annotations) + 1)
                per_frame.append(entry)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    written += 1
    if "coco-rle" in exports:
        doc = coco_document(images_coco, names, annotations)
        (args.out / stem).mkdir(exist_ok=True)
        _write_file(args.out / stem / "segments.coco.json", lambda p: p.write_text(json.dumps(doc)))
        written += 1
    summary = {
        "video": str(path),
        "size": [info.height, info.width],
        "fps": float(info.fps) if info.fps else None,
        "every": every,
        "max_frames": args.max_frames,
        "overlay": final.name,
        "overlay_padded": writer.padded,
        "classes": names,
        "synonyms": [list(c) for c in vocabulary.classes],
        "temporal": {**temporal.__dict__},
        # fraction of pixels whose label changed between consecutive segmented frames, averaged (docs/video.md)
        "flicker": float(np.mean(changed)) if changed else None,
        "frames": per_frame,
        "config": segmenter.config.to_dict(),
        **provenance,
    }
    _write_file(args.out / f"{stem}.json", lambda p: p.write_text(json.dumps(summary, indent=2, default=str)))
    return written + 1


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
