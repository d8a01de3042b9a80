"""CDAM (Class Distribution-induced Attention Map, ICLR 2025): the pure tensor math.

Everything here is model-free: the functions take similarity maps, distributions, divergences and logits. The
component that runs them inside a CLIP ViT, including pass 2 through the last block, is
:class:`cass_plugins.adapters.cdam.CDAM`; every function here is called by it (the spec's L×L formulation of the
passes is a test-side reference, ``tests/reference_cdam.py``).
Section numbers (§n) refer to ``docs/spec/cdam.md``; the defaults reproduce the authors' repository, and every
place where the paper differs (§15) is a named keyword. The settings, presets and per-dataset values that choose
these keywords are :class:`cass_plugins.adapters.cdam.CDAMConfig` and the ``cdam-*`` presets (``docs/cdam.md``).

Layout follows the library convention: batch-first, patches row-major, ``(B, N, C)`` for per-patch class scores,
``(B, N, N)`` for patch-to-patch maps (rows are queries, columns keys), ``(B, L, D)`` tokens with CLS at index 0.

Precision: the repository runs in fp16 on GPU. Here fp16/bf16 inputs are up-cast to float32 and float64 inputs stay
float64 (the spec accepts a float32 re-implementation as equivalent up to fp16 rounding, §5, §18).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ATP_PROMPTS",
    "CDAM_SCALES",
    "CLASS_TEMPERATURE",
    "ATTENTION_TEMPERATURE",
    "JSD_EPS",
    "MINMAX_EPS",
    "ENTROPY_SCALE",
    "ENTROPY_LOG_BASE",
    "ENTROPY_ALPHA",
    "DEFAULT_THRESHOLD",
    "MultiscaleOrder",
    "class_distribution",
    "pairwise_jsd",
    "divergence_to_attention",
    "subgrid_size",
    "resize_similarity",
    "upsample_pairwise",
    "multiscale_cdam",
    "text_similarity",
    "patch_entropy",
    "threshold_from_entropy",
    "entropy_threshold",
]

# ---------------------------------------------------------------------------------------------------------------
# Constants (§12, §13)
# ---------------------------------------------------------------------------------------------------------------

#: The 80 augmented text prompts (ATP), in the order of the repo's class files (§13). They are appended after the
#: class names, embedded like class names, and used only for the class distributions (§4-§7); never for logits.
ATP_PROMPTS: tuple[str, ...] = (
    # colour (29)
    "black", "light blue", "blue", "dark blue", "light brown", "brown", "dark brown", "light green", "green",
    "dark green", "light grey", "grey", "dark grey", "light orange", "orange", "dark orange", "light pink", "pink",
    "dark pink", "light purple", "purple", "dark purple", "light red", "red", "dark red", "white", "light yellow",
    "yellow", "dark yellow",
    # pattern / marking (10)
    "plain", "striped", "dotted", "checkered", "woven", "studded", "perforated", "floral", "logo", "text",
    # material (13)
    "stone", "wood", "rattan", "fabric", "crochet", "wool", "leather", "velvet", "metal", "paper", "plastic", "glass",
    "ceramic",
    # transparency (3)
    "opaque", "translucent", "transparent",
    # super-categories (25)
    "vehicle", "outdoor", "animal", "accessory", "sports", "kitchen", "furniture", "electronic", "appliance", "indoor",
    "water", "ground", "solid", "sky", "structural", "building", "food", "textile", "window", "floor", "ceiling",
    "wall", "rawmaterial", "plant", "person",
)

#: Scales of the multi-scale CDAM (§7): six sub-scales plus the full map (1.0 = no resampling).
CDAM_SCALES: tuple[float, ...] = (0.25, 0.37, 0.5, 0.63, 0.75, 0.87, 1.0)
#: τ of the class distributions, softmax over queries of S0 / τ (§4).
CLASS_TEMPERATURE: float = 0.1
#: P, temperature of the row softmax that turns 1 − JSD into attention (§6).
ATTENTION_TEMPERATURE: float = 0.1
#: ε inside every log of the JSD (§5).
JSD_EPS: float = 1e-8
#: ε in the denominator of both row min-max normalisations (§6).
MINMAX_EPS: float = 1e-8
#: Softmax scale of the pass-2 logits before the entropy (§10; hard-coded 50, i.e. τ = 0.02).
ENTROPY_SCALE: float = 50.0
#: The repo's entropy is in bits (§10).
ENTROPY_LOG_BASE: float = 2.0
#: α of the entropy threshold, thr = Thr_default · α / H_center (§10).
ENTROPY_ALPHA: float = 2.5
#: Thr_default of the entropy threshold (§10).
DEFAULT_THRESHOLD: float = 0.5

#: §15.3: ``"upsample_divergence"`` (repo) or ``"upsample_attention"`` (the paper's Eq. 3).
MultiscaleOrder = Literal["upsample_divergence", "upsample_attention"]


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    # float64 stays float64 (tests, references); everything else is computed in float32, never fp16 (§5 caveat).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_minmax(x: Tensor, eps: float) -> Tensor:
    """Min-max normalise the last axis: (x − min) / (max − min + eps)."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    return (x - lo) / (hi - lo + eps)


def _check_grid(n: int, grid_size: tuple[int, int]) -> tuple[int, int]:
    h, w = int(grid_size[0]), int(grid_size[1])
    if h * w != n:
        raise ValueError(f"grid {h}×{w} does not match {n} patches")
    return h, w


# ---------------------------------------------------------------------------------------------------------------
# §4 Class distributions
# ---------------------------------------------------------------------------------------------------------------


def class_distribution(similarity: Tensor, temperature: float = CLASS_TEMPERATURE) -> Tensor:
    """Per-patch distribution over all C queries, softmax_C(S0 / τ) (§4).

    Args:
        similarity: Raw cosine similarities S0, ``(B, N, C)`` (classes then the 80 ATP queries).
        temperature: τ; 0.1 in the repo for every dataset.

    Returns:
        ``(B, N, C)`` probabilities in the compute dtype (float32, or float64 for float64 input).
    """
    s = similarity.to(_compute_dtype(similarity))
    return torch.softmax(s / temperature, dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# §5 Jensen–Shannon divergence, §6 divergence → attention
# ---------------------------------------------------------------------------------------------------------------


def pairwise_jsd(
    dist: Tensor,
    *,
    eps: float = JSD_EPS,
    chunk_size: int | None = None,
    max_chunk_elements: int = 1 << 24,
) -> Tensor:
    """Jensen–Shannon divergence between every pair of patch distributions (§5).

    The authors' direct form (CDAM-CLIP ``clip_segmentor.py``, the JSD at full scale and at every sub-scale)::

        JSD_ij = ½ Σ_c p_ic (ln(p_ic + ε) − ln(M_ijc + ε)) + ½ Σ_c p_jc (ln(p_jc + ε) − ln(M_ijc + ε))

    with ``M = (p_i + p_j)/2``, natural log and ε inside every log, so JSD ∈ [0, ln 2]. The log differences are
    taken per class before summing. The algebraically equal ``½h_i + ½h_j − Σ_c M ln(M + ε)`` subtracts sums of
    size ln C and, in float32 on near-uniform distributions (JSD ~1e-5), cancels to an error of ~1e-6, which the
    §6 row min-max then amplifies; the direct form stays within ~1e-7 of float64.
    The diagonal is set to exactly 0, which is what the direct form gives (ln(p+ε) − ln(M+ε) = 0 there).

    Query rows are processed in chunks of ``r`` rows. Peak extra memory is two ``(B, r, N, C)`` temporaries, i.e.
    ``2 · max_chunk_elements`` elements when ``chunk_size`` is None: 128 MiB in float32 (256 MiB in float64) with
    the default budget, whatever N and C are. Example: B = 1, N = 784, C = 171 + 80 → r = 85 rows, 10 chunks.

    Args:
        dist: ``(B, N, C)`` distributions (rows sum to 1).
        eps: ε inside the logs. With ``eps = 0`` a class with p = 0 contributes 0 (the convention 0·ln 0 = 0).
        chunk_size: Query rows per chunk; None derives it from ``max_chunk_elements``.
        max_chunk_elements: Element budget of one ``(B, r, N, C)`` temporary when ``chunk_size`` is None.

    Returns:
        ``(B, N, N)`` symmetric divergences, zero diagonal, compute dtype.
    """
    p = dist.to(_compute_dtype(dist))
    b, n, c = p.shape
    log_p = p.add(eps).log_() if eps > 0 else p.log()  # (B, N, C), ln(p + ε); small next to the chunk buffers
    if chunk_size is None:
        chunk_size = max(1, max_chunk_elements // max(1, b * n * c))
    chunk_size = max(1, min(int(chunk_size), n))

    out = p.new_empty(b, n, n)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        p_i, lp_i = p[:, start:stop, None, :], log_p[:, start:stop, None, :]  # queries, (B, r, 1, C)
        p_j, lp_j = p[:, None, start:, :], log_p[:, None, start:, :]  # keys j ≥ start, (B, 1, N − start, C)
        # JSD is symmetric: only keys j ≥ start are computed and the block left of the diagonal is mirrored, which
        # halves the C·N² logs. Two (B, r, N − start, C) buffers in all: ``log_m`` and ``term``.
        log_m = p_i + p_j
        log_m.mul_(0.5)
        if eps > 0:
            log_m.add_(eps)
        log_m.log_()  # ln(M + ε)
        term = lp_i - log_m
        term.mul_(p_i)  # p_i (ln(p_i + ε) − ln(M + ε))
        log_m.sub_(lp_j).mul_(p_j)  # in place: −p_j (ln(p_j + ε) − ln(M + ε))
        if eps <= 0:
            # Without ε, ln 0 = −inf turns p = 0 into 0·(±inf) = NaN; such a class contributes 0 (0·ln 0 = 0).
            # Where p > 0, M > 0 too, so every other term is finite. The masks are (B, r, 1, C) and (B, 1, N, C).
            term.masked_fill_(p_i == 0, 0.0)
            log_m.masked_fill_(p_j == 0, 0.0)
        term.sub_(log_m)
        del log_m
        block = term.sum(dim=-1).mul_(0.5)  # (B, r, N − start)
        del term
        out[:, start:stop, start:] = block
        out[:, stop:, start:stop] = block[:, :, stop - start:].transpose(1, 2)
    torch.diagonal(out, dim1=-2, dim2=-1).zero_()
    return out


def divergence_to_attention(
    divergence: Tensor,
    *,
    temperature: float = ATTENTION_TEMPERATURE,
    minmax: bool = True,
    eps: float = MINMAX_EPS,
) -> Tensor:
    """Turn a pairwise divergence into one attention map, row-wise over keys (§6).

    ``A = 1 − JSD``; row min-max; row softmax of ``A′ / P``; row min-max again. Each row of the result has max 1
    and min 0 (all zeros for a constant row).

    Args:
        divergence: ``(..., N, N)``; rows are queries.
        temperature: P of the row softmax (0.1).
        minmax: §15.4. True (repo): min-max before and after the softmax. False: the paper's literal Eq. 2,
            ``softmax((1 − JSD) / P)``.
        eps: ε of both min-max denominators.

    Returns:
        ``(..., N, N)`` in the compute dtype.
    """
    a = 1.0 - divergence.to(_compute_dtype(divergence))
    if minmax:
        a = _row_minmax(a, eps)
    att = torch.softmax(a / temperature, dim=-1)
    if minmax:
        att = _row_minmax(att, eps)
    return att


# ---------------------------------------------------------------------------------------------------------------
# §7 Multi-scale CDAM
# ---------------------------------------------------------------------------------------------------------------


def subgrid_size(grid_size: tuple[int, int], scale: float) -> tuple[int, int]:
    """Sub-grid of one scale, ``(int(H'·m), int(W'·m))`` with truncation (§7); 28×28 → 7, 10, 14, 17, 21, 24.

    Clamped to at least 1 so that grids under 4 patches (tiny test models) do not fail; the repo would raise there.
    """
    return max(1, int(grid_size[0] * scale)), max(1, int(grid_size[1] * scale))


def resize_similarity(similarity: Tensor, grid_size: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Bilinearly resize a per-patch map over its patch grid (§7 step 1).

    ``F.interpolate(mode='bilinear', align_corners=False)``, no antialias: for 28 → 7 each output is the mean of
    the central 2×2 of its 4×4 block, not an area average.

    Args:
        similarity: ``(B, N, C)`` with N = H'·W' row-major.
        grid_size: ``(H', W')``.
        size: Target ``(h, w)``.

    Returns:
        ``(B, h·w, C)`` in the compute dtype.
    """
    b, n, c = similarity.shape
    h, w = _check_grid(n, grid_size)
    x = similarity.to(_compute_dtype(similarity)).reshape(b, h, w, c).permute(0, 3, 1, 2)
    y = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return y.flatten(2).transpose(1, 2)


def upsample_pairwise(matrix: Tensor, src_size: tuple[int, int], dst_size: tuple[int, int]) -> Tensor:
    """Bilinearly up-sample a patch-to-patch map along both its key and query axes (§7 step 3).

    Equals ``U · X · Uᵀ`` with U the 2-D bilinear (align_corners=False) resampling matrix from ``src_size`` to
    ``dst_size``. Done as the repo does it: keys first (rows as channels), then queries.

    Args:
        matrix: ``(B, n, n)`` with n = h·w of ``src_size``.
        src_size: ``(h, w)`` of the input grid.
        dst_size: ``(H', W')`` of the output grid.

    Returns:
        ``(B, N, N)`` with N = H'·W'.
    """
    b, n, n2 = matrix.shape
    hs, ws = _check_grid(n, src_size)
    if n2 != n:
        raise ValueError(f"expected a square (B, n, n) map, got {tuple(matrix.shape)}")
    hd, wd = int(dst_size[0]), int(dst_size[1])
    big_n = hd * wd
    x = matrix.to(_compute_dtype(matrix))
    keys = F.interpolate(x.reshape(b, n, hs, ws), size=(hd, wd), mode="bilinear", align_corners=False)
    keys = keys.reshape(b, n, big_n).transpose(1, 2)  # (B, N_key, n_query)
    both = F.interpolate(keys.reshape(b, big_n, hs, ws), size=(hd, wd), mode="bilinear", align_corners=False)
    return both.reshape(b, big_n, big_n).transpose(1, 2).contiguous()  # (B, N_query, N_key)


def multiscale_cdam(
    similarity: Tensor,
    grid_size: tuple[int, int],
    *,
    scales: Sequence[float] = CDAM_SCALES,
    class_temperature: float = CLASS_TEMPERATURE,
    attention_temperature: float = ATTENTION_TEMPERATURE,
    minmax: bool = True,
    multiscale_order: MultiscaleOrder = "upsample_divergence",
    eps: float = JSD_EPS,
    minmax_eps: float = MINMAX_EPS,
    chunk_size: int | None = None,
    max_chunk_elements: int = 1 << 24,
) -> Tensor:
    """Multi-scale CDAM from the initial similarity map S0: the unweighted mean of one map per scale (§7).

    Per scale m < 1: bilinearly down-sample the raw S0 to :func:`subgrid_size`, take the class distributions (§4)
    and the JSD (§5) there, then either up-sample the JSD and apply §6 at full resolution (repo) or apply §6 at low
    resolution and up-sample the attention (paper). m = 1 uses S0 as is.

    Args:
        similarity: S0, raw cosine similarities ``(B, N, C)`` over all queries (classes + ATP).
        grid_size: Patch grid ``(H', W')`` with H'·W' = N.
        scales: Scales in (0, 1]; the default is the repo's six sub-scales plus 1.0.
        class_temperature: τ of §4.
        attention_temperature: P of §6.
        minmax: §15.4 switch (see :func:`divergence_to_attention`).
        multiscale_order: §15.3. ``"upsample_divergence"`` (repo) or ``"upsample_attention"`` (paper Eq. 3).
        eps: ε inside the JSD logs.
        minmax_eps: ε of the min-max denominators.
        chunk_size: Query rows per JSD chunk (None: from ``max_chunk_elements``).
        max_chunk_elements: JSD chunk budget, see :func:`pairwise_jsd`.

    Returns:
        ``W_patch``, ``(B, N, N)`` in the compute dtype.
    """
    if not scales:
        raise ValueError("scales must not be empty")
    if multiscale_order not in ("upsample_divergence", "upsample_attention"):
        raise ValueError(f"unknown multiscale_order {multiscale_order!r}")
    b, n, _ = similarity.shape
    grid = _check_grid(n, grid_size)
    s0 = similarity.to(_compute_dtype(similarity))

    def transform(jsd: Tensor) -> Tensor:
        return divergence_to_attention(jsd, temperature=attention_temperature, minmax=minmax, eps=minmax_eps)

    def divergence(s: Tensor) -> Tensor:
        p = class_distribution(s, class_temperature)
        return pairwise_jsd(p, eps=eps, chunk_size=chunk_size, max_chunk_elements=max_chunk_elements)

    total = s0.new_zeros(b, n, n)
    for m in scales:
        if not 0.0 < m <= 1.0:
            raise ValueError(f"scales must lie in (0, 1], got {m}")
        if m == 1.0:
            total += transform(divergence(s0))
            continue
        sub = subgrid_size(grid, m)
        jsd_m = divergence(resize_similarity(s0, grid, sub))
        if multiscale_order == "upsample_divergence":
            total += transform(upsample_pairwise(jsd_m, sub, grid))
        else:
            total += upsample_pairwise(transform(jsd_m), sub, grid)
    return total / len(scales)


# ---------------------------------------------------------------------------------------------------------------
# §3, §9 The text side of S0 and of the logits
# ---------------------------------------------------------------------------------------------------------------


def text_similarity(features: Tensor, text_embeddings: Tensor, *, drop_cls: bool = True) -> Tensor:
    """Cosine similarities of L2-normalised token features with text embeddings (§3 S0, §9 step 6 logits).

    Args:
        features: Projected tokens ``ln_post(x) @ proj``, ``(B, L, E)`` with CLS at 0 (or ``(B, N, E)``).
        text_embeddings: ``(C, E)``, already L2-normalised (all C queries for S0, the n_cls classes for logits).
        drop_cls: Drop token 0 after normalisation.

    Returns:
        ``(B, N, C)`` cosines, no logit scale.
    """
    f = F.normalize(features, dim=-1)
    if drop_cls:
        f = f[:, 1:]
    return f @ text_embeddings.to(f.dtype).t()


# ---------------------------------------------------------------------------------------------------------------
# §10, §11 Entropy-based background threshold
# ---------------------------------------------------------------------------------------------------------------


def patch_entropy(
    logits: Tensor,
    *,
    entropy_scale: float = ENTROPY_SCALE,
    log_base: float = ENTROPY_LOG_BASE,
) -> Tensor:
    """Per-patch entropy of ``softmax_K(entropy_scale · logits)`` (§10).

    Uses 0·log 0 = 0 (``xlogy``): a deliberate deviation from the fp16 repo, where an underflowed probability
    gives NaN (§10 caveat).

    Args:
        logits: Pass-2 cosine logits over the n_cls classes only (no ATP), ``(B, N, K)``.
        entropy_scale: §15.5. 50 (repo) or 1/τ = 10 (paper).
        log_base: §15.5. 2 (repo, bits) or e.

    Returns:
        ``(B, N)`` entropies.
    """
    q = torch.softmax(entropy_scale * logits.to(_compute_dtype(logits)), dim=-1)
    # 0 − s rather than −s: a fully confident patch must give +0, not −0, or 1/H_center would become −inf.
    return (0.0 - torch.special.xlogy(q, q).sum(dim=-1)) / math.log(log_base)


def threshold_from_entropy(
    h_min: Tensor,
    h_max: Tensor,
    *,
    alpha: float = ENTROPY_ALPHA,
    default_threshold: float = DEFAULT_THRESHOLD,
) -> Tensor:
    """``thr = Thr_default · α / H_center`` with ``H_center = (H_min + H_max) / 2`` (§10).

    Taking min/max over the patches of the last window is the repo; over all windows of an image is the paper
    (§15.5); the caller chooses by what it reduces over. ``H_center = 0`` (every patch one-hot) gives ``+inf``:
    everything becomes background, the limit of the repo's float32 behaviour (its fp16 run gets NaN there).
    """
    return default_threshold * alpha / ((h_min + h_max) / 2)


def entropy_threshold(
    logits: Tensor,
    *,
    entropy_scale: float = ENTROPY_SCALE,
    log_base: float = ENTROPY_LOG_BASE,
    alpha: float = ENTROPY_ALPHA,
    default_threshold: float = DEFAULT_THRESHOLD,
) -> Tensor:
    """Entropy-based background threshold of one window's pass-2 logits (§10).

    Args:
        logits: ``(B, N, K)`` pass-2 cosine logits over the n_cls classes (no ATP).
        entropy_scale: §15.5 softmax scale (50 repo, 10 paper).
        log_base: §15.5 log base (2 repo).
        alpha: α (2.5; 2.0 for ViT-B/32 in the paper).
        default_threshold: Thr_default (0.5).

    Returns:
        ``(B,)`` thresholds on the max class probability.
    """
    h = patch_entropy(logits, entropy_scale=entropy_scale, log_base=log_base)
    return threshold_from_entropy(
        h.amin(dim=-1), h.amax(dim=-1), alpha=alpha, default_threshold=default_threshold
    )
