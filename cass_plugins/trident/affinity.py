"""Trident's SAM affinity and global aggregation (pure tensor maths; docs/spec/trident.md §5.3, §6).

Paper Eq. 3–5 (Trident, ICCV 2025) as the official code computes them (``open_clip/transformer.py:634-659``,
``get_sam_sim`` / ``guidance_attn``): the correlation is a per-head cosine of SAM's last-block *values*, the
threshold is per query row, the mask is applied per head and the heads are averaged after masking (P1-P3).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AttentionSource", "aggregate", "row_thresholds", "sam_affinity"]


class AttentionSource(Protocol):
    """What the affinity reads of SAM's last block, cropped to the valid grid (``SamAttention`` provides it)."""

    num_heads: int
    grid: tuple[int, int]

    @property
    def values(self) -> Tensor:  # (heads, M, head_dim)
        ...

    def head(self, index: int) -> Tensor:  # (M, M) post-softmax attention of one head
        ...


def _at_least_f32(x: Tensor) -> Tensor:
    # float32 whatever the encoder ran in (§12 answer 17), float64 kept for reference computations
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _head_cosine(values: Tensor, index: int) -> Tensor:
    v = F.normalize(_at_least_f32(values[index]), dim=-1)  # eps 1e-12, as F.normalize in the official code
    return v @ v.T


def row_thresholds(values: Tensor, cos_fac: float, neg_fallback: float | None = None, cap: float = 0.9) -> Tensor:
    """§5.3 steps 1–3: ``ε_i = cos_fac · mean_{h,j} C_h,ij`` per query row, negative ones replaced by
    ``neg_fallback`` (``refine_neg_cos=False`` ⇔ 0.6; ``None`` keeps them), then capped at ``cap``.

    Args:
        values: ``(heads, M, d)`` SAM's per-head values on the valid grid.
    """
    heads, m = values.shape[0], values.shape[1]
    total = values.new_zeros(m, dtype=torch.promote_types(values.dtype, torch.float32))
    for h in range(heads):  # one M×M cosine at a time (spec §10: never all heads at once)
        total += _head_cosine(values, h).sum(dim=1)
    eps = cos_fac * total / (heads * m)
    if neg_fallback is not None:
        eps = torch.where(eps < 0, torch.full_like(eps, neg_fallback), eps)
    return eps.clamp(max=cap)


def sam_affinity(
    source: AttentionSource, cos_fac: float = 1.2, neg_fallback: float | None = None, cap: float = 0.9
) -> Tensor:
    """§5.3: ``A = rownorm_L1(mean_h(W_h ⊙ [C_h > ε_i]))`` on SAM's valid grid, float32 (§12 answer 17).

    ``W_h`` is the head's post-softmax attention with padding queries and keys dropped; the comparison is strict
    and per head. The diagonal always survives (``C_ii = 1 > ε_i`` as ``ε ≤ cap ≤ 0.9``), so no row is empty.

    Returns:
        ``(M, M)`` float32, rows summing to 1.
    """
    if not cap < 1.0:
        raise ValueError(f"the threshold cap must be below 1 (the diagonal cosine), got {cap}")
    values = source.values
    eps = row_thresholds(values, cos_fac, neg_fallback, cap)[:, None]
    masked = None
    for h in range(source.num_heads):
        w = _at_least_f32(source.head(h))
        keep = _head_cosine(values, h) > eps
        term = w * keep
        masked = term if masked is None else masked + term
    mean = masked / source.num_heads
    return mean / mean.sum(dim=1, keepdim=True)


def aggregate(features: Tensor, affinities: Sequence[Tensor], grids: Sequence[tuple[int, int]]) -> Tensor:
    """§6 steps 1–2: resize the spliced map to SAM's valid grid and apply ``Z̃ = A·Z``.

    Args:
        features: ``(D, GH, GW)`` the spliced pre-head map on the CLIP grid.
        affinities: one ``(M_k, M_k)`` matrix per SAM part (one part, or the two Cityscapes halves, left first).
        grids: the valid grid ``(h_k, w_k)`` of each part.

    Returns:
        ``(D, h, w)`` the aggregated map on SAM's grid; with two parts, the map is split at column ``GW // 2``,
        each half resized to its part's grid and aggregated with its own ``A`` (block-diagonal, §5.1 / §6 step 1),
        and the halves are joined along the width.
    """
    if len(affinities) != len(grids) or len(grids) not in (1, 2):
        raise ValueError(f"expected one or two SAM parts with one grid each, got {len(affinities)} and {len(grids)}")
    if len(grids) == 2 and grids[0][0] != grids[1][0]:
        raise ValueError(f"the two SAM halves have grids {grids[0]} and {grids[1]} of different heights")
    d, _, gw = features.shape
    pieces = [features] if len(grids) == 1 else [features[:, :, : gw // 2], features[:, :, gw // 2:]]
    out = []
    for piece, a, (h, w) in zip(pieces, affinities, grids):
        if a.shape != (h * w, h * w):
            raise ValueError(f"affinity of shape {tuple(a.shape)} does not match the SAM grid {h}x{w}")
        z = F.interpolate(_at_least_f32(piece[None]), size=(h, w), mode="bilinear", align_corners=False)[0]
        z = a.to(device=z.device, dtype=z.dtype) @ z.reshape(d, h * w).T  # (M, D): rows are SAM tokens, row-major
        out.append(z.T.reshape(d, h, w))
    return torch.cat(out, dim=2)
