"""From cosine logits to a label map (protocol.md §7 step 5 and §8; baselines.md §3)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["upsample_logits", "upsample_rows", "upsample_banded", "row_bands", "logits_to_labels", "labels_at_size", "CHUNK_ELEMENTS"]


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


#: Default number of logits (queries × pixels) softmaxed at once: 2**23 float32 values = 32 MiB per temporary.
CHUNK_ELEMENTS = 1 << 23


def logits_to_labels(
    logits: torch.Tensor,
    query_to_class: torch.Tensor | Sequence[int],
    *,
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
    background_index: int = 0,
    chunk_pixels: int | None = None,
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

    Memory: pixels are processed in chunks, so besides the returned ``class_probs`` (``C·H·W`` values) and labels
    (``H·W`` int64) the extra memory is a few ``Q × chunk_pixels`` temporaries (scaled logits, probabilities, class
    maxima; 32 MiB each in float32 by default), whatever the image size. Each pixel is one softmax row, so the
    results do not depend on the chunk size (bit-identical). Measured peak RSS beyond input and output, 150 classes,
    float32 (``tests/test_postprocess.py::peak_extra_bytes``): 85 MB at 750×500, 86 MB at 1500×1000, 87 MB at
    3000×2000; a single chunk (the former behaviour) needs 1.57 GB at 1500×1000, i.e. ~25 GB at 6000×4000, where
    the input logits and the output probabilities take 14.4 GB each.

    Args:
        logits: ``(Q, H, W)`` cosine logits at the output size (after PAMR if used).
        query_to_class: ``(Q,)`` class index of each query; the number of classes is ``max + 1``.
        logit_scale: temperature multiplier before the softmax.
        prob_thd: background threshold on the maximum class probability (strict ``<``).
        area_thd: SCLIP's relative-area threshold, or ``None`` to skip the rule.
        background_index: class assigned below ``prob_thd`` and excluded from the area rule (class 0 in every repo).
        chunk_pixels: pixels per chunk; default ``CHUNK_ELEMENTS // Q`` (rounded to a multiple of 64).

    Returns:
        ``(labels, class_probs)``: ``int64 (H, W)`` and ``(C, H, W)``, the probabilities the decision used (after the
        area rule).

    Raises:
        ValueError: NaN / inf in the logits, or inconsistent shapes.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits_to_labels expects logits of shape (Q, H, W), got {tuple(logits.shape)}.")
    q2c = torch.as_tensor(query_to_class, dtype=torch.long, device=logits.device).reshape(-1)
    num_queries, height, width = logits.shape
    if q2c.numel() != num_queries:
        raise ValueError(f"query_to_class has {q2c.numel()} entries for {num_queries} queries.")
    if num_queries == 0 or int(q2c.min()) < 0:
        raise ValueError("query_to_class must be non-empty with non-negative class indices.")
    num_classes = int(q2c.max()) + 1
    if not 0 <= background_index < num_classes:
        raise ValueError(f"background_index {background_index} is outside 0..{num_classes - 1}.")
    if chunk_pixels is None:
        chunk_pixels = max(64, CHUNK_ELEMENTS // num_queries // 64 * 64)
    if chunk_pixels < 1:
        raise ValueError(f"chunk_pixels must be positive, got {chunk_pixels}.")

    work = torch.float64 if logits.dtype == torch.float64 else torch.float32
    device = logits.device
    identity = num_classes == num_queries and bool((q2c == torch.arange(num_queries, device=device)).all())
    flat = logits.reshape(num_queries, -1)
    n = flat.shape[1]
    class_probs = torch.empty(num_classes, n, dtype=work, device=device)
    labels = torch.empty(n, dtype=torch.long, device=device)
    areas = torch.zeros(num_classes, dtype=torch.long, device=device)

    def decide(s: int, e: int) -> None:
        max_prob, lab = class_probs[:, s:e].max(0)
        labels[s:e] = torch.where(max_prob < prob_thd, torch.full_like(lab, background_index), lab)

    for s in range(0, n, chunk_pixels):
        e = min(n, s + chunk_pixels)
        # Pixel-major (n, Q) so the softmax runs along the last dim: each pixel is one row, reduced the same way
        # whatever the chunk's size (a dim-0 softmax vectorises across pixels and its bits depend on the layout).
        scaled = (flat[:, s:e].t().to(work) * logit_scale).contiguous()
        if not torch.isfinite(scaled).all():  # checked per chunk: a whole-image bool mask is Q·H·W bytes
            raise ValueError(
                "The logits contain NaN or inf, so the dense features contain NaN/inf: the model probably overflowed "
                "in fp16 or has missing / uninitialised weights."
            )
        probs = torch.softmax(scaled, dim=1)
        del scaled
        if identity:
            class_probs[:, s:e] = probs.t()
        else:
            # scatter-amax avoids SCLIP's (C, Q, H, W) one-hot product; zeros as the start value are harmless (P ≥ 0).
            part = torch.zeros(e - s, num_classes, dtype=work, device=device)
            part.scatter_reduce_(1, q2c[None, :].expand_as(probs), probs, reduce="amax", include_self=True)
            class_probs[:, s:e] = part.t()
        del probs
        if area_thd is None:
            decide(s, e)
        else:
            areas += torch.bincount(class_probs[:, s:e].argmax(0), minlength=num_classes)

    if area_thd is not None:
        class_probs[_area_drop(areas, area_thd, background_index)] = 0  # in place: a (C, H, W) product doubles the peak
        for s in range(0, n, chunk_pixels):
            decide(s, min(n, s + chunk_pixels))
    return labels.reshape(height, width), class_probs.reshape(num_classes, height, width)


def _area_drop(areas: torch.Tensor, area_thd: float, background_index: int) -> torch.Tensor:
    """SCLIP's area rule: ``(C,)`` bool, the non-background classes whose argmax area is ``≤ area_thd ·`` foreground."""
    foreground = torch.ones(areas.numel(), dtype=torch.bool, device=areas.device)
    foreground[background_index] = False
    total = areas[foreground].sum()
    # SCLIP keeps a class only if its area is strictly above the threshold (relative to foreground pixels).
    return foreground & (areas.to(torch.float64) <= area_thd * total.to(torch.float64))


def _axis(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Source indices ``i0, i1`` and weights ``w0, w1`` of a 1-D ``align_corners=False`` linear resize.

    PyTorch's formula (``compute_source_index_and_lambda``): source coordinate ``max(n_in/n_out · (i + 0.5) - 0.5, 0)``,
    index clamped to the last row, ``w1`` its fractional part. For float32 the coordinate is rounded once, as the
    CPU kernel's fused multiply-add does (two roundings move weights by up to 3e-5 at 6000 rows).
    """
    if n_in == n_out:  # PyTorch copies: weights exactly 1 and 0
        i = torch.arange(n_out, device=device)
        return i, i, torch.ones(n_out, dtype=dtype, device=device), torch.zeros(n_out, dtype=dtype, device=device)
    scale = torch.tensor(n_in, dtype=dtype, device=device) / n_out
    centres = torch.arange(n_out, dtype=dtype, device=device) + 0.5
    real = (scale.double() * centres.double() - 0.5).to(dtype).clamp_min(0)  # exact product, one rounding
    i0 = real.floor().long().clamp_max(n_in - 1)
    w1 = (real - i0.to(dtype)).clamp(0, 1)
    i1 = i0 + (i0 < n_in - 1).long()
    return i0, i1, 1 - w1, w1


def row_bands(height: int, width: int, channels: int, elements: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """Split ``height`` output rows into ``(start, stop)`` bands of about ``elements // (channels · width)`` rows."""
    rows = max(1, elements // max(1, channels * width))
    return [(r, min(height, r + rows)) for r in range(0, height, rows)]


def upsample_rows(logits: torch.Tensor, size: Sequence[int], rows: tuple[int, int]) -> torch.Tensor:
    """Rows ``rows[0]:rows[1]`` of the bilinear (``align_corners=False``) resize of ``logits (K, h, w)`` to ``size``.

    Only the source rows the band needs are read: the width is resized with ``F.interpolate`` (rows are independent
    there), then the two source rows of every output row are blended with PyTorch's row weights. Every output value
    depends only on its own row and column, so any split into bands gives the same bits as one call over all rows.
    Against ``F.interpolate`` on the whole map the result agrees to float rounding: the weights are PyTorch's to the
    bit and the blend rounds like its CPU kernel, but ~0.3 % of values still differ by an ulp (measured, float32,
    torch 2.x on x86), and CUDA's kernel rounds differently again.

    Args:
        logits: ``(K, h, w)`` logits.
        size: ``(H, W)`` output size.
        rows: ``(start, stop)`` output rows, ``0 ≤ start < stop ≤ H``.

    Returns:
        ``(K, stop - start, W)`` in the dtype of ``logits``.
    """
    if logits.dim() != 3:
        raise ValueError(f"upsample_rows expects (K, h, w), got shape {tuple(logits.shape)}.")
    height, width = int(size[0]), int(size[1])
    r0, r1 = int(rows[0]), int(rows[1])
    if not 0 <= r0 < r1 <= height:
        raise ValueError(f"rows {rows} are not a non-empty range inside 0..{height}.")
    h = logits.shape[1]
    i0, i1, w0, w1 = (t[r0:r1] for t in _axis(h, height, logits.dtype, logits.device))
    lo, hi = int(i0.min()), int(i1.max()) + 1
    # Width first on the needed source rows only: with the height unchanged F.interpolate copies rows (weights 1, 0).
    src = _bilinear(logits[None, :, lo:hi], (hi - lo, width))[0]
    if h == height:
        return src
    top, bottom = src[:, i0 - lo], src[:, i1 - lo]
    w0, w1 = w0[:, None], w1[:, None]
    if src.dtype == torch.float32:
        # fma(top, w0, bottom·w1) as the CPU kernel computes it: a float32 product is exact in float64
        return (top.double() * w0.double() + (bottom * w1).double()).float()
    return top * w0 + bottom * w1


def upsample_banded(logits: torch.Tensor, size: Sequence[int], band_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """:func:`upsample_rows` over all rows, band by band into one output: ``(K, H, W)``, temporaries bounded."""
    height, width = int(size[0]), int(size[1])
    out = torch.empty(logits.shape[0], height, width, dtype=logits.dtype, device=logits.device)
    for r0, r1 in row_bands(height, width, logits.shape[0], band_elements):
        out[:, r0:r1] = upsample_rows(logits, size, (r0, r1))
    return out


def labels_at_size(
    logits: torch.Tensor,
    size: Sequence[int],
    query_to_class: torch.Tensor | Sequence[int],
    *,
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
    background_index: int = 0,
    band_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Labels at ``size`` from low-resolution logits, without the full-resolution logits or probabilities.

    Equal, label for label, to ``logits_to_labels(upsample_rows(logits, size, (0, H)), ...)[0]``: output rows are
    processed in bands of about ``band_elements`` logits; each band is upsampled with :func:`upsample_rows` (the same
    bits as the whole map) and decided by :func:`logits_to_labels` (per-pixel softmax rows: the same bits whatever the
    chunk). SCLIP's area rule needs the whole image's argmax counts, so with ``area_thd`` it runs two passes: the
    first counts, the second recomputes each band and decides with the dropped classes zeroed (twice the compute,
    the same memory).

    Memory: the labels (``H·W`` int64) plus a few ``Q × band`` temporaries (32 MiB each by default), whatever ``H, W``.

    Args:
        logits: ``(Q, h, w)`` cosine logits (e.g. at the resized input's size).
        size: ``(H, W)`` output size.
        query_to_class, logit_scale, prob_thd, area_thd, background_index: as :func:`logits_to_labels`.
        band_elements: logits (queries × pixels) per band.

    Returns:
        ``int64 (H, W)`` labels.
    """
    if logits.dim() != 3:
        raise ValueError(f"labels_at_size expects logits of shape (Q, h, w), got {tuple(logits.shape)}.")
    height, width = int(size[0]), int(size[1])
    q2c = torch.as_tensor(query_to_class, dtype=torch.long, device=logits.device).reshape(-1)
    bands = row_bands(height, width, logits.shape[0], band_elements)
    labels = torch.empty(height, width, dtype=torch.long, device=logits.device)

    def band_probs(r0: int, r1: int) -> torch.Tensor:
        # prob_thd=0 and no area rule: only the class probabilities are used; the decision is taken below
        return logits_to_labels(upsample_rows(logits, size, (r0, r1)), q2c, logit_scale=logit_scale,
                                background_index=background_index)[1]

    drop = None
    if area_thd is not None:
        areas = torch.zeros(int(q2c.max()) + 1, dtype=torch.long, device=logits.device)
        for r0, r1 in bands:
            areas += torch.bincount(band_probs(r0, r1).argmax(0).flatten(), minlength=areas.numel())
        drop = _area_drop(areas, area_thd, background_index)
    for r0, r1 in bands:
        probs = band_probs(r0, r1)
        if drop is not None:
            probs[drop] = 0
        max_prob, lab = probs.max(0)  # the decision of logits_to_labels
        labels[r0:r1] = torch.where(max_prob < prob_thd, torch.full_like(lab, background_index), lab)
    return labels
