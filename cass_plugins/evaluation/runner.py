"""``cass-eval``: mIoU on the eight benchmarks, resumable, single-process or distributed with ``torchrun``.

Usage::

    cass-eval --dataset voc21 --dataset context60 --data-root data --clip ViT-B-16 --pretrained openai \\
        --vfm vit_base_patch8_224.dino --out results.json [--limit N] [--preset cass-official] [--set key=value ...]
    torchrun --nproc_per_node 4 -m cass_plugins.evaluation.runner --dataset ade20k --data-root data ... --out results.json

Every image is segmented by a :class:`~cass_plugins.pipeline.segmenter.Segmenter` built with ``dataset=<name>`` (the
dataset's preset values, cass.md §7) and the dataset's packaged class file (``Vocabulary.builtin(name)``); the
label map is scored against the original-resolution label with mmseg ``IoUMetric`` semantics (protocol.md §10).

Resuming: the output JSON keeps, per dataset, the names of the images already scored and the accumulated areas
(:meth:`IoUAccumulator.state_dict`). A rerun with the same configuration scores only the images not listed yet
(e.g. with a larger ``--limit``), so the result equals a single uninterrupted run. While running, each rank
checkpoints what it scored into ``<out>.partial.<dataset>.rank<k>.json`` every few images; the next run folds
those files in, so an interrupted run loses at most a few images. A run whose configuration, models or
vocabulary differ from the stored ones refuses to mix them (use another ``--out`` or ``--restart``).

Distributed: under ``torchrun`` the process group is initialised from the environment (NCCL when running on
CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on CPU). The images still to score are split ``rank::world_size``
(no padding, so every image is counted exactly once), the per-class areas are summed with
:meth:`IoUAccumulator.all_reduce`, and rank 0 writes the one result, identical to a single-process run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cass_plugins.evaluation.datasets import DATASETS, SegmentationDataset, get_dataset_info
from cass_plugins.evaluation.metrics import IoUAccumulator
from cass_plugins.cli.common import parse_components, vfm_requested
from cass_plugins.core.config import parse_overrides, resolve_config
from cass_plugins.core.registry import REGISTRY
from cass_plugins.pipeline.segmenter import Segmenter
from cass_plugins.pipeline.vocabulary import Vocabulary

__all__ = [
    "PAPER_ORDER",
    "DistInfo",
    "evaluate",
    "format_paper_table",
    "init_distributed",
    "load_results",
    "main",
]

FORMAT = "cass_plugins.evaluation.runner/1"

#: Column order of the papers' main table (cass.md §8): V21 PC60 Obj V20 PC59 Stuff City ADE.
PAPER_ORDER: tuple[str, ...] = (
    "voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff164k", "cityscapes", "ade20k",
)

#: ``factory(dataset_name) -> Segmenter``: builds the segmenter for one dataset (it is closed after use).
SegmenterFactory = Callable[[str], Segmenter]

# Identity keys of a dataset section: a stored result is only resumed when all of them match.
_IDENTITY_KEYS = ("config", "models", "vocabulary")


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a torch.distributed job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank / world size of the initialised process group, or the single-process defaults."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistInfo(
            torch.distributed.get_rank(),
            torch.distributed.get_world_size(),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
    return DistInfo()


def init_distributed(device: str | None = None, backend: str | None = None) -> tuple[DistInfo, str | None]:
    """Initialise the process group from the ``torchrun`` environment, if there is one.

    Args:
        device: the requested device (``None``: CUDA when available, else CPU). Under torchrun on CUDA each rank
            gets ``cuda:LOCAL_RANK`` instead of the requested index.
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (NCCL on CUDA, gloo on CPU).

    Returns:
        this process's :class:`DistInfo` and the device it should use (unchanged when not distributed).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and "RANK" not in os.environ:
        return DistInfo(), device
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE is set but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = (device is None and torch.cuda.is_available()) or (device is not None and device.startswith("cuda"))
    if on_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} requested but CUDA is not available")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s); "
                "use --nproc_per_node <= the number of GPUs (or --device cpu with gloo)"
            )
        torch.cuda.set_device(local_rank)  # NCCL collectives and all_gather_object use the current device
        device = f"cuda:{local_rank}"
    backend = backend or ("nccl" if on_cuda else "gloo")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, init_method="env://")
    return dist_info(), device


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _gather_names(names: list[str]) -> list[str]:
    """Concatenation of every rank's list (the local list when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(names)
    gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(names))
    return [n for part in gathered for n in (part or [])]


# ----------------------------------------------------------------------------------------------------------------
# JSON helpers


def _jsonable(obj: Any) -> Any:
    """JSON-normalised copy: tuples → lists, NaN → None (strict JSON has no NaN), other objects → str."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _atomic_write_json(path: Path, data: Any) -> None:
    # Write-then-rename: an interrupted write never leaves a truncated result behind.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``cass-eval`` result file (an empty result when it does not exist).

    Raises:
        ValueError: the file is not a cass-eval result.
    """
    path = Path(path)
    if not path.exists():
        return {"format": FORMAT, "datasets": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); pass another --out or delete it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cass-eval result (format {data.get('format')!r}, expected {FORMAT!r})")
    return data


def _partial_paths(out: Path, dataset: str) -> list[Path]:
    prefix = f"{out.name}.partial.{dataset}.rank"
    if not out.parent.is_dir():
        return []
    return sorted(out.parent / f for f in os.listdir(out.parent) if f.startswith(prefix) and f.endswith(".json"))


def _partial_path(out: Path, dataset: str, rank: int) -> Path:
    return out.with_name(f"{out.name}.partial.{dataset}.rank{rank}.json")


# ----------------------------------------------------------------------------------------------------------------
# Models → segmenter


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
    return callable(models) and not isinstance(models, (nn.Module, tuple, list, Mapping)) and not any(
        hasattr(models, k) for k in ("clip", "clip_model")
    )


# ----------------------------------------------------------------------------------------------------------------
# Sections and tables


def _metrics(acc: IoUAccumulator, class_names: Sequence[str]) -> dict[str, Any]:
    res = acc.compute(2)
    return {
        "mIoU": res["mIoU"],
        "aAcc": res["aAcc"],
        "mAcc": res["mAcc"],
        "pAcc": res["pAcc"],
        "IoU": dict(zip(class_names, res["IoU"])),
        "Acc": dict(zip(class_names, res["Acc"])),
        "num_pixels": res["num_pixels"],
        "invalid_label_pixels": res["invalid_label_pixels"],
        "invalid_pred_pixels": res["invalid_pred_pixels"],
    }


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


def _section(
    ds: SegmentationDataset, identity: dict[str, Any], scored: list[str], acc: IoUAccumulator, limit: int | None,
    class_names: Sequence[str],
) -> dict[str, Any]:
    info = ds.info
    section: dict[str, Any] = {
        "dataset": info.name,
        "display_name": info.display_name,
        "root": str(ds.root),
        "num_images": len(scored),
        "num_images_total": len(ds),
        "limit": limit,
        "complete": len(scored) == len(ds),
    }
    section.update(_metrics(acc, class_names))
    section.update(identity)
    section["scored"] = list(scored)
    section["state"] = acc.state_dict()
    return _jsonable(section)


def _fmt(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _summary(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The paper's 8 columns (+ avg over the evaluated ones) for mIoU and aAcc."""
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
    summary = _summary(sections)
    cols = summary["columns"]
    incomplete = set(summary["incomplete"])
    head = [c + ("*" if c in incomplete else "") for c in cols]
    lines = ["| | " + " | ".join(head) + " |", "|---|" + "---:|" * len(cols)]
    for metric in ("mIoU", "aAcc"):
        lines.append(f"| {metric} | " + " | ".join(_fmt(summary[metric][c]) for c in cols) + " |")
    n = len(summary["evaluated"])
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


def _format_dataset_table(section: Mapping[str, Any]) -> str:
    acc = IoUAccumulator.from_state(section["state"])
    return acc.markdown_table(list(section["IoU"].keys()))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


def _same(a: Any, b: Any) -> bool:
    return json.dumps(_jsonable(a), sort_keys=True) == json.dumps(_jsonable(b), sort_keys=True)


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested configuration sections as ``section.key`` entries."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_identity(what: str, stored: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
    for key in _IDENTITY_KEYS:
        if not _same(stored.get(key), identity[key]):
            detail = ""
            if key == "config" and isinstance(stored.get(key), Mapping):
                old, new = _flatten(stored[key]), _flatten(identity[key])
                diff = sorted(k for k in set(old) | set(new) if not _same(old.get(k), new.get(k)))
                detail = f" (differing keys: {diff})"
            raise ValueError(
                f"{what} was produced with a different {key}{detail}; resuming would mix two evaluations. "
                "Write to another --out, or pass --restart (restart=True) to discard the stored result"
            )


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

    segmenter = _build_segmenter(models, info.name, preset, baseline, components, overrides, device, text_cache)
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
        identity = _jsonable(identity)
        if verbose and dist.is_main:
            print(f"== {info.name} ({info.display_name}): {len(ds)} images, {info.num_classes} classes, root {ds.root}")
            print(segmenter.describe())

        # -- resume: every rank reads the same stored state; rank 0 then folds checkpoints into the result file
        out_path = Path(out) if out is not None else None
        base_acc = IoUAccumulator(info.num_classes)
        scored: set[str] = set()
        if out_path is not None:
            base_acc, scored, folded = _load_state(out_path, info.name, identity, index, restart)
            _barrier()
            if dist.is_main and folded:
                _write_section(out_path, _section(ds, identity, _ordered(scored, index), base_acc, limit,
                                                  class_names))
                for p in _partial_paths(out_path, info.name):
                    p.unlink()
            _barrier()

        todo = [i for i in range(n) if ds.names[i] not in scored]
        mine = todo[dist.rank::dist.world_size]
        new_acc = IoUAccumulator(info.num_classes)
        new_names: list[str] = []
        bar = tqdm(mine, desc=f"{info.display_name}", unit="img", disable=not (progress and dist.is_main),
                   dynamic_ncols=True)
        for i in bar:
            item = ds[i]
            pred = segmenter.segment(item["image_path"], vocab).labels
            label = item["label"]
            if tuple(pred.shape) != tuple(label.shape):
                raise ValueError(
                    f"{info.name}/{item['name']}: prediction {tuple(pred.shape)} vs label {tuple(label.shape)}; the "
                    "image and its label differ in size (an EXIF-rotated image, or a mismatched label file)"
                )
            new_acc.update(pred, label)
            new_names.append(item["name"])
            if out_path is not None and len(new_names) % checkpoint_every == 0:
                _write_partial(out_path, info.name, dist.rank, identity, new_names, new_acc)
            if len(new_names) % 10 == 0 or len(new_names) == len(mine):
                bar.set_postfix_str(f"mIoU {_fmt(new_acc.compute(2)['mIoU'])} (rank {dist.rank}, new images)")
        bar.close()

        # -- combine: the areas are additive, so base + Σ_ranks new equals one uninterrupted single-process run
        new_acc.all_reduce()
        all_new = _gather_names(new_names)
        total = base_acc.merge(new_acc)
        names = _ordered(scored | set(all_new), index)
        section = _section(ds, identity, names, total, limit, class_names)
        if out_path is not None:
            if dist.is_main:
                _write_section(out_path, section)
            _barrier()  # no rank may still be writing a checkpoint when rank 0 removes them
            if dist.is_main:
                for p in _partial_paths(out_path, info.name):
                    p.unlink()
            _barrier()
        return section
    finally:
        segmenter.close()


def _ordered(names: set[str], index: Mapping[str, int]) -> list[str]:
    # Dataset order, so the stored list does not depend on how the work was sharded.
    return sorted(names, key=lambda n: index[n])


def _build_segmenter(
    models: Any, dataset: str, preset: str, baseline: str | None, components: Sequence[str] | None,
    overrides: Mapping[str, Any] | None, device: str | torch.device | None, text_cache: bool = True,
) -> Segmenter:
    if _is_factory(models):
        segmenter = models(dataset)
        if not isinstance(segmenter, Segmenter):
            raise TypeError(f"the segmenter factory returned {type(segmenter).__name__}, not a Segmenter")
        return segmenter
    clip, vfm, tokenizer = _unpack_models(models)
    overrides = dict(overrides or {})
    ds_values = _dataset_values(preset, dataset)
    if ds_values is None:
        # A preset without per-dataset values (e.g. a third-party baseline preset) still evaluates, with the
        # preset's own protocol values; say so, since short side / thresholds may then differ from the paper's.
        warnings.warn(f"preset {preset!r} has no {dataset!r} values; using the preset's defaults", stacklevel=3)
    return Segmenter(
        clip, vfm, preset=preset, dataset=ds_values, baseline=baseline, components=components, tokenizer=tokenizer,
        device=device, text_cache=text_cache, **overrides,
    )


def _dataset_values(preset: str, dataset: str) -> str | None:
    """``dataset`` when the preset has values for it, else ``None`` (the preset's own protocol values apply)."""
    return dataset if dataset in REGISTRY.preset(preset).datasets else None


def _load_state(
    out: Path, dataset: str, identity: Mapping[str, Any], index: Mapping[str, int], restart: bool,
) -> tuple[IoUAccumulator, set[str], bool]:
    """Stored areas and scored names of ``dataset`` (result file + checkpoints); whether checkpoints were folded."""
    num_classes = get_dataset_info(dataset).num_classes
    data = load_results(out)
    partials = _partial_paths(out, dataset)
    if restart:
        return IoUAccumulator(num_classes), set(), bool(partials) or dataset in data.get("datasets", {})
    acc = IoUAccumulator(num_classes)
    scored: set[str] = set()
    stored = data.get("datasets", {}).get(dataset)
    if stored is not None:
        _check_identity(f"{out} [{dataset}]", stored, identity)
        acc = IoUAccumulator.from_state(stored["state"])
        scored = set(stored["scored"])
    folded = False
    for p in partials:
        part = json.loads(p.read_text())
        _check_identity(f"checkpoint {p}", part, identity)
        names = set(part["scored"])
        if names <= scored:
            continue  # already folded into the result by a run that stopped before deleting its checkpoints
        if names & scored:
            raise ValueError(f"checkpoint {p} overlaps the stored result partially; delete it or pass --restart")
        acc.merge(IoUAccumulator.from_state(part["state"]))
        scored |= names
        folded = True
    unknown = sorted(scored - set(index))
    if unknown:
        raise ValueError(
            f"{out} [{dataset}] lists {len(unknown)} image(s) that are not in this dataset (first: {unknown[0]!r}); "
            "it was produced on other data: write to another --out or pass --restart"
        )
    if acc.num_images != len(scored):
        raise ValueError(f"{out} [{dataset}]: {acc.num_images} accumulated images but {len(scored)} scored names")
    return acc, scored, folded or bool(partials)


def _write_partial(out: Path, dataset: str, rank: int, identity: Mapping[str, Any], names: list[str],
                   acc: IoUAccumulator) -> None:
    data = dict(identity)
    data["scored"] = list(names)
    data["state"] = acc.state_dict()
    _atomic_write_json(_partial_path(out, dataset, rank), _jsonable(data))


def _write_section(out: Path, section: Mapping[str, Any]) -> None:
    data = load_results(out)
    datasets = dict(data.get("datasets", {}))
    datasets[section["dataset"]] = section
    # Keep the sections in the papers' column order, whatever order the runs came in.
    ordered = {k: datasets[k] for k in PAPER_ORDER if k in datasets}
    ordered.update({k: v for k, v in datasets.items() if k not in ordered})
    result = {"format": FORMAT, "datasets": ordered, "summary": _summary(ordered)}
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(out, _jsonable(result))


# ----------------------------------------------------------------------------------------------------------------
# Command line


def _cli_models() -> tuple[Callable[[argparse.ArgumentParser], Any], Callable[[argparse.Namespace], Any]] | None:
    try:
        from cass_plugins.cli.common import add_model_arguments, models_from_args
    except ImportError:
        return None
    return add_model_arguments, models_from_args


def build_parser(with_model_flags: bool = True) -> argparse.ArgumentParser:
    """The ``cass-eval`` argument parser (model flags shared with ``cass-segment``)."""
    p = argparse.ArgumentParser(
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
    p.add_argument("--dist-backend", default=None, choices=("nccl", "gloo"),
                   help="torch.distributed backend under torchrun (default: nccl on CUDA, gloo on CPU)")
    if with_model_flags:
        hooks = _cli_models()
        if hooks is not None:
            hooks[0](p)
    if not any(a.dest == "device" for a in p._actions):
        p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    return p


def _validate_config(preset: str, datasets: Sequence[str], baseline: str | None, components: Sequence[str] | None,
                     overrides: Mapping[str, Any]) -> None:
    """Fail on a bad preset / baseline / component / key before spending minutes loading models."""
    for name in datasets:
        resolve_config(preset, _dataset_values(preset, name), baseline=baseline, components=components, **overrides)


def main(argv: Sequence[str] | None = None, *, models: Any = None) -> int:
    """Entry point of ``cass-eval`` (and of ``python -m cass_plugins.evaluation.runner`` / ``torchrun -m cass_plugins.evaluation.runner``).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).
        models: models to use instead of loading them from the model flags (anything :func:`evaluate` accepts);
            the Python-side way to evaluate in-memory models with the full command line.
    """
    hooks = _cli_models()
    parser = build_parser(with_model_flags=models is None)
    args = parser.parse_args(argv)
    if models is None and hooks is None:
        parser.error("loading models needs cass_plugins.cli.segment (add_model_arguments / models_from_args), which is not "
                     "installed in this version; use cass_plugins.evaluation.runner.evaluate() with model objects")
    try:
        components = parse_components(args.components)
        base = resolve_config(args.preset, baseline=args.baseline, components=components)
        if models is None and not vfm_requested(args):
            # --vfm none: the components that need a VFM are off (naming one explicitly is an error below)
            needing = [n for n in base.components if REGISTRY.component(n).needs_vfm]
            if needing and components is not None:
                raise ValueError(f"--components {','.join(needing)} need a VFM, but --vfm none was given")
            if needing:
                components = [n for n in base.components if n not in needing]
                base = resolve_config(args.preset, baseline=args.baseline, components=components)
        overrides = parse_overrides(args.overrides, base)
        names = [get_dataset_info(d).name for d in args.dataset]
        _validate_config(args.preset, names, args.baseline, components, overrides)
    except (KeyError, ValueError) as e:
        parser.error(str(e).strip("'\""))

    dist, device = init_distributed(args.device, args.dist_backend)
    try:
        model_info: dict[str, Any] = {}
        if models is None:
            args.device = device
            models = hooks[1](args)
            model_info = {k: getattr(args, k) for k in ("clip", "pretrained", "vfm", "vfm_weights", "precision")
                          if hasattr(args, k)}
            eval_device = None  # models_from_args already placed them
        else:
            eval_device = device
        sections: dict[str, dict[str, Any]] = {}
        for name in names:
            sections[name] = evaluate(
                models, name, args.data_root, limit=args.limit, out=args.out, preset=args.preset,
                baseline=args.baseline, components=components, overrides=overrides,
                device=eval_device, model_info=model_info, restart=args.restart, progress=not args.no_progress,
                verbose=True, checkpoint_every=args.checkpoint_every, text_cache=not args.no_cache,
            )
        if dist.is_main:
            print()
            for name, sec in sections.items():
                print(f"{sec['display_name']}: mIoU {_fmt(sec['mIoU'])}, aAcc {_fmt(sec['aAcc'])}, "
                      f"mAcc {_fmt(sec['mAcc'])} ({sec['num_images']}/{sec['num_images_total']} images)")
                if sec["invalid_label_pixels"]:
                    print(f"  warning: {sec['invalid_label_pixels']} label pixels outside 0..{len(sec['IoU']) - 1} "
                          "were not scored (wrong label encoding?)")
            print()
            if len(sections) == 1:
                print(_format_dataset_table(next(iter(sections.values()))))
            else:
                print(format_paper_table(sections))
            if args.out:
                print(f"\nresults written to {args.out}")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
