"""Head matching between VFM and CLIP attention heads (CASS, Kim et al. CVPR 2025, §3.2 "complementary
spectral graph matching"; authors' ``cass.py``; docs/matching.md).

The cost is ``C[i, j] = 1 − W(λ_v[i], λ_c[j])`` with rows = VFM heads and columns = CLIP heads (see
:func:`cass_plugins.cass.spectral.spectral_cost`). CASS minimises the total cost with the Hungarian algorithm,
pairing the most different spectra. The cost is close to additive, so optima are often tied: the
result carries the margin to the best other assignment, and an explicit assignment can be forced.

Two readings of the solver's answer exist (docs/matching.md, "Official pairing"). With
``row_ind, col_ind = linear_sum_assignment(C)`` (``row_ind = 0..h−1``), the true Hungarian pairing puts VFM head
``i`` with CLIP head ``col_ind[i]``. The authors' fusion loop instead fuses VFM head ``col_ind[i]`` into CLIP head
``i`` — the column index read as a VFM head, i.e. the *inverse* permutation — with the weight from
``C[i, col_ind[i]]``. ``pairing="official"`` reproduces both halves (the published numbers come from it);
``pairing="paper"`` fuses the true pairs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["HeadMatching", "match_heads", "official_fused_heads", "STRATEGIES", "TIE_BREAKS", "PAIRINGS"]

logger = logging.getLogger("cass_plugins.cass.matching")

STRATEGIES = ("complementary", "similar", "sequential")
TIE_BREAKS = (None, "round", "sequential")
PAIRINGS = ("official", "paper")

#: Resolution of the ``tie_break`` options: costs are compared on a grid of this step.
TIE_RESOLUTION = 1e-6
#: Margins below this are logged (debug) as ties.
TIE_LOG_THRESHOLD = 1e-6


@dataclass
class HeadMatching:
    """Result of :func:`match_heads`.

    Attributes:
        cost: (Hv, Hc) cost as handed to the solver (``solve_dtype``), before any tie-break rounding.
        assignment: (Hc,) LongTensor: the VFM head actually fused into each CLIP head (for
            ``pairing="official"`` the inverse of :attr:`pairs`). Pass it back as ``matching=[...]`` to
            reproduce a run.
        weights: (Hc,) fusion weight w per CLIP head: ``1 − C[i, assignment[i]]`` (official) or
            ``1 − C[assignment[i], i]`` (paper).
        pairs: (Hc,) LongTensor: the pairing in the cost's sense — ``pairs[j]`` is the VFM head whose cost
            ``C[pairs[j], j]`` the solver summed for CLIP head j (the true Hungarian pairing). Equal to
            ``assignment`` for ``pairing="paper"``; ``None`` for an explicit official assignment that is not a
            permutation (it has no pairing reading).
        margin: total cost of the best pairing that differs from :attr:`pairs` minus that of :attr:`pairs`
            (float64, on ``cost``, in the strategy's objective: ≥ 0 means the chosen pairing is optimal, 0 a
            tie, < 0 that a better one exists); ``inf`` when no other pairing exists, ``nan`` when
            :attr:`pairs` is ``None``.
        strategy: the strategy name (``"explicit"`` for an explicit assignment).
        pairing: ``"official"`` or ``"paper"``.
        ranks: (Hc,) low-rank ranks used per CLIP head; filled in by the caller that ran the low
            rank (None until then).
        window: index of the window (crop) this matching was made for, when the caller counts windows.
    """

    cost: Tensor
    assignment: Tensor
    weights: Tensor
    margin: float
    strategy: str
    pairing: str = "official"
    ranks: Tensor | None = None
    pairs: Tensor | None = None
    window: int | None = None


def _tile_rows(obj: np.ndarray, hc: int) -> tuple[np.ndarray, np.ndarray]:
    """Repeat the VFM rows ``ceil(Hc/Hv)`` times so every CLIP head can get one (spec §9 "Head counts").

    The minimum repetition keeps the result a matching in spirit: each VFM head serves at most
    ``ceil(Hc/Hv)`` CLIP heads. Returns the tiled matrix and the VFM head of each tiled row.
    """
    hv = obj.shape[0]
    reps = max(1, -(-hc // hv))
    return np.tile(obj, (reps, 1)), np.tile(np.arange(hv), reps)


def _solve(obj: np.ndarray, row_head: np.ndarray) -> np.ndarray:
    """Minimise ``obj`` (tiled rows × CLIP columns); returns the VFM head per CLIP head."""
    rows, cols = linear_sum_assignment(obj)
    assignment = np.empty(obj.shape[1], dtype=np.int64)
    assignment[cols] = row_head[rows]
    return assignment


def _total(obj: np.ndarray, assignment: np.ndarray) -> float:
    """Objective of an assignment (VFM head per CLIP head) on the untiled (Hv, Hc) matrix, float64."""
    return float(math.fsum(obj[assignment, np.arange(obj.shape[1])]))


def _margin(obj: np.ndarray, assignment: np.ndarray) -> float:
    """Best other assignment's total minus the chosen one's (Murty-style, float64).

    Any assignment other than the chosen one avoids at least one chosen pair, so the best of the
    re-solves with one chosen pair forbidden is the best other assignment. Forbidden pairs get a large
    finite value (scipy rejects infeasible matrices); a re-solve that still uses it had no alternative.
    """
    hv, hc = obj.shape
    tiled, row_head = _tile_rows(obj, hc)
    big = (np.abs(obj).max() + 1.0) * (hc + 1) * 4.0
    chosen = _total(obj, assignment)
    best = math.inf
    for j in range(hc):
        i = assignment[j]
        if not 0 <= i < hv:
            continue
        forbidden = tiled.copy()
        forbidden[row_head == i, j] = big
        other = _solve(forbidden, row_head)
        if other[j] == i:
            continue
        best = min(best, _total(obj, other))
    return best - chosen


def _explicit(strategy: Sequence[int] | Tensor, hv: int, hc: int) -> np.ndarray:
    """Validate an explicit assignment (VFM head per CLIP head)."""
    values = strategy.tolist() if isinstance(strategy, (Tensor, np.ndarray)) else list(strategy)
    if len(values) != hc:
        raise ValueError(
            f"explicit head assignment has {len(values)} entries but there are {hc} CLIP heads "
            f"(one VFM head index per CLIP head)"
        )
    for pos, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"explicit head assignment entry {pos} is {v!r}: expected an int VFM head index")
        if not 0 <= v < hv:
            raise ValueError(
                f"explicit head assignment entry {pos} is {v}: VFM head indices must be in [0, {hv - 1}]"
            )
    return np.asarray(values, dtype=np.int64)


def _tie_break_matrix(obj: np.ndarray, tie_break: str) -> np.ndarray:
    """Objective handed to the solver for the tie-break options.

    ``"round"``: integer ticks ``round(C/1e-6)`` (exact in float64). ``"sequential"``: ``C + 1e-6·[i ≠ j]``.
    Rounding each entry is deliberately NOT used for "sequential": it breaks the exact additivity that
    makes §10's ties (per-entry errors of ±0.5 tick add up differently per assignment and outweigh
    any integer preference: on random additive 12×12 costs it returned the identity 1 time in 200).
    The penalty keeps tied totals tied and only adds the preference.
    """
    hv, hc = obj.shape
    if tie_break == "round":
        ticks = np.round(obj / TIE_RESOLUTION)
        if np.abs(ticks).max(initial=0.0) * hc >= 2.0**53:
            raise ValueError("cost too large for the integer rounding (|cost|·Hc must stay below ~9e9)")
        return ticks
    off_diagonal = (np.arange(hv)[:, None] != np.arange(hc)[None, :]).astype(np.float64)
    return obj + TIE_RESOLUTION * off_diagonal


def official_fused_heads(pairs: np.ndarray) -> np.ndarray:
    """The authors' reading of a square pairing: CLIP head i ← VFM head ``col_ind[i]``.

    ``pairs[j]`` is the VFM row paired with CLIP column j, so ``col_ind[pairs[j]] = j``: the authors' loop,
    which takes ``col_ind[i]`` as the VFM head for CLIP head ``i``, fuses the inverse permutation.
    """
    fused = np.empty_like(pairs)
    fused[pairs] = np.arange(pairs.shape[0], dtype=pairs.dtype)
    return fused


def _is_permutation(values: np.ndarray) -> bool:
    return np.array_equal(np.sort(values), np.arange(values.shape[0]))


def match_heads(
    cost: Tensor,
    strategy: str | Sequence[int] | Tensor = "complementary",
    *,
    solve_dtype: torch.dtype = torch.float32,
    tie_break: str | None = None,
    pairing: str = "official",
) -> HeadMatching:
    """Assign a VFM head to every CLIP head and compute the fusion weights.

    Strategies:
        ``"complementary"``: ``linear_sum_assignment`` minimising C (most different spectra; CASS).
        ``"similar"``: maximising C.
        ``"sequential"``: CLIP head i paired with VFM head ``i mod Hv``.
        a sequence of ints: explicit VFM head *fused into* each CLIP head (what :attr:`HeadMatching.assignment`
        reports, so a run is reproduced exactly by passing its assignment back).
    Rectangular costs: with Hv < Hc the VFM rows are repeated ``ceil(Hc/Hv)`` times so heads can be
    reused; with Hv > Hc some VFM heads stay unused.

    Pairing (docs/matching.md): the solver returns a pairing ``pairs`` (VFM head per CLIP column, the entries
    whose costs it summed). ``pairing="paper"`` fuses it as is, ``w[i] = 1 − C[pairs[i], i]``.
    ``pairing="official"`` reproduces the authors' loop over ``row_ind, col_ind``: CLIP head ``i`` receives VFM
    head ``col_ind[i]`` (the inverse permutation of ``pairs``) with ``w[i] = 1 − C[i, col_ind[i]]`` — the cost of
    VFM head ``i``'s own pair, read by the CLIP head of the same index. Needs Hv == Hc. For an explicit
    assignment ``a`` the same weight rule applies to the fused heads: ``w[i] = 1 − C[i, a[i]]`` (official) or
    ``1 − C[a[i], i]`` (paper).

    Precision: the solver sees ``cost.to(solve_dtype)`` (the authors solve on float32, which decides
    among tied optima). ``tie_break="round"`` solves on that cost rounded to multiples of 1e-6 (integer
    ticks, exact in float64). ``"sequential"`` solves ``C + 1e-6·[VFM head ≠ CLIP head]``: it minimises
    total + 1e-6 × (number of heads not paired with themselves), so among pairings whose totals agree
    to well below 1e-6 (ties, 1e-15 in float64, ≲ 1e-6 after float32 rounding for |C| ≤ 1) it
    returns the one closest to sequential, and its total is within Hc·1e-6 of the optimum.

    Margin: Murty-style second best of ``pairs`` on the float64 value of the solved cost, in the strategy's
    objective (C for complementary, −C for similar; sequential/explicit are measured against the
    complementary objective). ≥ 0 means the chosen pairing is optimal; it can be −ulp from rounding,
    and negative for explicit/sequential/tie-broken choices that are not optimal.

    Args:
        cost: (Hv, Hc) cost, rows VFM heads, columns CLIP heads.
        strategy: strategy name or explicit assignment.
        solve_dtype: dtype the cost is rounded to before solving.
        tie_break: None, ``"round"`` or ``"sequential"``.
        pairing: ``"official"`` or ``"paper"``.

    Returns:
        :class:`HeadMatching`; assignment, pairs and weights on ``cost``'s device.

    Raises:
        ValueError: bad shape, non-finite cost, unknown option, invalid explicit assignment, or
            ``pairing="official"`` with Hv != Hc.
    """
    if cost.dim() != 2:
        raise ValueError(f"cost must be a (Hv, Hc) matrix, got shape {tuple(cost.shape)}")
    hv, hc = cost.shape
    if hv == 0 or hc == 0:
        raise ValueError(f"cost must have at least one VFM and one CLIP head, got shape {tuple(cost.shape)}")
    if not torch.isfinite(cost).all():
        raise ValueError("cost contains NaN or inf")
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"unknown tie_break {tie_break!r}; expected one of {TIE_BREAKS}")
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; expected one of {PAIRINGS}")
    if pairing == "official" and hv != hc:
        raise ValueError(
            f"pairing='official' reads the solver's column index as a VFM head and needs as many VFM "
            f"as CLIP heads (got Hv={hv}, Hc={hc}); use pairing='paper'"
        )

    solved = cost.detach().to(solve_dtype)
    c64 = solved.cpu().to(torch.float64).numpy()

    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(
                f"unknown matching strategy {strategy!r}; expected one of {STRATEGIES} or a list of ints"
            )
        name = strategy
        obj = -c64 if strategy == "similar" else c64
        if strategy == "sequential":
            pairs = np.arange(hc, dtype=np.int64) % hv
        else:
            target = obj if tie_break is None else _tie_break_matrix(obj, tie_break)
            tiled, row_head = _tile_rows(target, hc)
            pairs = _solve(tiled, row_head)
        fused = official_fused_heads(pairs) if pairing == "official" else pairs
    else:
        name = "explicit"
        obj = c64
        fused = _explicit(strategy, hv, hc)
        if pairing == "paper":
            pairs = fused
        else:
            pairs = official_fused_heads(fused) if _is_permutation(fused) else None  # the inverse of the inverse

    margin = _margin(obj, pairs) if pairs is not None else math.nan
    if margin < TIE_LOG_THRESHOLD:
        logger.debug(
            "head matching (%s): margin %.3e to the best other pairing; pairs %s",
            name, margin, pairs.tolist(),
        )

    device = cost.device
    a = torch.as_tensor(fused, dtype=torch.long, device=device)
    cols = torch.arange(hc, device=device)
    if pairing == "official":
        weights = 1.0 - cost.detach()[cols, a]
    else:
        weights = 1.0 - cost.detach()[a, cols]
    return HeadMatching(
        cost=solved, assignment=a, weights=weights, margin=margin, strategy=name, pairing=pairing,
        pairs=None if pairs is None else torch.as_tensor(pairs, dtype=torch.long, device=device),
    )
