"""From cosine logits to a label map (protocol.md §7 step 5 and §8; baselines.md §3)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["upsample_logits", "logits_to_labels"]


def _bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Same size with align_corners=False is an exact identity, so the call is skipped.
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def upsample_logits(
    logits: torch.Tensor,
    size: Sequence[int],
    *,
    two_step_via: Sequence[int] | None = None,
) -> torch.Tensor:
    """Bilinearly resize logits ``(K, h, w)`` or ``(B, K, h, w)`` to ``size`` (``align_corners=False``).

    Args:
        logits: grid-level or canvas-level logits.
        size: ``(H0, W0)``, normally the original image size.
        two_step_via: ``None`` for one bilinear step (sliding mode, and SCLIP's whole-image mode); for NACLIP / CASS
            whole-image mode pass the resized input size ``(H, W)``: grid → ``(H, W)`` → ``size``, two successive
            bilinear resizes (they differ from a single resize).

    Returns:
        Logits of the same rank and dtype at ``size``.
    """
    if logits.dim() not in (3, 4):
        raise ValueError(f"upsample_logits expects (K, h, w) or (B, K, h, w), got shape {tuple(logits.shape)}.")
    x = logits if logits.dim() == 4 else logits.unsqueeze(0)
    if two_step_via is not None:
        x = _bilinear(x, (int(two_step_via[0]), int(two_step_via[1])))
    x = _bilinear(x, (int(size[0]), int(size[1])))
    return x if logits.dim() == 4 else x.squeeze(0)


def logits_to_labels(
    logits: torch.Tensor,
    query_to_class: torch.Tensor | Sequence[int],
    *,
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
    background_index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn per-query cosine logits into a label map.

    1. ``P = softmax over queries of (logit_scale · logits)``.
    2. ``class_probs[c] = max of P over the queries of class c`` (not renormalised; a class with no query gets 0).
    3. If ``area_thd`` is set (SCLIP): on the argmax map, a class ``c ≠ background_index`` whose pixel count is
       ``≤ area_thd ·`` (pixels of all non-background classes) gets its probability plane zeroed.
    4. ``labels = argmax over classes`` (ties go to the lowest index), then pixels whose maximum class probability is
       strictly below ``prob_thd`` become ``background_index``.

    The softmax runs in float32 (float64 if the logits are float64); the reference's fp16 softmax differs only at the
    float16 rounding level.

    Args:
        logits: ``(Q, H, W)`` cosine logits at the output size (after PAMR if used).
        query_to_class: ``(Q,)`` class index of each query; the number of classes is ``max + 1``.
        logit_scale: temperature multiplier before the softmax.
        prob_thd: background threshold on the maximum class probability (strict ``<``).
        area_thd: SCLIP's relative-area threshold, or ``None`` to skip the rule.
        background_index: class assigned below ``prob_thd`` and excluded from the area rule (class 0 in every repo).

    Returns:
        ``(labels, class_probs)``: ``int64 (H, W)`` and ``(C, H, W)``, the probabilities the decision used (after the
        area rule).

    Raises:
        ValueError: NaN / inf in the logits, or inconsistent shapes.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits_to_labels expects logits of shape (Q, H, W), got {tuple(logits.shape)}.")
    if not torch.isfinite(logits).all():
        raise ValueError(
            "The logits contain NaN or inf, so the dense features contain NaN/inf: the model probably overflowed in "
            "fp16 or has missing / uninitialised weights."
        )
    q2c = torch.as_tensor(query_to_class, dtype=torch.long, device=logits.device).reshape(-1)
    num_queries, height, width = logits.shape
    if q2c.numel() != num_queries:
        raise ValueError(f"query_to_class has {q2c.numel()} entries for {num_queries} queries.")
    if num_queries == 0 or int(q2c.min()) < 0:
        raise ValueError("query_to_class must be non-empty with non-negative class indices.")
    num_classes = int(q2c.max()) + 1
    if not 0 <= background_index < num_classes:
        raise ValueError(f"background_index {background_index} is outside 0..{num_classes - 1}.")

    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(work) * logit_scale, dim=0)

    if num_classes == num_queries and bool((q2c == torch.arange(num_queries, device=q2c.device)).all()):
        class_probs = probs
    else:
        # scatter-amax avoids SCLIP's (C, Q, H, W) one-hot product; zeros as the start value are harmless (P ≥ 0).
        flat = probs.reshape(num_queries, -1)
        class_probs = torch.zeros(num_classes, flat.shape[1], dtype=work, device=logits.device)
        class_probs.scatter_reduce_(0, q2c[:, None].expand_as(flat), flat, reduce="amax", include_self=True)
        class_probs = class_probs.reshape(num_classes, height, width)

    if area_thd is not None:
        areas = torch.bincount(class_probs.argmax(0).reshape(-1), minlength=num_classes)
        foreground = torch.ones(num_classes, dtype=torch.bool, device=logits.device)
        foreground[background_index] = False
        total = areas[foreground].sum()
        # SCLIP keeps a class only if its area is strictly above the threshold (relative to foreground pixels).
        drop = foreground & (areas.to(torch.float64) <= area_thd * total.to(torch.float64))
        class_probs = class_probs * (~drop).to(work)[:, None, None]

    max_prob, labels = class_probs.max(0)
    labels = torch.where(max_prob < prob_thd, torch.full_like(labels, background_index), labels)
    return labels, class_probs
