"""``cass-eval``'s result file and per-rank checkpoints: reading, atomic writes, identity checks, resume state.

The result file is ``{"format", "datasets": {name: section}, "summary"}``; each rank checkpoints what it scored
into ``<out>.partial.<dataset>.rank<k>.json``. A stored section is resumed only when its identity (configuration,
models, vocabulary) equals the run's.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cass_plugins.evaluation.datasets import SegmentationDataset, get_dataset_info
from cass_plugins.evaluation.metrics import IoUAccumulator
from cass_plugins.evaluation.tables import PAPER_ORDER, summary

__all__ = [
    "FORMAT", "IDENTITY_KEYS", "build_section", "check_identity", "check_resumable", "config_differences",
    "flatten", "jsonable", "load_results", "load_state", "partial_path", "partial_paths", "write_partial",
    "write_section",
]

# The module path the format was introduced under; kept so earlier result files stay resumable.
FORMAT = "cass_plugins.evaluation.runner/1"

#: Identity keys of a dataset section: a stored result is only resumed when all of them match.
IDENTITY_KEYS = ("config", "models", "vocabulary")

_HOW_TO_PROCEED = "Write to another --out, or pass --restart (restart=True) to discard the stored result"
_HOW_TO_PROCEED_CLI = "Write to another --out, or pass --restart to discard the stored result"


# ----------------------------------------------------------------------------------------------------------------
# JSON


def jsonable(obj: Any) -> Any:
    """JSON-normalised copy: tuples → lists, NaN → None (strict JSON has no NaN), other objects → str."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
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
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a cass-eval result (format {found!r}, expected {FORMAT!r}); "
                         "pass another --out")
    return data


def partial_paths(out: Path, dataset: str) -> list[Path]:
    """Every rank's checkpoint file of ``dataset`` next to ``out``, sorted."""
    prefix = f"{out.name}.partial.{dataset}.rank"
    if not out.parent.is_dir():
        return []
    return sorted(out.parent / f for f in os.listdir(out.parent) if f.startswith(prefix) and f.endswith(".json"))


def partial_path(out: Path, dataset: str, rank: int) -> Path:
    """The checkpoint file of ``rank`` for ``dataset``."""
    return out.with_name(f"{out.name}.partial.{dataset}.rank{rank}.json")


# ----------------------------------------------------------------------------------------------------------------
# Identity


def same(a: Any, b: Any) -> bool:
    """Equality after JSON normalisation (a stored tuple is a list, a stored NaN is null)."""
    return json.dumps(jsonable(a), sort_keys=True) == json.dumps(jsonable(b), sort_keys=True)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested configuration sections as ``section.key`` entries."""
    out: dict[str, Any] = {}
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``section.key`` of every setting whose value differs between two ``Config.to_dict()`` mappings."""
    old, new = flatten(stored), flatten(current)
    return sorted(k for k in set(old) | set(new) if not same(old.get(k), new.get(k)))


def check_identity(what: str, stored: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
    """Refuse to resume ``stored`` when its configuration, models or vocabulary differ from ``identity``.

    Raises:
        ValueError: naming the differing part (and, for the configuration, the differing keys).
    """
    for key in IDENTITY_KEYS:
        if not same(stored.get(key), identity[key]):
            detail = ""
            if key == "config" and isinstance(stored.get(key), Mapping):
                detail = f" (differing keys: {config_differences(stored[key], identity[key])})"
            raise ValueError(
                f"{what} was produced with a different {key}{detail}; resuming would mix two evaluations. "
                + _HOW_TO_PROCEED
            )


def check_resumable(out: str | os.PathLike, dataset: str, config: Mapping[str, Any],
                    model_flags: Mapping[str, Any] | None = None) -> None:
    """Check, before any model loads, that a stored result (and its checkpoints) of ``dataset`` fits the run.

    Only what is known without the models is compared: the resolved configuration and the command-line model
    flags (when given). The full identity (model classes and sizes, vocabulary) is checked again once the
    segmenter exists.

    Args:
        out: the ``--out`` result file (nothing to check when it does not exist).
        dataset: registry name of the dataset.
        config: the run's resolved ``Config.to_dict()``.
        model_flags: the run's model flags as stored under ``models.flags`` (``None``: not compared).

    Raises:
        ValueError: the file is not a cass-eval result, or a stored section or checkpoint of ``dataset`` has
            another configuration (naming the keys and their stored and requested values) or other model flags.
    """
    out = Path(out)
    stored = load_results(out).get("datasets", {}).get(dataset)
    sources: list[tuple[str, Mapping[str, Any]]] = []
    if stored is not None:
        sources.append((f"{out} [{dataset}]", stored))
    for p in partial_paths(out, dataset):
        try:
            sources.append((f"checkpoint {p}", json.loads(p.read_text())))
        except json.JSONDecodeError:
            raise ValueError(f"checkpoint {p} is not valid JSON; delete it or pass --restart") from None
    for what, data in sources:
        if isinstance(data.get("config"), Mapping) and not same(data["config"], config):
            old, new = flatten(data["config"]), flatten(jsonable(config))
            diff = config_differences(data["config"], config)
            shown = "; ".join(f"{k}: stored {old.get(k)!r}, now {new.get(k)!r}" for k in diff)
            raise ValueError(
                f"{what} was produced with a different configuration ({shown}); resuming would mix two "
                "evaluations. " + _HOW_TO_PROCEED_CLI
            )
        flags = (data.get("models") or {}).get("flags")
        if model_flags is not None and flags is not None and not same(flags, model_flags):
            diff = sorted(k for k in set(flags) | set(model_flags) if not same(flags.get(k), model_flags.get(k)))
            shown = "; ".join(f"--{k.replace('_', '-')}: stored {flags.get(k)!r}, now {model_flags.get(k)!r}"
                              for k in diff)
            raise ValueError(f"{what} was produced with other models ({shown}). " + _HOW_TO_PROCEED_CLI)


# ----------------------------------------------------------------------------------------------------------------
# Sections and resume state


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


def build_section(
    ds: SegmentationDataset, identity: Mapping[str, Any], scored: Sequence[str], acc: IoUAccumulator,
    limit: int | None, class_names: Sequence[str],
) -> dict[str, Any]:
    """A dataset's result section: counts, scores, identity, scored names and accumulated areas (JSON-ready)."""
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
    return jsonable(section)


def load_state(
    out: Path, dataset: str, identity: Mapping[str, Any], index: Mapping[str, int], restart: bool,
) -> tuple[IoUAccumulator, set[str], bool]:
    """Stored areas and scored names of ``dataset`` (result file + checkpoints); whether checkpoints were folded.

    Raises:
        ValueError: another identity, a checkpoint overlapping the result, or names not in this dataset.
    """
    num_classes = get_dataset_info(dataset).num_classes
    data = load_results(out)
    partials = partial_paths(out, dataset)
    if restart:
        return IoUAccumulator(num_classes), set(), bool(partials) or dataset in data.get("datasets", {})
    acc = IoUAccumulator(num_classes)
    scored: set[str] = set()
    stored = data.get("datasets", {}).get(dataset)
    if stored is not None:
        check_identity(f"{out} [{dataset}]", stored, identity)
        acc = IoUAccumulator.from_state(stored["state"])
        scored = set(stored["scored"])
    folded = False
    for p in partials:
        part = json.loads(p.read_text())
        check_identity(f"checkpoint {p}", part, identity)
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


def write_partial(out: Path, dataset: str, rank: int, identity: Mapping[str, Any], names: Sequence[str],
                  acc: IoUAccumulator) -> None:
    """Checkpoint what this rank scored so far (identity, names, areas)."""
    data = dict(identity)
    data["scored"] = list(names)
    data["state"] = acc.state_dict()
    atomic_write_json(partial_path(out, dataset, rank), jsonable(data))


def write_section(out: Path, section: Mapping[str, Any]) -> None:
    """Store ``section`` in the result file (other datasets kept) and refresh the summary."""
    data = load_results(out)
    datasets = dict(data.get("datasets", {}))
    datasets[section["dataset"]] = section
    # Keep the sections in the papers' column order, whatever order the runs came in.
    ordered = {k: datasets[k] for k in PAPER_ORDER if k in datasets}
    ordered.update({k: v for k, v in datasets.items() if k not in ordered})
    result = {"format": FORMAT, "datasets": ordered, "summary": summary(ordered)}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, jsonable(result))
