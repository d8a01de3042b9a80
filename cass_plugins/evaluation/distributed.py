"""torch.distributed for ``cass-eval``: set-up from the ``torchrun`` environment, rank info, sharding, collectives.

Every helper is a no-op (or the single-process answer) when no process group is initialised, so the evaluation
code calls them unconditionally.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from cass_plugins.evaluation.metrics import IoUAccumulator

__all__ = [
    "DistInfo", "all_reduce", "barrier", "dist_info", "gather_names", "init_distributed", "is_distributed", "shard",
    "teardown",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a torch.distributed job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes results and prints (rank 0)."""
        return self.rank == 0


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_info() -> DistInfo:
    """Rank / world size of the initialised process group, or the single-process defaults."""
    if is_distributed():
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

    Raises:
        RuntimeError: torchrun environment without torch.distributed, CUDA requested but missing, or more ranks
            than GPUs.
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


def teardown() -> None:
    """Destroy the process group if one is initialised (safe to call in a ``finally``)."""
    if is_distributed():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for when not distributed)."""
    if is_distributed():
        torch.distributed.barrier()


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's share ``items[rank::world_size]``: no padding, so every item is processed exactly once."""
    return list(items[info.rank::info.world_size])


def gather_names(names: Sequence[str]) -> list[str]:
    """Concatenation of every rank's list (the local list when not distributed)."""
    if not is_distributed():
        return list(names)
    gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(names))
    return [n for part in gathered for n in (part or [])]


def all_reduce(acc: IoUAccumulator) -> IoUAccumulator:
    """Sum ``acc``'s areas over every rank in place and return it (the areas are additive, so the sum is what
    one process scoring every image would hold)."""
    return acc.all_reduce()
