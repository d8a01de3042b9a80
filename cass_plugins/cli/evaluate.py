"""``cass-eval``: mIoU on the eight benchmarks, resumable, single-process or distributed with ``torchrun``.

Usage::

    cass-eval --dataset voc21 --dataset context60 --data-root data --clip ViT-B-16 --pretrained openai \\
        --vfm vit_base_patch8_224.dino --out results.json [--limit N] [--preset cass-official] [--set key=value ...]
    torchrun --nproc_per_node 4 -m cass_plugins.cli.evaluate --dataset ade20k --data-root data ... --out results.json

Everything that can be checked without the models is checked before they load (exit status 2, one line): the
options and ``--set`` values, the dataset folders, and that a result stored in ``--out`` has the same
configuration and model flags. The evaluation itself is :func:`cass_plugins.evaluation.runner.evaluate`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from cass_plugins.cli.common import (
    CliParser, add_model_arguments, models_from_args, parse_components, sam_from_args, vfm_name, vfm_requested,
)
from cass_plugins.core.config import Config, parse_overrides, resolve_config
from cass_plugins.core.registry import REGISTRY
from cass_plugins.evaluation.datasets import SegmentationDataset, get_dataset_info
from cass_plugins.evaluation.distributed import init_distributed, teardown
from cass_plugins.evaluation.results import check_resumable
from cass_plugins.evaluation.runner import dataset_values, evaluate
from cass_plugins.evaluation.tables import PAPER_ORDER, format_dataset_table, format_paper_table, format_scores

__all__ = ["build_parser", "main"]

# The model flags stored under ``models.flags`` of a result (what identifies command-line models).
_MODEL_FLAGS = ("clip", "pretrained", "vfm", "vfm_weights", "precision", "sam", "sam_weights")


def build_parser(with_model_flags: bool = True) -> argparse.ArgumentParser:
    """The ``cass-eval`` argument parser (model flags shared with ``cass-segment``).

    Args:
        with_model_flags: add ``--clip``, ``--pretrained``, ``--vfm``, ... (off when the models are passed in).
    """
    p = CliParser(
        prog="cass-eval",
        description="Evaluate training-free open-vocabulary segmentation (mIoU, mmseg IoUMetric semantics) on the "
                    "eight benchmarks. Resumable; distributed under torchrun.",
    )
    p.add_argument("--dataset", action="append", required=True, metavar="NAME",
                   help=f"benchmark to evaluate, repeatable; one of {', '.join(PAPER_ORDER)}")
    p.add_argument("--data-root", required=True, metavar="DIR",
                   help="the dataset root, or a data folder holding the conventional roots (VOCdevkit/VOC2012, ...)")
    p.add_argument("--preset", default="cass-official", help="method preset (default: cass-official)")
    p.add_argument("--baseline", default=None, help="last-block baseline (e.g. naclip)")
    p.add_argument("--components", default=None, metavar="LIST",
                   help="components to switch on, comma-separated (spectral, ops, ota, cdam, third-party ones), or "
                        "'none' (default: the preset's)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a setting (section.key=value; see the printed config), e.g. --set pamr_steps=10 "
                        "spectral.lowrank=exact")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N images per dataset")
    p.add_argument("--out", default=None, metavar="JSON",
                   help="result file; resumed if it exists (images already scored are skipped)")
    p.add_argument("--restart", action="store_true", help="discard stored results of the evaluated datasets")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk text-embedding cache")
    p.add_argument("--checkpoint-every", type=int, default=20, metavar="N",
                   help="images between two progress checkpoints (default 20)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="images whose windows share forwards (Segmenter.segment_many; default: 8 on CUDA, 1 on the "
                        "CPU, where the forwards dominate and batching gains nothing)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="DataLoader processes decoding and resizing images while the models run (default: 4 on "
                        "CUDA, 0 on the CPU, where they would compete with the models for the cores)")
    p.add_argument("--dist-backend", default=None, choices=("nccl", "gloo"),
                   help="torch.distributed backend under torchrun (default: nccl on CUDA, gloo on CPU)")
    if with_model_flags:
        add_model_arguments(p)
    else:
        p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: where the models are)")
    return p


def _one_line(err: BaseException) -> str:
    # KeyError's str() is the repr of its message; multi-line messages would break the one-line error.
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())


def _resolve(args: argparse.Namespace, with_vfm: bool) -> tuple[list[str] | None, dict[str, Any], dict[str, Config]]:
    """Components, typed overrides and each dataset's resolved configuration of the configuration flags.

    Raises:
        KeyError, ValueError (SettingError): unknown dataset, preset, baseline, component or key, or a bad value.
    """
    components = parse_components(args.components)
    base = resolve_config(args.preset, baseline=args.baseline, components=components)
    if not with_vfm:
        # --vfm none: the components that need a VFM are off (naming one explicitly is an error)
        needing = [n for n in base.components if REGISTRY.component(n).needs_vfm]
        if needing and components is not None:
            raise ValueError(f"--components {','.join(needing)} need a VFM, but --vfm none was given")
        if needing:
            components = [n for n in base.components if n not in needing]
            base = resolve_config(args.preset, baseline=args.baseline, components=components)
    overrides = parse_overrides(args.overrides, base)
    configs = {}
    for dataset in args.dataset:
        name = get_dataset_info(dataset).name
        # the configuration evaluate() will build for this dataset: checked now, not after minutes of loading
        configs[name] = resolve_config(args.preset, dataset_values(args.preset, name), baseline=args.baseline,
                                       components=components, **overrides)
    return components, overrides, configs


def _check_data(names: Sequence[str], data_root: str) -> None:
    """Every dataset's folder layout and files under ``data_root``.

    Raises:
        FileNotFoundError, ValueError: naming the path that was expected (see ``SegmentationDataset``).
    """
    if not data_root.strip():
        raise ValueError("--data-root is empty; give the dataset root or the folder holding it")
    for name in names:
        SegmentationDataset(name, data_root)


def _check_resume(out: str, configs: Mapping[str, Config], model_flags: Mapping[str, Any]) -> None:
    """Stored sections of ``out`` against the run's configuration and model flags (ValueError on a mismatch)."""
    for name, config in configs.items():
        check_resumable(out, name, config.to_dict(), model_flags)


def main(argv: Sequence[str] | None = None, *, models: Any = None) -> int:
    """Entry point of ``cass-eval`` (and of ``python -m`` / ``torchrun -m cass_plugins.cli.evaluate``).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).
        models: models to use instead of loading them from the model flags (anything
            :func:`~cass_plugins.evaluation.runner.evaluate` accepts); the Python-side way to evaluate in-memory
            models with the full command line.

    Returns:
        0 on success; usage errors and inputs found wrong before the models load exit with status 2.
    """
    parser = build_parser(with_model_flags=models is None)
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive number of images, got {args.limit}")
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")
    if models is None:
        args.vfm = vfm_name(args)  # the preset's published VFM unless --vfm says otherwise, recorded as used
    model_flags = {k: getattr(args, k) for k in _MODEL_FLAGS if hasattr(args, k)} if models is None else {}
    # the SAM flags join the identity only when given, so results stored before they existed still resume
    model_flags = {k: v for k, v in model_flags.items() if not (k.startswith("sam") and v is None)}
    sam = None
    try:
        components, overrides, configs = _resolve(args, with_vfm=models is not None or vfm_requested(args))
        _check_data(list(configs), args.data_root)
        if args.out and not args.restart:
            _check_resume(args.out, configs, model_flags)
        if models is None:
            sam = sam_from_args(args, list(configs.values()))  # its file errors before the CLIP loads
    except (KeyError, ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        parser.error(_one_line(e))

    dist, device = init_distributed(args.device, args.dist_backend)
    try:
        if models is None:
            args.device = device
            models = models_from_args(args)
            eval_device = None  # models_from_args already placed them
        else:
            eval_device = device
        on_cuda = str(device).startswith("cuda")
        workers = args.workers if args.workers is not None else (4 if on_cuda else 0)
        batch_size = args.batch_size if args.batch_size is not None else (8 if on_cuda else 1)
        sections: dict[str, dict[str, Any]] = {}
        for name in configs:
            sections[name] = evaluate(
                models, name, args.data_root, limit=args.limit, out=args.out, preset=args.preset,
                baseline=args.baseline, components=components, overrides=overrides,
                device=eval_device, model_info=model_flags, restart=args.restart, progress=not args.no_progress,
                verbose=True, checkpoint_every=args.checkpoint_every, text_cache=not args.no_cache,
                batch_size=batch_size, workers=workers, compile=getattr(args, "compile", False), sam=sam,
            )
        if dist.is_main:
            print()
            print(format_scores(sections))
            print()
            if len(sections) == 1:
                print(format_dataset_table(next(iter(sections.values()))))
            else:
                print(format_paper_table(sections))
            if args.out:
                print(f"\nresults written to {args.out}")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
