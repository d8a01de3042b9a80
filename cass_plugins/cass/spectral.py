"""Pure CASS tensor math: attention graphs, spectra, spectral cost, low rank, eigenscaling, fusion.

No hooks, no models, no I/O. Every function is batched over arbitrary leading dimensions (typically
``(B, h)``); graphs are ``(..., N, N)`` and keys ``(..., N, Dh)``. Anything that involves an eigen- or
singular-value solver runs in float64 and is cast back to the input dtype (spectra stay float64), so
fp16/bf16 inputs work. Degenerate inputs (zero or constant keys/graphs) never produce NaN.

CUDA inputs (:data:`DEVICE_MATH`, or ``device_math=True`` on any device) take the device path instead: the same
formulas in float32 on the input's device, batched, with no host round trip (one ``eigvalsh`` of the Gram matrices
per call, the randomized low rank with the same seeded test matrix as the CPU path, the small ``q×q`` SVD through a
float64 ``eigh``), so a CASS forward makes a fixed number of synchronisations whatever its number of windows
(issue 13). The CPU path and its results are unchanged.

Spec references (``docs/spec/cass.md``): §1.1 Gaussian window, §2 steps 3-11, §6 presets,
§9 "Low rank", "Cost", "Head counts".
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "LowRank",
    "attention_graph",
    "gaussian_window",
    "key_spectrum",
    "normalize_spectrum",
    "spectral_distance",
    "spectral_cost",
    "range_match",
    "low_rank",
    "rank_mask",
    "eigenscale",
    "low_rank_graph",
    "zero_diagonal",
    "fuse_graphs",
    "gather_heads",
    "distilled_vfm_graph",
]

LOWRANK_METHODS = ("randomized", "exact", "energy", "eigengap")


class LowRank(NamedTuple):
    """Result of :func:`low_rank`; unpacks as ``U, S, V, ranks``.

    Attributes:
        U: (..., N, r) left vectors; columns ``>= ranks`` are zero.
        S: (..., r) values, descending; entries ``>= ranks`` are zero.
        V: (..., N, r) right vectors; columns ``>= ranks`` are zero.
        ranks: (...) LongTensor, number of retained columns per matrix.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    ranks: Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """At least float32, float64 if any input is float64 (half-precision arithmetic over/underflows)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------------------------- graphs


def attention_graph(keys: Tensor, scale: float) -> Tensor:
    """Key-key graph ``scale · K Kᵀ`` (spec §1.2, §2.4), in the keys' dtype.

    Args:
        keys: (..., N, Dh) keys per head.
        scale: the CLIP ``Dh^-0.5`` factor (both graphs use CLIP's scale).

    Returns:
        (..., N, N) graph.
    """
    return (keys @ keys.transpose(-1, -2)) * scale


def gaussian_window(
    gh: int,
    gw: int,
    std: float = 5.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """NACLIP's Gaussian neighbourhood ω over a row-major ``gh × gw`` grid (spec §1.1).

    ``ω[p, q] = exp(-‖pos(p) − pos(q)‖² / (2·std²))`` in grid units; unnormalised (diagonal 1), no CLS.

    Args:
        gh: grid rows.
        gw: grid columns.
        std: standard deviation in patches (> 0).
        dtype: output dtype.
        device: output device.

    Returns:
        (gh·gw, gh·gw) matrix.
    """
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must be at least 1x1, got {gh}x{gw}")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    idx = torch.arange(gh * gw, device=device)
    rows = (idx // gw).to(torch.float64)
    cols = (idx % gw).to(torch.float64)
    d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    return torch.exp(-d2 / (2.0 * std * std)).to(dtype)


# -------------------------------------------------------------------------------------------- spectra


#: Where the small float64 decompositions (SVD, eigh, QR of the randomized SVD) run for CUDA inputs. cuSOLVER
#: loops over the batch for matrices above 32×32 with a synchronisation per call (a CASS window makes ~100 such
#: calls), while LAPACK does (12, 196, 64) in well under a millisecond; running them on the CPU also makes the
#: seeded randomized low rank identical on every device. Set to ``None`` to keep them on the input's device.
SOLVER_DEVICE: str | None = "cpu"


#: CUDA inputs run the spectra, the low rank and the eigenscaling on their device in float32 (the device path of
#: the module docstring). ``False``: the float64 solvers of :data:`SOLVER_DEVICE`, as before issue 13.
DEVICE_MATH: bool = True


def use_device_math(x: Tensor, device_math: bool | None = None) -> bool:
    """Whether ``x`` takes the float32 device path: ``device_math`` if given, else :data:`DEVICE_MATH` for CUDA."""
    if device_math is not None:
        return bool(device_math)
    return DEVICE_MATH and x.device.type == "cuda"


def _to_solver(x: Tensor) -> Tensor:
    """``x`` on the device where decompositions run (see :data:`SOLVER_DEVICE`)."""
    if SOLVER_DEVICE is not None and x.device.type == "cuda":
        return x.to(SOLVER_DEVICE)
    return x


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run small CPU decompositions on one thread.

    Batched LAPACK calls on (12, 64, 64)-sized problems gain nothing from threads, and MKL's OpenMP workers then
    spin against the network's own threads: measured here, ``eigh`` took 980 ms with 2 threads on a busy machine
    and 9 ms with 1, ``svd_lowrank`` of (12, 196, 196) 250 ms vs 8 ms.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _gram_eigh(keys: Tensor, device_math: bool = False) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the Gram matrix ``Kᵀ K`` (float64, descending): ``σ(K)² `` and the right singular vectors.

    The non-zero eigenvalues of ``K Kᵀ`` (N×N) are those of ``Kᵀ K`` (Dh×Dh, 64×64 for ViT-B), so one small
    symmetric eigenproblem replaces an SVD of the N×Dh keys: batched ``svdvals`` of (12, 196, 64) took 2.3 s in
    MKL here, the Gram ``eigh`` 3 ms. Squaring costs precision only on the tiny eigenvalues (absolute error
    ~1e-16·σ_max²), far below what the top-20 spectra and the top-r low rank use. ``device_math``: float32 on the
    keys' device (absolute error ~1e-7·σ_max²).
    """
    if device_math:
        k = keys.float()
        evals, evecs = torch.linalg.eigh(k.transpose(-1, -2) @ k)
        return evals.flip(-1).clamp_min(0), evecs.flip(-1)
    k = _to_solver(keys.to(torch.float64))
    with _single_thread():
        evals, evecs = torch.linalg.eigh(k.transpose(-1, -2) @ k)
    return evals.flip(-1).clamp_min(0), evecs.flip(-1)


def _take_top(values: Tensor, m: int) -> Tensor:
    """First ``m`` entries of the last dim (already descending), zero-padded when there are fewer."""
    n = values.shape[-1]
    if n >= m:
        return values[..., :m]
    pad = values.new_zeros(values.shape[:-1] + (m - n,))
    return torch.cat([values, pad], dim=-1)


def key_spectrum(keys: Tensor, scale: float, m: int = 20, *, device_math: bool | None = None) -> Tensor:
    """Top-``m`` eigenvalues of ``scale · K Kᵀ`` from the thin SVD of K (spec §9 "Cost").

    ``λ_i = scale · σ_i(K)²``; the ``N − Dh`` eigenvalues beyond ``min(N, Dh)`` are exactly zero, so the
    result is zero-padded to length ``m`` when ``min(N, Dh) < m``.

    Args:
        keys: (..., N, Dh) keys.
        scale: graph scale.
        m: spectrum length.
        device_math: float32 on the keys' device (default: :func:`use_device_math`).

    Returns:
        (..., m) descending: float64, or float32 on the device path.
    """
    n = keys.shape[-2]
    if use_device_math(keys, device_math):
        k = keys.float()
        sigma2 = torch.linalg.eigvalsh(k.transpose(-1, -2) @ k).flip(-1).clamp_min(0)
        return _take_top(scale * sigma2[..., : min(n, sigma2.shape[-1])], m)
    k = _to_solver(keys.to(torch.float64))
    with _single_thread():  # eigenvalues only: cheaper than the eigenpairs _gram_eigh returns
        sigma2 = torch.linalg.eigvalsh(k.transpose(-1, -2) @ k).flip(-1).clamp_min(0)
    return _take_top(scale * sigma2[..., : min(n, sigma2.shape[-1])], m).to(keys.device)


def normalize_spectrum(spec: Tensor) -> Tensor:
    """Divide by the L2 norm, then by the L1 norm Σ|x| (spec §2.5); zero vectors stay zero.

    Args:
        spec: (..., m) spectra.

    Returns:
        (..., m) in the input dtype (computed in at least float32).
    """
    x = spec.to(_compute_dtype(spec))
    l2 = torch.linalg.vector_norm(x, ord=2, dim=-1, keepdim=True)
    x = torch.where(l2 > 0, x / torch.where(l2 > 0, l2, torch.ones_like(l2)), torch.zeros_like(x))
    l1 = x.abs().sum(dim=-1, keepdim=True)
    x = torch.where(l1 > 0, x / torch.where(l1 > 0, l1, torch.ones_like(l1)), torch.zeros_like(x))
    return x.to(spec.dtype)


def spectral_distance(u: Tensor, v: Tensor) -> Tensor:
    """1-D Wasserstein distance of equal-length spectra as the authors compute it (spec §2.6).

    ``W = Σ_i |sort(u)_i − sort(v)_i|`` — the SUM over entries (scipy's ``wasserstein_distance``
    would be the mean). Leading dims broadcast.

    Args:
        u: (..., m).
        v: (..., m).

    Returns:
        (...) distances.
    """
    if u.shape[-1] != v.shape[-1]:
        raise ValueError(f"spectra must have the same length, got {u.shape[-1]} and {v.shape[-1]}")
    su = torch.sort(u, dim=-1, descending=True).values
    sv = torch.sort(v, dim=-1, descending=True).values
    return (su - sv).abs().sum(dim=-1)


def spectral_cost(spec_vfm: Tensor, spec_clip: Tensor, *, normalize: bool = True) -> Tensor:
    """Head-matching cost ``C[i, j] = 1 − W(λ_v[i], λ_c[j])`` (spec §2.7; rows VFM, columns CLIP).

    Args:
        spec_vfm: (..., Hv, m) VFM spectra.
        spec_clip: (..., Hc, m) CLIP spectra.
        normalize: apply :func:`normalize_spectrum` first. It is idempotent, so already-normalised
            spectra may be passed either way.

    Returns:
        (..., Hv, Hc) cost in the promoted dtype of the spectra.
    """
    if normalize:
        spec_vfm = normalize_spectrum(spec_vfm)
        spec_clip = normalize_spectrum(spec_clip)
    dist = spectral_distance(spec_vfm[..., :, None, :], spec_clip[..., None, :, :])
    return 1.0 - dist


# --------------------------------------------------------------------------------------- range match


def range_match(x: Tensor, ref: Tensor, dims: tuple[int, ...] | Sequence[int]) -> Tensor:
    """Map ``x`` affinely so its [min, max] over ``dims`` becomes the [min, max] of ``ref`` (spec §2.3, §2.10).

    ``(x − min x)/(max x − min x)·(max ref − min ref) + min ref`` with min/max as scalars over ``dims``
    (keepdim, broadcast over the remaining dims). Guard (spec §9): when ``max x = min x`` the values are
    left unscaled, i.e. the scale factor is 1 and only the shift applies, so a constant ``x`` maps to
    ``min ref`` (a constant logit shift, which the softmax ignores). No NaN either way.

    Args:
        x: tensor to rescale.
        ref: reference tensor, broadcast-compatible with ``x`` after the reduction.
        dims: dims to reduce, e.g. ``(-3, -2, -1)`` for per-item keys ``(B, h, N, Dh)`` or
            ``(-2, -1)`` for per-head graphs.

    Returns:
        Tensor like ``x`` (dtype of ``x``; computed in at least float32).
    """
    dims = tuple(dims)
    dtype = _compute_dtype(x, ref)
    xc = x.to(dtype)
    rc = ref.to(dtype)
    x_min = torch.amin(xc, dim=dims, keepdim=True)
    x_max = torch.amax(xc, dim=dims, keepdim=True)
    r_min = torch.amin(rc, dim=dims, keepdim=True)
    r_max = torch.amax(rc, dim=dims, keepdim=True)
    x_rng = x_max - x_min
    ok = x_rng > 0
    factor = (r_max - r_min) / torch.where(ok, x_rng, torch.ones_like(x_rng))
    # A subnormal range can overflow the factor; fall back to "unscaled" rather than inf·0 = NaN.
    factor = torch.where(ok & torch.isfinite(factor), factor, torch.ones_like(factor))
    return ((xc - x_min) * factor + r_min).to(x.dtype)


# ------------------------------------------------------------------------------------------ low rank


def rank_mask(ranks: Tensor, width: int) -> Tensor:
    """Boolean mask (..., width) of the retained columns for per-matrix ``ranks`` (...)."""
    return torch.arange(width, device=ranks.device) < ranks[..., None]


def _pad_cols(x: Tensor, width: int) -> Tensor:
    """Zero-pad / truncate the last dim of ``x`` to ``width``."""
    n = x.shape[-1]
    if n >= width:
        return x[..., :width]
    return torch.cat([x, x.new_zeros(x.shape[:-1] + (width - n,))], dim=-1)


def _exact_pairs(graph: Tensor | None, keys: Tensor | None, scale: float | None, width: int, device_math: bool = False):
    """Top-``width`` eigenpairs (float64; float32 on the device path): thin SVD of the keys if given, else ``eigh``
    of the graph.

    Returns ``(U, S, available)`` with U (..., N, width), S (..., width) zero-padded and ``available``
    the number of genuine pairs.
    """
    if keys is not None:
        if scale is None:
            raise ValueError("low_rank with keys needs the graph scale")
        device = keys.device
        sigma2, v = _gram_eigh(keys, device_math)
        avail = min(keys.shape[-2], sigma2.shape[-1])
        sigma2, v = sigma2[..., :width], v[..., :width]
        sigma = sigma2.sqrt()
        # left singular vectors U = K V Σ⁻¹; columns of a zero singular value stay zero (degenerate keys)
        tiny = torch.finfo(sigma.dtype).tiny
        inv = torch.where(sigma > 0, 1.0 / sigma.clamp_min(tiny), torch.zeros_like(sigma))
        k = keys.float() if device_math else _to_solver(keys.to(torch.float64))
        u = (k @ v) * inv[..., None, :]
        s = scale * sigma2
    else:
        device = graph.device
        if device_math:
            evals, evecs = torch.linalg.eigh(graph.float())
        else:
            with _single_thread():
                evals, evecs = torch.linalg.eigh(_to_solver(graph.to(torch.float64)))
        s, u = evals.flip(-1), evecs.flip(-1)
        avail = s.shape[-1]
    u, s = u[..., :width].to(device), s[..., :width].to(device)
    return _pad_cols(u, width), _pad_cols(s, width), min(avail, width)


#: The randomized low rank's test matrices on the device path, per (rows, columns, seed, device).
_TEST_MATRICES: dict[tuple[int, int, int, str], Tensor] = {}


def _test_matrix(n: int, q: int, seed: int, device: torch.device) -> Tensor:
    """``torch.svd_lowrank``'s Gaussian test matrix (n, q) as the CPU path draws it, float32 on ``device``.

    Drawn once per shape and seed on the CPU in float64 under its own generator (the same numbers the CPU path's
    seeded ``randn`` gives), so both paths project onto the same subspace; then cached on the device, so later
    calls copy nothing from the host.
    """
    key = (n, q, seed, str(device))
    r = _TEST_MATRICES.get(key)
    if r is None:
        gen = torch.Generator().manual_seed(seed)
        r = torch.randn(n, q, dtype=torch.float64, generator=gen).to(device=device, dtype=torch.float32)
        _TEST_MATRICES[key] = r
    return r


def _randomized_device(a: Tensor, width: int, q: int, niter: int, seed: int):
    """``torch.svd_lowrank`` (Halko et al. Algorithm 5.1, as torch runs it) in float32 on ``a``'s device.

    Same test matrix (:func:`_test_matrix`) and subspace iteration (QR after every product); the ``q × N`` SVD of
    ``B = Qᵀ A`` goes through the float64 ``eigh`` of the ``q × q`` matrix ``B Bᵀ`` (one batched call for small
    matrices where a batched SVD of the wide ``B`` would loop over the batch): ``B Bᵀ = U_B Σ² U_Bᵀ``,
    ``V = Bᵀ U_B Σ⁻¹``. The graphs are square, so torch's transpose for wide inputs never applies.
    """
    a = a.float()
    n = a.shape[-1]
    qe = min(q, a.shape[-1], a.shape[-2])
    r = _test_matrix(n, qe, seed, a.device)
    basis = torch.linalg.qr(a @ r).Q
    at = a.transpose(-1, -2)
    for _ in range(niter):
        basis = torch.linalg.qr(at @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    b = (basis.transpose(-1, -2) @ a).double()  # (..., qe, N)
    evals, ub = torch.linalg.eigh(b @ b.transpose(-1, -2))
    s2, ub = evals.flip(-1).clamp_min(0), ub.flip(-1)
    s = s2.sqrt()
    tiny = torch.finfo(s.dtype).tiny
    inv = torch.where(s > 0, 1.0 / s.clamp_min(tiny), torch.zeros_like(s))
    v = (b.transpose(-1, -2) @ ub) * inv[..., None, :]
    u = basis @ ub.float()
    return _pad_cols(u, width), _pad_cols(s.float(), width), _pad_cols(v.float(), width), min(qe, width)


def _randomized_triplets(graph: Tensor, width: int, q: int, niter: int, seed: int, device_math: bool = False):
    """``torch.svd_lowrank`` (float64) under a seeded, forked RNG; returns (U, S, V, available).

    ``device_math``: :func:`_randomized_device` (float32 on the graph's device, the same test matrix).
    """
    if device_math:
        return _randomized_device(graph, width, q, niter, seed)
    a = graph.to(torch.float64)
    qe = min(q, a.shape[-1], a.shape[-2])
    dev = a.device
    if dev.type == "cuda" and SOLVER_DEVICE is not None:
        u, s, v, avail = _randomized_triplets(_to_solver(a), width, q, niter, seed)
        return u.to(dev), s.to(dev), v.to(dev), avail
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[idx], device_type="cuda"):
            with torch.cuda.device(idx):
                torch.cuda.manual_seed(seed)
            u, s, v = torch.svd_lowrank(a, q=qe, niter=niter)
    elif dev.type == "cpu":
        with torch.random.fork_rng(devices=[]), _single_thread():
            torch.default_generator.manual_seed(seed)
            u, s, v = torch.svd_lowrank(a, q=qe, niter=niter)
    else:
        # Other backends: run on CPU so the seeded stream is the same everywhere we can control.
        u, s, v, avail = _randomized_triplets(a.cpu(), width, q, niter, seed)
        return u.to(dev), s.to(dev), v.to(dev), avail
    return _pad_cols(u, width), _pad_cols(s, width), _pad_cols(v, width), min(qe, width)


def _adaptive_rank(s: Tensor, method: str, q0: int, eta: float) -> Tensor:
    """Per-matrix rank from the top-``q0`` values ``s`` (..., q0), descending.

    energy (Algorithm 1, spec §6/§9): smallest k with Σ_{i≤k} σ_i ≥ η·Σ_{i≤q0} σ_i.
    eigengap: k = argmax_{1≤k<q0} (σ_k − σ_{k+1}) (1-based, absolute gaps, first maximum wins).
    """
    s = s[..., :q0].clamp_min(0)  # eigh can return -1e-16 for PSD graphs; negative energy is noise
    if method == "energy":
        csum = torch.cumsum(s, dim=-1)
        # Use the cumsum's own last entry as the total so k = q0 always qualifies for η ≤ 1.
        hit = csum >= eta * csum[..., -1:]
        return torch.argmax(hit.to(torch.int8), dim=-1) + 1
    if s.shape[-1] < 2:
        return torch.ones(s.shape[:-1], dtype=torch.long, device=s.device)
    gaps = s[..., :-1] - s[..., 1:]
    return torch.argmax(gaps, dim=-1) + 1


def _low_rank64(
    graph: Tensor | None,
    rank: int | None,
    method: str,
    *,
    keys: Tensor | None,
    scale: float | None,
    seed: int,
    q: int,
    niter: int,
    eta: float,
    q0: int,
    dq: int,
    basis: str,
    device_math: bool = False,
) -> LowRank:
    """:func:`low_rank` without the final cast (float64 U, S, V; float32 on the device path)."""
    if method not in LOWRANK_METHODS:
        raise ValueError(f"unknown low-rank method {method!r}; expected one of {LOWRANK_METHODS}")
    if graph is None and keys is None:
        raise ValueError("low_rank needs a graph or keys")
    if keys is not None and graph is not None and keys.shape[-2] != graph.shape[-1]:
        raise ValueError(f"keys have {keys.shape[-2]} tokens but the graph is {graph.shape[-1]}x{graph.shape[-1]}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    ref = graph if graph is not None else keys
    lead = ref.shape[:-2]
    device = ref.device

    if method in ("randomized", "exact"):
        width = q if rank is None else rank
        if method == "randomized":
            if rank is not None and rank > q:
                raise ValueError(f"randomized low rank keeps the top rank={rank} of q={q} values: need rank <= q")
            if graph is None:
                if scale is None:
                    raise ValueError("randomized low rank from keys needs the graph scale")
                graph = attention_graph(keys.float() if device_math else keys.to(torch.float64), scale)
            u, s, v, avail = _randomized_triplets(graph, width, q, niter, seed, device_math)
        else:
            u, s, avail = _exact_pairs(graph, keys, scale, width, device_math)
            v = u
        ranks = torch.full(lead, avail, dtype=torch.long, device=device)
        return LowRank(u, s, v, ranks)

    # Adaptive ranks (energy / eigengap).
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    if q0 < 1 or dq < 1:
        raise ValueError(f"q0 and dq must be >= 1, got q0={q0}, dq={dq}")
    # Algorithm 1 would grow q by dq until the criterion holds, but with η ≤ 1 it always holds at
    # q = q0 (spec §9), so one decomposition of width q0 suffices and dq is never used.
    if basis == "exact":
        u, s, avail = _exact_pairs(graph, keys, scale, q0, device_math)
        v = u
    elif basis == "randomized":
        if graph is None:
            if scale is None:
                raise ValueError("randomized low rank from keys needs the graph scale")
            graph = attention_graph(keys.float() if device_math else keys.to(torch.float64), scale)
        u, s, v, avail = _randomized_triplets(graph, q0, q0, niter, seed, device_math)
    else:
        raise ValueError(f"basis must be 'exact' or 'randomized', got {basis!r}")
    ranks = _adaptive_rank(s, method, q0, eta).clamp(max=max(avail, 1))
    if rank is not None:
        ranks = ranks.clamp(max=rank)
    mask = rank_mask(ranks, s.shape[-1])
    s = s * mask
    u = u * mask[..., None, :]
    v = v * mask[..., None, :]
    return LowRank(u, s, v, ranks.to(device))


def low_rank(
    graph: Tensor | None,
    rank: int | None,
    method: str,
    *,
    keys: Tensor | None = None,
    scale: float | None = None,
    seed: int = 0,
    q: int = 10,
    niter: int = 2,
    eta: float = 0.95,
    q0: int = 10,
    dq: int = 5,
    basis: str = "exact",
    device_math: bool | None = None,
) -> LowRank:
    """Low-rank triplets of (symmetric PSD) graphs, spec §2.8, §6, §9 "Low rank".

    Methods:
        ``"randomized"``: ``torch.svd_lowrank(A, q=q, niter=niter)`` in float64 under an RNG seeded with
            ``seed`` (forked, so the global RNG is untouched); keeps the top ``rank`` (default ``q``) of
            its ``q`` values. Batched calls share one random test matrix across heads.
        ``"exact"``: top-``rank`` (default ``q``) eigenpairs: thin SVD of ``keys`` when given
            (``A = scale·K Kᵀ``: λ = scale·σ², U = V = left singular vectors), else ``eigh`` of the graph.
        ``"energy"``: Algorithm 1: smallest k with Σ_{i≤k}σ_i ≥ η·Σ_{i≤q0}σ_i (always found at q0).
        ``"eigengap"``: k = argmax_{1≤k<q0} (σ_k − σ_{k+1}) over the top q0 values (absolute gaps,
            smallest k on ties).
    Adaptive methods decompose with ``basis`` (``"exact"`` or ``"randomized"`` with q = q0), return
    width ``q0`` with zeros beyond each matrix's rank, and treat ``rank`` (if given) as a cap.
    Fixed methods zero-pad when fewer than ``rank`` pairs exist (N or Dh < rank).

    Args:
        graph: (..., N, N) graphs; may be None when ``keys`` (and ``scale``) are given.
        rank: number of values kept (fixed methods) or cap (adaptive); None = ``q``.
        method: one of ``"randomized"``, ``"exact"``, ``"energy"``, ``"eigengap"``.
        keys: (..., N, Dh) keys with ``graph = scale·K Kᵀ`` (exact path without an N×N solver).
        scale: graph scale (required with ``keys``).
        seed: RNG seed of the randomized SVD.
        q: randomized SVD width (no oversampling).
        niter: power iterations of the randomized SVD.
        eta: energy threshold η ∈ (0, 1].
        q0: adaptive candidate count.
        dq: Algorithm 1's q increment (validated, never needed for η ≤ 1).
        basis: decomposition used by the adaptive methods.
        device_math: float32 on the input's device (default: :func:`use_device_math`).

    Returns:
        :class:`LowRank` ``(U, S, V, ranks)``; U, S, V in the input dtype, ranks a LongTensor (...).
    """
    ref = graph if graph is not None else keys
    out = _low_rank64(
        graph, rank, method, keys=keys, scale=scale, seed=seed, q=q, niter=niter, eta=eta, q0=q0, dq=dq,
        basis=basis, device_math=ref is not None and use_device_math(ref, device_math),
    )
    dtype = (graph if graph is not None else keys).dtype
    return LowRank(out.U.to(dtype), out.S.to(dtype), out.V.to(dtype), out.ranks)


def eigenscale(s: Tensor, eps: float = 1.5, mask: Tensor | None = None, *, compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """Dynamic eigenscaling φ (spec §2.9), stretching [σmin, σmax] onto [(2−ε)σmin, ε·σmax].

    ``φ(σ) = (σ − σmin)/(σmax − σmin)·(ε·σmax − (2−ε)·σmin) + (2−ε)·σmin``
    with σmin/σmax over the retained values of each vector (``mask``; padded zeros must not become σmin). Vectors with
    σmax = σmin (or nothing retained) are returned unchanged; unretained entries are returned as is.

    Args:
        s: (..., r) values.
        eps: ε (1.5 in CASS).
        mask: (..., r) bool of retained entries, e.g. ``rank_mask(ranks, r)``; None = all.
        compute_dtype: float64 (default), float32 on the device path.

    Returns:
        (..., r) in the dtype of ``s`` (computed in ``compute_dtype``).
    """
    x = s.to(compute_dtype)
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    mask = mask.to(torch.bool).expand_as(x)
    inf = x.new_full((), math.inf)  # a fill, not a host-to-device copy (which synchronises on CUDA)
    s_min = torch.where(mask, x, inf).amin(dim=-1, keepdim=True)
    s_max = torch.where(mask, x, -inf).amax(dim=-1, keepdim=True)
    ok = s_max > s_min  # false for a constant vector and for an empty mask (inf > -inf is false there)
    s_min = torch.where(ok, s_min, torch.zeros_like(s_min))
    s_max = torch.where(ok, s_max, torch.ones_like(s_max))
    lo = (2.0 - eps) * s_min
    phi = (x - s_min) / (s_max - s_min) * (eps * s_max - lo) + lo
    return torch.where(ok & mask, phi, x).to(s.dtype)


def low_rank_graph(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """``U diag(S) Vᵀ`` batched: (..., N, r), (..., r), (..., N, r) → (..., N, N)."""
    dtype = _compute_dtype(U, S, V)
    out = (U.to(dtype) * S.to(dtype)[..., None, :]) @ V.to(dtype).transpose(-1, -2)
    return out.to(torch.promote_types(torch.promote_types(U.dtype, S.dtype), V.dtype))


def zero_diagonal(A: Tensor) -> Tensor:
    """Copy of ``A`` (..., N, N) with a zero diagonal."""
    n = A.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=A.device)
    return A.masked_fill(eye, 0)


def fuse_graphs(vfm_graph: Tensor, clip_graph: Tensor, w: Tensor, lam: float) -> Tensor:
    """Fuse the distilled VFM graph into the CLIP graph: ``(λ·w·D + A_c)/(λ·w + 1)`` (spec §2.11).

    Args:
        vfm_graph: (..., h, N, N) distilled VFM graph D (already range-matched).
        clip_graph: (..., h, N, N) CLIP graph A_c.
        w: (..., h) or (h,) fusion weight per head (a Python float/0-d tensor broadcasts too).
        lam: λ.

    Returns:
        (..., h, N, N) in ``clip_graph``'s dtype (computed in at least float32 so λ·w·D can't
        overflow fp16).
    """
    dtype = _compute_dtype(vfm_graph, clip_graph)
    w = torch.as_tensor(w, device=clip_graph.device).to(dtype)
    lw = (lam * w)[..., None, None]
    fused = (lw * vfm_graph.to(dtype) + clip_graph.to(dtype)) / (lw + 1.0)
    return fused.to(clip_graph.dtype)


def gather_heads(x: Tensor, assignment: Tensor) -> Tensor:
    """Select VFM heads per CLIP head: ``out[..., i, :, :] = x[..., assignment[..., i], :, :]``.

    Args:
        x: (..., Hv, A, B) per-VFM-head tensors (graphs or keys).
        assignment: (Hc,) or (..., Hc) LongTensor of VFM head indices.

    Returns:
        (..., Hc, A, B).
    """
    assignment = assignment.to(device=x.device, dtype=torch.long)
    lead = torch.broadcast_shapes(x.shape[:-3], assignment.shape[:-1])
    hc = assignment.shape[-1]
    a, b = x.shape[-2:]
    idx = assignment.reshape(assignment.shape + (1, 1)).expand(*lead, hc, a, b)
    return torch.gather(x.expand(*lead, *x.shape[-3:]), -3, idx)


def distilled_vfm_graph(
    vfm_graph: Tensor | None,
    *,
    vfm_keys: Tensor | None = None,
    scale: float | None = None,
    lowrank: str | None = "randomized",
    rank: int | None = 10,
    eigenscaling: bool = True,
    eps: float = 1.5,
    seed: int = 0,
    q: int = 10,
    niter: int = 2,
    eta: float = 0.95,
    q0: int = 10,
    dq: int = 5,
    basis: str = "exact",
    device_math: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Spec §2 steps 8-10 for already matched VFM graphs: low rank → φ → D = U diag(φ(σ)) Vᵀ → zero diagonal.

    The result is not yet range-matched: that depends on the CLIP graph it is fused with. The caller does steps
    10-11 per graph, :func:`range_match` over ``(-2, -1)`` then :func:`fuse_graphs`, as
    :class:`cass_plugins.cass.distillation.SpectralAttentionHook` does. Everything runs in float64.

    Args:
        vfm_graph: (..., Hc, N, N) VFM graphs already matched to the CLIP heads (:func:`gather_heads`); may be
            None when ``vfm_keys`` and ``scale`` are given.
        vfm_keys: (..., Hc, N, Dh_v) matched, range-matched VFM keys with ``vfm_graph = scale·K Kᵀ``; lets the
            exact paths use the small Gram eigenproblem of the keys.
        scale: graph scale (needed with ``vfm_keys``).
        lowrank: low-rank method (see :func:`low_rank`) or None for the full graph.
        rank, seed, q, niter, eta, q0, dq, basis: forwarded to :func:`low_rank`.
        eigenscaling: apply φ (requires a low-rank method).
        eps: ε of φ.
        device_math: float32 on the input's device instead of float64 (default: :func:`use_device_math`).

    Returns:
        ``(D, ranks)``: float64 (float32 on the device path) (..., Hc, N, N) with a zero diagonal; ranks (..., Hc) or
        None without low rank.
    """
    if vfm_graph is None and (vfm_keys is None or scale is None):
        raise ValueError("distilled_vfm_graph needs vfm_graph, or vfm_keys together with scale")
    dm = use_device_math(vfm_graph if vfm_graph is not None else vfm_keys, device_math)
    dtype = torch.float32 if dm else torch.float64
    if lowrank is None:
        if eigenscaling:
            raise ValueError("eigenscaling rescales low-rank eigenvalues: it needs lowrank != None")
        d = vfm_graph if vfm_graph is not None else attention_graph(vfm_keys.to(dtype), scale)
        return zero_diagonal(d.to(dtype)), None
    # With keys, the exact paths use the small Gram eigenproblem instead of an N×N eigh; the randomized SVD
    # works on the graph itself (built from the keys when no graph is given).
    if vfm_keys is not None and (lowrank != "randomized" or vfm_graph is None):
        g, k = None, vfm_keys
    else:
        g, k = vfm_graph, None
    lr = _low_rank64(
        g, rank, lowrank, keys=k, scale=scale, seed=seed, q=q, niter=niter, eta=eta, q0=q0, dq=dq, basis=basis,
        device_math=dm,
    )
    mask = rank_mask(lr.ranks, lr.S.shape[-1])
    s = eigenscale(lr.S, eps, mask=mask, compute_dtype=dtype) if eigenscaling else lr.S
    return zero_diagonal(low_rank_graph(lr.U, s, lr.V)), lr.ranks
