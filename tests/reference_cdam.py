"""Test-side references for CDAM (docs/spec/cdam.md §3, §8, §9, §11): the authors' L×L formulation, written from the
spec with plain tensor operations, never imported by the library.

The library's component (``cass_plugins.adapters.cdam.CDAM``) computes pass 2 on the patch rows only, with the
backbone's own sub-layers; these functions keep the spec's full formulation (CLS row and column, per-head
attention, the block as callables) so that tests can compare the component against it. Written for float64.
Moved here from ``adapters/cdam_math.py``, where they were a second CDAM forward that only tests used.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["assemble_attention", "apply_attention", "cdam_block_forward", "apply_background_threshold"]


def assemble_attention(
    patch_attention: Tensor,
    *,
    num_heads: int | None = None,
    row_normalize: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """Embed the patch map in the L×L token attention with a zero CLS row and column (§8).

    Args:
        patch_attention: ``W_patch``, ``(B, N, N)``.
        num_heads: If given, return a ``(B, h, L, L)`` expanded view (all heads share the matrix).
        row_normalize: §15.6: divide each patch row by its sum (the repo does not).
        eps: Floor of the row sum when ``row_normalize``.

    Returns:
        ``(B, L, L)`` or ``(B, h, L, L)`` with L = N + 1.
    """
    b, n, _ = patch_attention.shape
    att = patch_attention
    if row_normalize:
        att = att / att.sum(dim=-1, keepdim=True).clamp_min(eps)
    full = att.new_zeros(b, n + 1, n + 1)
    full[:, 1:, 1:] = att
    if num_heads is not None:
        return full[:, None].expand(b, int(num_heads), n + 1, n + 1)
    return full


def apply_attention(attention: Tensor | None, values: Tensor) -> Tensor:
    """``A · v`` before the out-projection (§9 step 3); None is pass 1's identity attention (§3).

    Args:
        attention: ``(B, L, L)`` shared by all heads, ``(B, h, L, L)`` per head, or None.
        values: ``(B, L, D)`` value projections (all heads concatenated).

    Returns:
        ``(B, L, D)`` head outputs, concatenated.
    """
    if attention is None:
        return values
    att = attention.to(values.dtype)
    if att.dim() == 3:
        return att @ values
    b, heads, length, _ = att.shape
    d = values.shape[-1]
    v = values.reshape(b, length, heads, d // heads).transpose(1, 2)  # (B, h, L, Dh)
    return (att @ v).transpose(1, 2).reshape(b, length, d)


def cdam_block_forward(
    x: Tensor,
    attention: Tensor | None,
    *,
    ln_1: Callable[[Tensor], Tensor],
    value: Callable[[Tensor], Tensor],
    out_proj: Callable[[Tensor], Tensor],
    ln_2: Callable[[Tensor], Tensor],
    mlp: Callable[[Tensor], Tensor],
) -> Tensor:
    """The last residual block with a fixed attention on the value path (§3 pass 1, §9 pass 2).

    ``x ← x + out_proj(A · value(ln_1(x)))``, then ``x ← x + mlp(ln_2(x))`` (authors' ``CDAM/cdam_segmentor.py``).

    Args:
        x: The block's input tokens ``(B, L, D)``, CLS at 0.
        attention: As in :func:`apply_attention`.
        ln_1, value, out_proj, ln_2, mlp: the block's sub-layers (``value`` is the V third of ``in_proj``).

    Returns:
        ``(B, L, D)`` block output.
    """
    x = x + out_proj(apply_attention(attention, value(ln_1(x))))
    return x + mlp(ln_2(x))


def apply_background_threshold(probs: Tensor, threshold: Tensor | float, background_index: int = 0) -> Tensor:
    """Arg-max labels, pixels whose max probability is strictly below the threshold set to background (§11).

    A NaN threshold relabels nothing (comparisons with NaN are false), as in the repo.

    Args:
        probs: ``(B, K, H, W)`` class probabilities.
        threshold: Scalar or ``(B,)`` thresholds.
        background_index: Label of the background class.

    Returns:
        ``(B, H, W)`` int64 labels.
    """
    max_prob, labels = probs.max(dim=1)
    thr = torch.as_tensor(threshold, dtype=max_prob.dtype, device=max_prob.device)
    if thr.dim() == 1:
        thr = thr[:, None, None]
    return labels.masked_fill(max_prob < thr, background_index)
