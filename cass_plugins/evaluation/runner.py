"""``evaluate()``: mIoU of one benchmark, resumable, single-process or sharded over a ``torchrun`` process group.

Every image is segmented by a :class:`~cass_plugins.pipeline.segmenter.Segmenter` built with ``dataset=<name>`` (the
dataset's preset values, cass.md §7) and the dataset's packaged class file (``Vocabulary.builtin(name)``); the
label map is scored against the original-resolution label with mmseg ``IoUMetric`` semantics (protocol.md §10).

Resuming: the output JSON keeps, per dataset, the names of the images already scored and the accumulated areas
(:meth:`IoUAccumulator.state_dict`). A rerun with the same configuration scores only the images not listed yet
(e.g. with a larger ``--limit``), so the result equals a single uninterrupted run. While running, each rank
checkpoints what it scored into ``<out>.partial.<dataset>.rank<k>.json`` every few images; the next run folds
those files in, so an interrupted run loses at most a few images. A run whose configuration, models or
vocabulary differ from the stored ones refuses to mix them (use another ``--out`` or ``--restart``). The files
are handled by :mod:`cass_plugins.evaluation.results`.

Distributed (:mod:`cass_plugins.evaluation.distributed`): the images still to score are split
``rank::world_size`` (no padding, so every image is counted exactly once), the per-class areas are summed with
:meth:`IoUAccumulator.all_reduce`, and rank 0 writes the one result, identical to a single-process run.

The command line (``cass-eval``) is :mod:`cass_plugins.cli.evaluate`; ``python -m cass_plugins.evaluation.runner``
and ``torchrun -m cass_plugins.evaluation.runner`` still run it.
"""
from __future__ import annotations

import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cass_plugins.core.registry import REGISTRY
from cass_plugins.evaluation.datasets import PreparedImages, SegmentationDataset, get_dataset_info
from cass_plugins.evaluation.distributed import DistInfo, all_reduce, barrier, dist_info, gather_names, shard
from cass_plugins.evaluation.distributed import init_distributed
from cass_plugins.evaluation.metrics import IoUAccumulator
from cass_plugins.evaluation.results import (
    build_section, jsonable, load_results, load_state, partial_paths, write_partial, write_section,
)
from cass_plugins.evaluation.tables import PAPER_ORDER, fmt, format_paper_table
from cass_plugins.pipeline.segmenter import Segmenter
from cass_plugins.pipeline.vocabulary import Vocabulary

__all__ = [
    "PAPER_ORDER",
    "DistInfo",
    "SegmenterFactory",
    "build_segmenter",
    "dataset_values",
    "evaluate",
    "format_paper_table",
    "init_distributed",
    "load_results",
]

#: ``factory(dataset_name) -> Segmenter``: builds the segmenter for one dataset (it is closed after use).
SegmenterFactory = Callable[[str], Segmenter]


def _describe_module(module: nn.Module | None) -> dict[str, Any] | None:
    """Class, parameter count and dtype: enough to tell two different models apart when resuming."""
    if module is None:
        return None
    params = list(module.parameters())
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "parameters": sum(p.numel() for p in params),
        "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
    }


def _unpack_models(models: Any) -> tuple[nn.Module, nn.Module | None, Any]:
    """``(clip, vfm, tokenizer)`` from a CLIP module, a tuple, a mapping or an object with attributes.

    Tuples may hold the CLIP model first and then the VFM and/or a tokenizer in either order (the VFM is the
    ``nn.Module``, the tokenizer is anything else), so ``(clip, vfm)``, ``(clip, vfm, tokenizer)`` and
    ``(clip, tokenizer, vfm)`` all work.
    """
    if isinstance(models, nn.Module):
        return models, None, None
    if isinstance(models, (tuple, list)):
        if not models or not isinstance(models[0], nn.Module):
            raise TypeError("a models tuple must start with the CLIP model (an nn.Module)")
        clip, vfm, tokenizer = models[0], None, None
        for item in models[1:]:
            if isinstance(item, nn.Module):
                vfm = item
            elif item is not None:
                tokenizer = item
        return clip, vfm, tokenizer
    if isinstance(models, Mapping):
        get = models.get
    else:
        def get(key: str, default: Any = None) -> Any:
            return getattr(models, key, default)
    clip = get("clip") or get("clip_model") or get("model")
    if not isinstance(clip, nn.Module):
        raise TypeError(
            "models must be a Segmenter factory, a CLIP nn.Module, a (clip, vfm[, tokenizer]) tuple, or a mapping / "
            f"object with 'clip', 'vfm' and 'tokenizer'; got {type(models).__name__}"
        )
    return clip, get("vfm"), get("tokenizer")


def _is_factory(models: Any) -> bool:
    # A plain callable is a factory; model objects (modules, tuples, mappings, objects with .clip) are not.
    return callable(models) and not isinstance(models, (nn.Module, tuple, list, Mapping)) and not any(
        hasattr(models, k) for k in ("clip", "clip_model")
    )


def _class_names(has_background: bool, vocab: Vocabulary) -> list[str]:
    """Per-class table keys: the first synonym of each class; class 0 of a background dataset is "background".

    (VOC21's and COCO-Object's class 0 is a list of stuff words starting with "sky"; the score is background's.)
    A repeated name gets its index appended so that no per-class entry is lost in the JSON object.
    """
    names = list(vocab.class_names)
    if has_background:
        names[0] = "background"
    seen: set[str] = set()
    for k, name in enumerate(names):
        if name in seen:
            names[k] = f"{name} ({k})"
        seen.add(names[k])
    return names


def evaluate(
    models: SegmenterFactory | Any,
    dataset: str,
    root: str | os.PathLike,
    limit: int | None = None,
    out: str | os.PathLike | None = None,
    *,
    preset: str = "cass-official",
    baseline: str | None = None,
    components: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    vocabulary: Any = None,
    device: str | torch.device | None = None,
    model_info: Mapping[str, Any] | None = None,
    restart: bool = False,
    progress: bool = True,
    verbose: bool = False,
    checkpoint_every: int = 20,
    text_cache: bool = True,
    batch_size: int = 1,
    workers: int = 0,
    compile: bool = False,
    sam: Any = None,
) -> dict[str, Any]:
    """Evaluate one dataset (resumable; sharded and all-reduced when a process group is initialised).

    Args:
        models: a :data:`SegmenterFactory` (``factory(dataset) -> Segmenter``), or the models: a CLIP
            ``nn.Module``, a ``(clip, vfm[, tokenizer])`` tuple, or a mapping / object with ``clip``, ``vfm`` and
            ``tokenizer`` entries (e.g. what ``cass_plugins.cli.segment.models_from_args`` returns).
        dataset: benchmark name (see :data:`cass_plugins.evaluation.datasets.DATASETS`).
        root: the dataset root or a data folder holding the conventional root.
        limit: score only the first ``limit`` images of the dataset (in the dataset's order).
        out: result JSON to resume from and write to (``None``: nothing is read or written).
        preset, baseline, components, overrides: the segmenter configuration when ``models`` are given
            (``dataset=`` is always the evaluated dataset; ignored for a factory).
        vocabulary: override the dataset's class file (must have the dataset's number of classes); default:
            ``Vocabulary.builtin(dataset, config.class_files)``.
        device: move the models there (default: where they are).
        model_info: extra model identity stored in the result under ``models.flags`` (e.g. the command-line model
            flags).
        restart: discard a stored result for this dataset instead of resuming it.
        progress: show a tqdm bar (rank 0 only).
        verbose: print the resolved configuration (rank 0 only).
        checkpoint_every: images between two checkpoints of this rank's progress (only with ``out``).
        text_cache: use the on-disk text-embedding cache.
        batch_size: images per :meth:`~cass_plugins.pipeline.segmenter.Segmenter.segment_many` batch (the windows
            of that many images share forwards; logits equal one image at a time to float rounding). With 1 and no
            workers each image is segmented from its path by ``Segmenter.segment``.
        workers: ``DataLoader`` worker processes that decode, resize and normalise the images while the models
            run (0: in this process). On CUDA the prepared images are pinned and copied without blocking.
        compile: ``torch.compile`` the towers (``Segmenter(compile=True)``; ignored for a factory).
        sam: the SAM model of the SAM components (Trident, ``sam_refine``; :func:`~cass_plugins.load_sam`); ignored
            for a factory.

    Returns:
        the dataset's result section: ``mIoU``, ``aAcc``, ``mAcc``, ``pAcc``, per-class ``IoU`` / ``Acc``
        (class name → percent, ``None`` for classes excluded from the means), counts, the configuration, and the
        resume state (``scored`` names, accumulator ``state``).

    Raises:
        ValueError: the vocabulary does not fit the dataset, a stored result has another configuration, or a
            prediction does not have the label's shape.
    """
    from tqdm import tqdm

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of images, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be a number of worker processes >= 0, got {workers!r}")
    dist = dist_info()
    info = get_dataset_info(dataset)
    ds = SegmentationDataset(info.name, root)
    vocab = Vocabulary.parse(vocabulary) if vocabulary is not None else None
    if vocab is not None and vocab.num_classes != info.num_classes:
        raise ValueError(
            f"{info.name} has {info.num_classes} classes but the vocabulary has {vocab.num_classes}: "
            "the class index must equal the label value"
        )
    index = {name: i for i, name in enumerate(ds.names)}
    if len(index) != len(ds.names):
        raise ValueError(f"{info.name}: the image list names an image twice; names must be unique to resume")
    n = len(ds) if limit is None else min(limit, len(ds))

    segmenter = build_segmenter(models, info.name, preset, baseline, components, overrides, device, text_cache,
                                compile=compile, sam=sam)
    try:
        if vocab is None:
            # The preset says whose class files to use (ProxyCLIP ships its own VOC / COCO-Object files).
            vocab = Vocabulary.builtin(info.name, getattr(segmenter.config, "class_files", "cass"))
        class_names = _class_names(info.has_background, vocab)
        identity = {
            "config": segmenter.config.to_dict(),
            "models": {
                "clip": _describe_module(segmenter.model),
                "vfm": _describe_module(segmenter.vfm),
                "flags": dict(model_info or {}),
            },
            "vocabulary": [list(c) for c in vocab.classes],
        }
        identity = jsonable(identity)
        if verbose and dist.is_main:
            print(f"== {info.name} ({info.display_name}): {len(ds)} images, {info.num_classes} classes, root {ds.root}")
            print(segmenter.describe())

        # -- resume: every rank reads the same stored state; rank 0 then folds checkpoints into the result file
        out_path = Path(out) if out is not None else None
        base_acc = IoUAccumulator(info.num_classes)
        scored: set[str] = set()
        if out_path is not None:
            base_acc, scored, folded = load_state(out_path, info.name, identity, index, restart)
            barrier()
            if dist.is_main and folded:
                write_section(out_path, build_section(ds, identity, _ordered(scored, index), base_acc, limit,
                                                      class_names))
                for p in partial_paths(out_path, info.name):
                    p.unlink()
            barrier()

        todo = [i for i in range(n) if ds.names[i] not in scored]
        mine = shard(todo, dist)
        new_acc = IoUAccumulator(info.num_classes)
        new_names: list[str] = []
        bar = tqdm(total=len(mine), desc=f"{info.display_name}", unit="img", disable=not (progress and dist.is_main),
                   dynamic_ncols=True)
        for item, result in _segment_items(segmenter, ds, mine, vocab, batch_size, workers):
            bar.update(1)
            pred = result.labels
            label = item["label"]
            if tuple(pred.shape) != tuple(label.shape):
                raise ValueError(
                    f"{info.name}/{item['name']}: prediction {tuple(pred.shape)} vs label {tuple(label.shape)}; the "
                    "image and its label differ in size (an EXIF-rotated image, or a mismatched label file)"
                )
            new_acc.update(pred, label)
            new_names.append(item["name"])
            if out_path is not None and len(new_names) % checkpoint_every == 0:
                write_partial(out_path, info.name, dist.rank, identity, new_names, new_acc)
            if len(new_names) % 10 == 0 or len(new_names) == len(mine):
                bar.set_postfix_str(f"mIoU {fmt(new_acc.compute(2)['mIoU'])} (rank {dist.rank}, new images)")
        bar.close()

        # -- combine: the areas are additive, so base + Σ_ranks new equals one uninterrupted single-process run
        all_reduce(new_acc)
        all_new = gather_names(new_names)
        total = base_acc.merge(new_acc)
        names = _ordered(scored | set(all_new), index)
        section = build_section(ds, identity, names, total, limit, class_names)
        if out_path is not None:
            if dist.is_main:
                write_section(out_path, section)
            barrier()  # no rank may still be writing a checkpoint when rank 0 removes them
            if dist.is_main:
                for p in partial_paths(out_path, info.name):
                    p.unlink()
            barrier()
        return section
    finally:
        segmenter.close()


def _segment_items(segmenter: Segmenter, ds: SegmentationDataset, indices: Sequence[int], vocab: Vocabulary,
                   batch_size: int, workers: int) -> Iterator[tuple[dict[str, Any], Any]]:
    """``(item, result)`` per index, in order: images decoded by ``DataLoader`` workers, segmented in batches.

    Only the labels are scored, so the results hold no full-size maps (``maps=False``: identical labels).
    """
    if batch_size == 1 and workers == 0:  # one image at a time in this process: nothing to overlap
        for i in indices:
            item = ds[i]
            yield item, segmenter.segment(item["image_path"], vocab)
        return
    cfg = segmenter.config.pipeline
    # splice mode (and per-image third-party plugins) read each image from its path in segment()
    short_side = cfg.short_side if segmenter.batches_images else None
    loader = torch.utils.data.DataLoader(
        PreparedImages(ds, indices, short_side, cfg.max_long_side), batch_size=None, shuffle=False,
        num_workers=workers, pin_memory=segmenter.device.type == "cuda",
        prefetch_factor=max(2, batch_size // max(workers, 1) + 1) if workers > 0 else None,
    )
    pending: deque[dict[str, Any]] = deque()

    def images() -> Iterator[Any]:
        for item in loader:
            pending.append(item)
            yield item["image"]

    for result in segmenter.segment_many(images(), vocab, batch_size=batch_size, maps=False):
        yield pending.popleft(), result


def _ordered(names: set[str], index: Mapping[str, int]) -> list[str]:
    # Dataset order, so the stored list does not depend on how the work was sharded.
    return sorted(names, key=lambda n: index[n])


def build_segmenter(
    models: Any, dataset: str, preset: str, baseline: str | None, components: Sequence[str] | None,
    overrides: Mapping[str, Any] | None, device: str | torch.device | None, text_cache: bool = True,
    *, compile: bool = False, sam: Any = None,
) -> Segmenter:
    """The segmenter of one dataset: the factory's, or one built on the models with the dataset's preset values.

    Raises:
        TypeError: the factory returned something else, or ``models`` is not a form :func:`evaluate` accepts.
    """
    if _is_factory(models):
        segmenter = models(dataset)
        if not isinstance(segmenter, Segmenter):
            raise TypeError(f"the segmenter factory returned {type(segmenter).__name__}, not a Segmenter")
        return segmenter
    clip, vfm, tokenizer = _unpack_models(models)
    overrides = dict(overrides or {})
    ds_values = dataset_values(preset, dataset)
    if ds_values is None:
        # A preset without per-dataset values (e.g. a third-party baseline preset) still evaluates, with the
        # preset's own protocol values; say so, since short side / thresholds may then differ from the paper's.
        warnings.warn(f"preset {preset!r} has no {dataset!r} values; using the preset's defaults", stacklevel=3)
    return Segmenter(
        clip, vfm, preset=preset, dataset=ds_values, baseline=baseline, components=components, tokenizer=tokenizer,
        device=device, text_cache=text_cache, compile=compile, sam=sam, **overrides,
    )


def dataset_values(preset: str, dataset: str) -> str | None:
    """``dataset`` when the preset has values for it, else ``None`` (the preset's own protocol values apply)."""
    return dataset if dataset in REGISTRY.preset(preset).datasets else None


def _cli_main(argv: Sequence[str] | None = None) -> int:
    """``cass-eval`` for ``python -m`` / ``torchrun -m cass_plugins.evaluation.runner`` (the former module path)."""
    # Imported when called: cli/evaluate.py imports this module, so a module-level import would be a cycle.
    from cass_plugins.cli.evaluate import main

    return main(argv)


def __getattr__(name: str) -> Any:
    # ``main`` moved to cass_plugins.cli.evaluate; ``from cass_plugins.evaluation.runner import main`` still works.
    if name == "main":
        from cass_plugins.cli.evaluate import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(_cli_main())
