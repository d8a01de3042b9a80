"""Test-side references for CASS's spectral math (docs/spec/cass.md §2.4, §2.8-§2.11), never imported by the library.

``graph_spectrum`` is the spectrum of an N×N graph by a full ``eigvalsh``: the definition that the library's
:func:`cass_plugins.cass.spectral.key_spectrum` (the small Gram eigenproblem of the keys) must agree with. Moved here
from ``cass_plugins/cass/spectral.py``, where nothing but tests called it.

``distill_and_fuse`` is steps 8-11 composed exactly as ``SpectralAttentionHook`` (cass_plugins/cass/distillation.py)
composes them from the library's functions, so that tests of the distillation exercise ``distilled_vfm_graph``, the
function the hook calls, and not a second copy of it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cass_plugins.cass import spectral

__all__ = ["graph_spectrum", "distill_and_fuse"]


def graph_spectrum(graph: Tensor, m: int = 20) -> Tensor:
    """Top-``m`` eigenvalues of symmetric graphs ``(..., N, N)`` by float64 ``eigvalsh``, zero-padded, descending."""
    evals = torch.linalg.eigvalsh(graph.to(torch.float64)).flip(-1)
    n = evals.shape[-1]
    if n >= m:
        return evals[..., :m]
    return torch.cat([evals, evals.new_zeros(evals.shape[:-1] + (m - n,))], dim=-1)


def distill_and_fuse(
    vfm_graph: Tensor | None,
    clip_graph: Tensor,
    w: Tensor,
    lam: float,
    *,
    assignment: Tensor | None = None,
    vfm_keys: Tensor | None = None,
    scale: float | None = None,
    **kwargs: object,
) -> tuple[Tensor, Tensor | None]:
    """The hook's steps 8-11 (cass.md §2): gather the matched heads → :func:`distilled_vfm_graph` →
    :func:`range_match` per head and image to the CLIP graph → :func:`fuse_graphs`, in the CLIP graph's dtype.

    ``kwargs`` go to :func:`cass_plugins.cass.spectral.distilled_vfm_graph` (lowrank, rank, eigenscaling, ...).
    """
    if assignment is not None:
        vfm_graph = spectral.gather_heads(vfm_graph, assignment) if vfm_graph is not None else None
        vfm_keys = spectral.gather_heads(vfm_keys, assignment) if vfm_keys is not None else None
    d, ranks = spectral.distilled_vfm_graph(vfm_graph, vfm_keys=vfm_keys, scale=scale, **kwargs)  # type: ignore[arg-type]
    d = spectral.range_match(d, clip_graph, dims=(-2, -1))
    return spectral.fuse_graphs(d, clip_graph, w, lam), ranks
