"""CDAM tensor math (adapters/cdam_math.py, every function the CDAM component calls) against float64 loop
re-computations of docs/spec/cdam.md (§4-§10) and hand-worked cases; the §11 labels through the pipeline's
``logits_to_labels``; self-checks of the test-side L×L references in ``tests/reference_cdam.py``."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import reference_cdam as ref_cdam
from cass_plugins.adapters import cdam_math as cdam
from cass_plugins.adapters.cdam import CDAMConfig
from cass_plugins import resolve_config
from cass_plugins.pipeline.postprocess import logits_to_labels

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------------------------
# Independent references: plain Python floats and loops, written from the spec.
# ---------------------------------------------------------------------------------------------------------------


def ref_softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [v / s for v in e]


def ref_jsd(dist: list[list[float]], eps: float = 1e-8) -> list[list[float]]:
    """§5 direct form: ½ Σ_c [p_i(ln(p_i+ε) − ln(M+ε)) + p_j(ln(p_j+ε) − ln(M+ε))]."""
    n = len(dist)
    out = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            s = 0.0
            for pi, pj in zip(dist[i], dist[j]):
                m = (pi + pj) / 2
                lm = math.log(m + eps)
                s += pi * (math.log(pi + eps) - lm) + pj * (math.log(pj + eps) - lm)
            out[i][j] = 0.5 * s
    return out


def ref_minmax(row: list[float], eps: float = 1e-8) -> list[float]:
    lo, hi = min(row), max(row)
    return [(v - lo) / (hi - lo + eps) for v in row]


def ref_transform(jsd: list[list[float]], temp: float = 0.1, minmax: bool = True) -> list[list[float]]:
    """§6, one row at a time: 1 − JSD, min-max, softmax(·/P), min-max."""
    out = []
    for row in jsd:
        a = [1.0 - v for v in row]
        if minmax:
            a = ref_minmax(a)
        b = ref_softmax([v / temp for v in a])
        if minmax:
            b = ref_minmax(b)
        out.append(b)
    return out


def ref_linear_weights(n_in: int, n_out: int) -> list[list[tuple[int, float]]]:
    """1-D bilinear weights, align_corners=False: src = (dst+½)·in/out − ½, clamped at 0."""
    rows = []
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        l1 = src - i0
        rows.append([(i0, 1.0 - l1), (i1, l1)])
    return rows


def ref_resample_rows(src: tuple[int, int], dst: tuple[int, int]) -> list[dict[int, float]]:
    """Row i (a dst patch, row-major) → {src patch index: weight}, the 2-D bilinear matrix U (sparse)."""
    wy = ref_linear_weights(src[0], dst[0])
    wx = ref_linear_weights(src[1], dst[1])
    rows = []
    for y in range(dst[0]):
        for x in range(dst[1]):
            r: dict[int, float] = {}
            for a, wa in wy[y]:
                for b, wb in wx[x]:
                    k = a * src[1] + b
                    r[k] = r.get(k, 0.0) + wa * wb
            rows.append(r)
    return rows


def ref_downsample(s: list[list[float]], grid: tuple[int, int], sub: tuple[int, int]) -> list[list[float]]:
    rows = ref_resample_rows(grid, sub)
    c = len(s[0])
    return [[sum(w * s[k][ch] for k, w in r.items()) for ch in range(c)] for r in rows]


def ref_upsample(mat: list[list[float]], sub: tuple[int, int], grid: tuple[int, int]) -> list[list[float]]:
    """U · X · Uᵀ with explicit sums."""
    u = ref_resample_rows(sub, grid)
    n = len(u)
    return [
        [sum(wa * mat[a][b] * wb for a, wa in u[i].items() for b, wb in u[j].items()) for j in range(n)]
        for i in range(n)
    ]


def ref_multiscale(
    s0: list[list[float]],
    grid: tuple[int, int],
    scales: tuple[float, ...],
    order: str = "upsample_divergence",
    minmax: bool = True,
) -> list[list[float]]:
    """§7: mean over scales; per scale down-sample S0, softmax(·/0.1), JSD, then repo or paper order."""
    n = len(s0)
    total = [[0.0] * n for _ in range(n)]
    for m in scales:
        if m == 1.0:
            att = ref_transform(ref_jsd([ref_softmax([v / 0.1 for v in row]) for row in s0]), minmax=minmax)
        else:
            sub = (max(1, int(grid[0] * m)), max(1, int(grid[1] * m)))
            p = [ref_softmax([v / 0.1 for v in row]) for row in ref_downsample(s0, grid, sub)]
            jsd = ref_jsd(p)
            if order == "upsample_divergence":
                att = ref_transform(ref_upsample(jsd, sub, grid), minmax=minmax)
            else:
                att = ref_upsample(ref_transform(jsd, minmax=minmax), sub, grid)
        for i in range(n):
            for j in range(n):
                total[i][j] += att[i][j] / len(scales)
    return total


def ref_entropy_threshold(logits: list[list[float]], scale: float = 50.0, base: float = 2.0) -> float:
    """§10: entropies of softmax(scale·logits), thr = 0.5·2.5 / ((min + max)/2)."""
    hs = []
    for row in logits:
        q = ref_softmax([scale * v for v in row])
        hs.append(-sum(v * math.log(v) / math.log(base) for v in q if v > 0))
    return 0.5 * 2.5 / ((min(hs) + max(hs)) / 2)


def as_lists(t: torch.Tensor) -> list:
    return t.tolist()


def random_similarity(b: int, n: int, c: int, seed: int = 0) -> torch.Tensor:
    # Cosine-like values with the spread CLIP gives (a few tenths), so that T = 0.1 yields non-trivial distributions.
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, c, generator=g, dtype=torch.float64) * 0.5 - 0.1


# ---------------------------------------------------------------------------------------------------------------
# §4, §5 distributions and JSD
# ---------------------------------------------------------------------------------------------------------------


def test_class_distribution_is_softmax_over_queries() -> None:
    s = random_similarity(2, 6, 7)
    p = cdam.class_distribution(s, 0.1)
    for b in range(2):
        for i in range(6):
            ref = ref_softmax([v / 0.1 for v in s[b, i].tolist()])
            assert p[b, i].tolist() == pytest.approx(ref, abs=1e-14)


def test_pairwise_jsd_matches_loop_reference() -> None:
    s = random_similarity(2, 12, 6, seed=1)
    p = cdam.class_distribution(s)
    jsd = cdam.pairwise_jsd(p)
    for b in range(2):
        ref = ref_jsd(as_lists(p[b]))
        assert torch.allclose(jsd[b], torch.tensor(ref, dtype=torch.float64), atol=1e-13, rtol=0)


def test_pairwise_jsd_hand_worked() -> None:
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]], dtype=torch.float64)
    jsd = cdam.pairwise_jsd(p)
    # KL([1,0]‖[.75,.25]) = ln(4/3); KL([.5,.5]‖[.75,.25]) = ½ln(2/3) + ½ln 2; their mean:
    assert jsd[0, 0, 1].item() == pytest.approx(0.21576155433883565, abs=1e-7)
    assert jsd[0, 0, 2].item() == pytest.approx(LN2, abs=1e-7)  # disjoint supports: the maximum, ln 2


def test_pairwise_jsd_symmetric_zero_diagonal_bounded() -> None:
    p = cdam.class_distribution(random_similarity(3, 40, 9, seed=2))
    jsd = cdam.pairwise_jsd(p, chunk_size=7)
    assert torch.equal(torch.diagonal(jsd, dim1=-2, dim2=-1), torch.zeros(3, 40, dtype=torch.float64))
    assert torch.allclose(jsd, jsd.transpose(1, 2), atol=1e-15, rtol=0)
    assert jsd.min() >= -1e-14 and jsd.max() <= LN2 + 1e-14


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 64])
def test_pairwise_jsd_chunked_equals_unchunked(chunk_size: int) -> None:
    p = cdam.class_distribution(random_similarity(2, 37, 11, seed=3))
    whole = cdam.pairwise_jsd(p, chunk_size=37)
    chunked = cdam.pairwise_jsd(p, chunk_size=chunk_size)
    assert torch.allclose(chunked, whole, atol=1e-15, rtol=0)
    # The element budget drives the automatic chunk size the same way.
    budgeted = cdam.pairwise_jsd(p, max_chunk_elements=2 * 37 * 11 * 3)  # 3 rows per chunk
    assert torch.allclose(budgeted, whole, atol=1e-15, rtol=0)


def test_pairwise_jsd_float32_close_to_float64() -> None:
    p64 = cdam.class_distribution(random_similarity(1, 50, 101, seed=4))
    j64 = cdam.pairwise_jsd(p64)
    j32 = cdam.pairwise_jsd(p64.float())
    assert j32.dtype == torch.float32
    assert torch.allclose(j32.double(), j64, atol=2e-6, rtol=0)


def test_jsd_no_nan_one_hot_and_uniform() -> None:
    one_hot = torch.eye(4, dtype=torch.float32)[[0, 1, 1, 3, 2, 0]][None]  # (1, 6, 4), repeated classes
    uniform = torch.full((1, 6, 4), 0.25)
    for eps in (1e-8, 0.0):
        j = cdam.pairwise_jsd(one_hot, eps=eps)
        assert torch.isfinite(j).all()
        assert j[0, 0, 5].item() == pytest.approx(0.0, abs=1e-6)  # same class
        assert j[0, 0, 1].item() == pytest.approx(LN2, abs=1e-6)  # different classes
        assert torch.isfinite(cdam.divergence_to_attention(cdam.pairwise_jsd(one_hot), minmax=True)).all()
        ju = cdam.pairwise_jsd(uniform, eps=eps)
        assert torch.allclose(ju, torch.zeros_like(ju), atol=1e-7)
        # A constant row min-maxes to 0, softmaxes to uniform, min-maxes to 0: zeros, not NaN.
        assert torch.equal(cdam.divergence_to_attention(cdam.pairwise_jsd(uniform)), torch.zeros(1, 6, 6))
        assert torch.equal(cdam.multiscale_cdam(torch.zeros(1, 6, 4), (2, 3), scales=(1.0,)), torch.zeros(1, 6, 6))


def ref_jsd_float64(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """§5 direct form in float64, all pairs at once: ½ Σ_c p_i(ln(p_i+ε) − ln(M+ε)) + ½ Σ_c p_j(ln(p_j+ε) − ln(M+ε)).

    With ε = 0 a class with p = 0 contributes 0 (0·ln 0 = 0).
    """
    p = p.double()
    p_i, p_j = p[:, :, None, :], p[:, None, :, :]
    log_m = torch.log((p_i + p_j) / 2 + eps)

    def kl_term(q: torch.Tensor) -> torch.Tensor:
        return torch.where(q > 0, q * (torch.log(q + eps) - log_m), torch.zeros_like(log_m))

    return 0.5 * kl_term(p_i).sum(-1) + 0.5 * kl_term(p_j).sum(-1)


def ref_attention_float64(jsd: torch.Tensor, temp: float = 0.1, eps: float = 1e-8) -> torch.Tensor:
    """§6 in float64: 1 − JSD, row min-max, row softmax(·/P), row min-max."""

    def minmax(x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        return (x - lo) / (hi - lo + eps)

    return minmax(torch.softmax(minmax(1.0 - jsd.double()) / temp, dim=-1))


def near_uniform_distributions(b: int = 2, n: int = 50, c: int = 171, seed: int = 12) -> torch.Tensor:
    # softmax of tiny logits: JSD ~1e-5, where ½h_i + ½h_j − Σ M ln M (each term ≈ ln C ≈ 5) cancels in float32.
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(0.01 * torch.randn(b, n, c, generator=g, dtype=torch.float64), dim=-1).float()


def test_pairwise_jsd_float32_near_uniform_matches_float64_reference() -> None:
    p = near_uniform_distributions()
    ref = ref_jsd_float64(p)  # the same float32 inputs, divergence in float64
    assert ref.max() < 1e-4  # the regime of the issue
    jsd = cdam.pairwise_jsd(p, chunk_size=7)
    assert jsd.dtype == torch.float32
    # Direct form: ~5e-8. The cancelling ½h_i + ½h_j − Σ M ln(M+ε) form was ~1.3e-6 here.
    assert (jsd.double() - ref).abs().max().item() < 2e-7
    assert torch.equal(torch.diagonal(jsd, dim1=-2, dim2=-1), torch.zeros(2, 50))
    assert torch.equal(jsd, jsd.transpose(1, 2))


def test_cdam_attention_float32_near_uniform_matches_float64_reference() -> None:
    # Downstream CDAM map: the §6 row min-max rescales each row by its JSD range (~1e-5), so JSD errors are
    # amplified ~1e3×. With the direct form the float32 map stays within ~6e-5 of float64 (what remains is the
    # float32 1 − JSD / softmax of §6 itself); with the cancelling form it was ~1.4e-3.
    p = near_uniform_distributions()
    ref = ref_attention_float64(ref_jsd_float64(p))
    att = cdam.divergence_to_attention(cdam.pairwise_jsd(p))
    assert (att.double() - ref).abs().max().item() < 2e-4
    full = cdam.multiscale_cdam(torch.log(p) * cdam.CLASS_TEMPERATURE, (5, 10), scales=(1.0,))
    assert (full.double() - ref).abs().max().item() < 2e-4


def test_pairwise_jsd_eps_zero_matches_float64_reference() -> None:
    # Exact zeros in the distributions: without ε the 0·ln 0 = 0 convention must hold, in float32 and float64.
    s = random_similarity(2, 20, 9, seed=13)
    p = cdam.class_distribution(s)
    p = torch.where(s < 0.05, torch.zeros_like(p), p)
    p = p / p.sum(-1, keepdim=True)
    assert (p == 0).any()
    ref = ref_jsd_float64(p, eps=0.0)
    j64 = cdam.pairwise_jsd(p, eps=0.0, chunk_size=6)
    j32 = cdam.pairwise_jsd(p.float(), eps=0.0, chunk_size=6)
    assert torch.isfinite(j64).all() and torch.isfinite(j32).all()
    assert torch.allclose(j64, ref, atol=1e-14, rtol=0)
    assert torch.allclose(j32.double(), ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# §6 transform
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("minmax", [True, False])
def test_divergence_to_attention_matches_loop_reference(minmax: bool) -> None:
    p = cdam.class_distribution(random_similarity(2, 15, 8, seed=5))
    jsd = cdam.pairwise_jsd(p)
    att = cdam.divergence_to_attention(jsd, temperature=0.1, minmax=minmax)
    for b in range(2):
        ref = ref_transform(as_lists(jsd[b]), 0.1, minmax)
        assert torch.allclose(att[b], torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0)
    if minmax:
        # Each row spans [0, 1]; at full scale the own patch (JSD 0, the row's largest 1 − JSD) gets ≈ 1.
        assert torch.allclose(att.amax(-1), torch.ones(2, 15, dtype=torch.float64), atol=1e-6)
        assert torch.equal(att.amin(-1), torch.zeros(2, 15, dtype=torch.float64))
        assert torch.allclose(torch.diagonal(att, dim1=-2, dim2=-1), torch.ones(2, 15, dtype=torch.float64), atol=1e-6)
    else:
        assert torch.allclose(att.sum(-1), torch.ones(2, 15, dtype=torch.float64), atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# §7 multi-scale
# ---------------------------------------------------------------------------------------------------------------


def test_subgrid_sizes_of_a_448_window() -> None:
    sizes = [cdam.subgrid_size((28, 28), m)[0] for m in cdam.CDAM_SCALES]
    assert sizes == [7, 10, 14, 17, 21, 24, 28]


def test_resize_similarity_28_to_7_is_central_2x2_mean() -> None:
    s = random_similarity(1, 28 * 28, 3, seed=6)
    out = cdam.resize_similarity(s, (28, 28), (7, 7)).reshape(7, 7, 3)
    img = s.reshape(28, 28, 3)
    for y in range(7):
        for x in range(7):
            block = img[4 * y + 1 : 4 * y + 3, 4 * x + 1 : 4 * x + 3]  # source positions 4y+1.5, 4x+1.5
            assert torch.allclose(out[y, x], block.mean(dim=(0, 1)), atol=1e-14)


def test_resize_similarity_non_integer_ratio_matches_reference() -> None:
    s = random_similarity(1, 6 * 9, 4, seed=7)
    out = cdam.resize_similarity(s, (6, 9), (4, 5))
    ref = ref_downsample(as_lists(s[0]), (6, 9), (4, 5))
    assert torch.allclose(out[0], torch.tensor(ref, dtype=torch.float64), atol=1e-14)


def test_upsample_pairwise_matches_u_x_ut() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.rand(2, 12, 12, generator=g, dtype=torch.float64)
    up = cdam.upsample_pairwise(x, (3, 4), (5, 7))
    for b in range(2):
        ref = ref_upsample(as_lists(x[b]), (3, 4), (5, 7))
        assert torch.allclose(up[b], torch.tensor(ref, dtype=torch.float64), atol=1e-14)
    sym = x + x.transpose(1, 2)
    up_sym = cdam.upsample_pairwise(sym, (3, 4), (5, 7))
    assert torch.allclose(up_sym, up_sym.transpose(1, 2), atol=1e-14)


@pytest.mark.parametrize("order", ["upsample_divergence", "upsample_attention"])
def test_multiscale_cdam_matches_loop_reference(order: str) -> None:
    # Non-square, non-integer ratios; sub-grids 1×2, 2×3, 3×5, 3×6, 4×7, 5×8. The width is even on purpose: with an
    # odd width a 1×2 sub-grid puts the middle column exactly between its two cells, so that query's up-sampled
    # divergence row is constant in exact arithmetic and the §6 min-max (ε = 1e-8) blows its ~1e-17 rounding noise
    # up to O(1): a comparison of rounding noise, not of the formula.
    grid = (6, 10)
    s0 = random_similarity(2, 60, 6, seed=9)
    out = cdam.multiscale_cdam(s0, grid, multiscale_order=order, chunk_size=10)
    assert out.shape == (2, 60, 60)
    for b in range(2):
        ref = ref_multiscale(as_lists(s0[b]), grid, cdam.CDAM_SCALES, order=order)
        assert torch.allclose(out[b], torch.tensor(ref, dtype=torch.float64), atol=1e-11, rtol=0)


def test_multiscale_cdam_without_minmax_and_custom_scales() -> None:
    grid = (4, 5)
    s0 = random_similarity(1, 20, 5, seed=10)
    scales = (0.5, 0.75, 1.0)
    out = cdam.multiscale_cdam(s0, grid, scales=scales, minmax=False)
    ref = ref_multiscale(as_lists(s0[0]), grid, scales, minmax=False)
    assert torch.allclose(out[0], torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0)
    full = cdam.multiscale_cdam(s0, grid, scales=(1.0,))
    composed = cdam.divergence_to_attention(cdam.pairwise_jsd(cdam.class_distribution(s0)))
    assert torch.allclose(full, composed, atol=0, rtol=0)
    ref_full = ref_multiscale(as_lists(s0[0]), grid, (1.0,))
    assert torch.allclose(full[0], torch.tensor(ref_full, dtype=torch.float64), atol=1e-12, rtol=0)


def test_multiscale_cdam_no_nan_on_degenerate_similarities() -> None:
    grid = (4, 4)  # 0.25 → a 1×1 sub-grid
    one_hot = 100.0 * torch.eye(5)[torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(0))][None]
    constant = torch.zeros(1, 16, 5)
    for s0 in (one_hot, constant):
        for order in ("upsample_divergence", "upsample_attention"):
            out = cdam.multiscale_cdam(s0, grid, multiscale_order=order)
            assert torch.isfinite(out).all()
            assert out.min() >= 0 and out.max() <= 1 + 1e-6


def test_multiscale_cdam_window_size_smoke() -> None:
    # A real 448 window: N = 784 patches, C = 21 VOC classes + 80 ATP, float32 as on the device.
    s0 = random_similarity(1, 784, 101, seed=11).float()
    out = cdam.multiscale_cdam(s0, (28, 28))
    assert out.shape == (1, 784, 784) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1 + 1e-6


def test_multiscale_cdam_rejects_bad_arguments() -> None:
    s0 = random_similarity(1, 16, 3)
    with pytest.raises(ValueError):
        cdam.multiscale_cdam(s0, (4, 5))
    with pytest.raises(ValueError):
        cdam.multiscale_cdam(s0, (4, 4), scales=(1.5,))
    with pytest.raises(ValueError):
        cdam.multiscale_cdam(s0, (4, 4), multiscale_order="nope")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# §8 assembly, §3/§9 block passes: self-checks of the test-side references (tests/reference_cdam.py) that
# tests/test_cdam.py compares the CDAM component against
# ---------------------------------------------------------------------------------------------------------------


def test_assemble_attention_cls_zero_and_shared_heads() -> None:
    w = torch.rand(2, 6, 6, dtype=torch.float64)
    full = ref_cdam.assemble_attention(w)
    assert full.shape == (2, 7, 7)
    assert torch.equal(full[:, 0], torch.zeros(2, 7, dtype=torch.float64))
    assert torch.equal(full[:, :, 0], torch.zeros(2, 7, dtype=torch.float64))
    assert torch.equal(full[:, 1:, 1:], w)
    heads = ref_cdam.assemble_attention(w, num_heads=3)
    assert heads.shape == (2, 3, 7, 7)
    assert all(torch.equal(heads[:, h], full) for h in range(3))
    normed = ref_cdam.assemble_attention(w, row_normalize=True)
    assert torch.allclose(normed[:, 1:].sum(-1), torch.ones(2, 6, dtype=torch.float64))


def _block_parts(d: int, seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))
    parts = {
        "ln_1": torch.nn.LayerNorm(d),
        "value": torch.nn.Linear(d, d),
        "out_proj": torch.nn.Linear(d, d),
        "ln_2": torch.nn.LayerNorm(d),
        "mlp": mlp,
    }
    return {k: v.double() for k, v in parts.items()}


def test_apply_attention_matches_per_head_loops() -> None:
    g = torch.Generator().manual_seed(12)
    b, heads, length, dh = 2, 3, 5, 4
    att = torch.rand(b, heads, length, length, generator=g, dtype=torch.float64)
    v = torch.rand(b, length, heads * dh, generator=g, dtype=torch.float64)
    out = ref_cdam.apply_attention(att, v)
    for bi in range(b):
        for h in range(heads):
            for t in range(length):
                for ch in range(dh):
                    ref = sum(att[bi, h, t, s].item() * v[bi, s, h * dh + ch].item() for s in range(length))
                    assert out[bi, t, h * dh + ch].item() == pytest.approx(ref, abs=1e-13)
    shared = att[:, 0]
    assert torch.allclose(
        ref_cdam.apply_attention(shared, v), ref_cdam.apply_attention(shared[:, None].expand(-1, heads, -1, -1), v)
    )
    assert torch.equal(ref_cdam.apply_attention(None, v), v)


def test_cdam_block_forward_pass1_and_pass2() -> None:
    d = 8
    parts = _block_parts(d, seed=13)
    x = torch.randn(2, 7, d, dtype=torch.float64)
    with torch.no_grad():
        # Pass 1 (§3): identity attention, residual and MLP kept.
        y1 = ref_cdam.cdam_block_forward(x, None, **parts)
        a = parts["out_proj"](parts["value"](parts["ln_1"](x)))
        ref1 = x + a
        ref1 = ref1 + parts["mlp"](parts["ln_2"](ref1))
        assert torch.allclose(y1, ref1, atol=1e-14)
        # Pass 2 (§9): CDAM matrix on the value path; CLS row zero → CLS gets only the out-proj bias.
        w = ref_cdam.assemble_attention(torch.rand(2, 6, 6, dtype=torch.float64), num_heads=2)
        y2 = ref_cdam.cdam_block_forward(x, w, **parts)
        v = parts["value"](parts["ln_1"](x))
        ref2 = x + parts["out_proj"](w[:, 0] @ v)
        ref2 = ref2 + parts["mlp"](parts["ln_2"](ref2))
        assert torch.allclose(y2, ref2, atol=1e-13)
        cls_attn = x[:, 0] + parts["out_proj"].bias
        assert torch.allclose(y2[:, 0], cls_attn + parts["mlp"](parts["ln_2"](cls_attn)), atol=1e-13)


def test_text_similarity_is_cosine_without_cls() -> None:
    g = torch.Generator().manual_seed(14)
    f = torch.randn(1, 4, 3, generator=g, dtype=torch.float64)
    t = torch.nn.functional.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=-1)
    s = cdam.text_similarity(f, t)
    assert s.shape == (1, 3, 5)
    for i in range(3):
        fi = f[0, i + 1].tolist()
        norm = math.sqrt(sum(v * v for v in fi))
        for c in range(5):
            ref = sum(a * b for a, b in zip(fi, t[c].tolist())) / norm
            assert s[0, i, c].item() == pytest.approx(ref, abs=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# §10, §11 entropy threshold
# ---------------------------------------------------------------------------------------------------------------


def test_entropy_threshold_hand_worked() -> None:
    # Patch 1: equal logits → 1 bit. Patch 2: 50·Δ = ln 3 → Q = (¾, ¼) → 0.811278 bits.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0) / 50, 0.0]]], dtype=torch.float64)
    h = cdam.patch_entropy(logits)
    assert h[0].tolist() == pytest.approx([1.0, 0.8112781244591328], abs=1e-12)
    assert cdam.entropy_threshold(logits).item() == pytest.approx(1.3802408179287908, abs=1e-12)


@pytest.mark.parametrize(("scale", "base"), [(50.0, 2.0), (10.0, math.e)])
def test_entropy_threshold_matches_loop_reference(scale: float, base: float) -> None:
    logits = random_similarity(3, 30, 21, seed=15)
    thr = cdam.entropy_threshold(logits, entropy_scale=scale, log_base=base)
    assert thr.shape == (3,)
    for b in range(3):
        assert thr[b].item() == pytest.approx(ref_entropy_threshold(as_lists(logits[b]), scale, base), rel=1e-12)


def test_image_level_threshold_from_window_entropies() -> None:
    # The paper's granularity: H_min/H_max over all patches of all windows of the image.
    windows = [random_similarity(1, 20, 7, seed=s) for s in (16, 17, 18)]
    hs = [cdam.patch_entropy(w) for w in windows]
    h_min = torch.stack([h.amin(-1) for h in hs]).amin(0)
    h_max = torch.stack([h.amax(-1) for h in hs]).amax(0)
    thr = cdam.threshold_from_entropy(h_min, h_max)
    all_patches = [row for w in windows for row in as_lists(w[0])]
    assert thr.item() == pytest.approx(ref_entropy_threshold(all_patches), rel=1e-12)


def test_entropy_no_nan_one_hot_and_uniform() -> None:
    # Max cosine gap 2 at ×50 underflows in fp16 (NaN in the repo); float32 with 0·log 0 = 0 stays finite.
    one_hot = torch.eye(6)[[0, 3, 5, 1]][None]
    uniform = torch.zeros(1, 4, 6)
    assert torch.isfinite(cdam.entropy_threshold(one_hot)).all()
    assert cdam.patch_entropy(uniform)[0].tolist() == pytest.approx([math.log2(6)] * 4, abs=1e-6)
    assert cdam.entropy_threshold(uniform).item() == pytest.approx(1.25 / math.log2(6), rel=1e-6)
    # Saturated softmax (exact 0 and 1 even in float32): H = +0 everywhere, so thr = +inf, never NaN or −inf.
    half = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]).half()
    assert cdam.entropy_threshold(half * 10).tolist() == [math.inf]


def test_background_threshold_in_logits_to_labels() -> None:
    # §11 runs in the pipeline's logits_to_labels (prob_thd = the CDAM threshold). With logit_scale 1 and log-probs
    # as logits, its softmax gives back ``probs``; the labels must be the reference's, a NaN threshold relabelling
    # nothing (strict ``<``, as the repo).
    probs = torch.tensor([[[[0.2, 0.7]], [[0.5, 0.1]], [[0.3, 0.2]]]], dtype=torch.float64)  # (1, 3, 1, 2)
    for thr, expected in ((0.6, [[0, 0]]), (0.4, [[1, 0]]), (float("nan"), [[1, 0]])):
        labels, class_probs = logits_to_labels(probs[0].log(), [0, 1, 2], logit_scale=1.0, prob_thd=thr)
        assert torch.allclose(class_probs, probs[0], atol=1e-15, rtol=0)
        assert labels.tolist() == expected
        assert torch.equal(labels, ref_cdam.apply_background_threshold(probs, thr)[0])
    assert ref_cdam.apply_background_threshold(probs, torch.tensor([0.6])).tolist() == [[[0, 0]]]


# ---------------------------------------------------------------------------------------------------------------
# Data: the ATP list; the settings that choose the keywords live in CDAMConfig and the cdam-* presets
# ---------------------------------------------------------------------------------------------------------------


def test_atp_list() -> None:
    atp = cdam.ATP_PROMPTS
    assert len(atp) == 80 and len(set(atp)) == 80
    assert atp[0] == "black" and atp[28] == "dark yellow" and atp[29] == "plain" and atp[-1] == "person"
    assert atp.index("ceramic") == 51 and atp.index("transparent") == 54 and atp.index("vehicle") == 55


def test_paper_preset_differs_from_the_repo_preset_in_the_paper_switches_only() -> None:
    # §15, written out by hand: the paper's Eq. 3 order, entropy of softmax(ρ/τ) with τ = 0.1 and a natural log (the
    # paper names no base; e is a guess), the threshold over all windows of the image. Everything else is the repo.
    paper_switches = {
        "multiscale_order": "upsample_attention",
        "entropy_scale": 10.0,
        "entropy_log_base": math.e,
        "threshold_granularity": "image",
    }
    paper = resolve_config("cdam-paper")["cdam"]
    repo = resolve_config("cdam-maskclip")["cdam"]
    for name in CDAMConfig.field_names():
        if name in paper_switches:
            assert getattr(paper, name) == paper_switches[name], name  # 1/0.1 == 10.0 exactly
            assert getattr(repo, name) != getattr(paper, name), name
        else:
            assert getattr(paper, name) == getattr(repo, name), name
    # The repo preset is the component's defaults, and the rest of the configuration (MaskCLIP pass 1, protocol)
    # is shared.
    assert repo == CDAMConfig()
    paper_all = resolve_config("cdam-paper").to_dict()
    repo_all = resolve_config("cdam-maskclip").to_dict()
    assert {k: v for k, v in paper_all.items() if k != "cdam"} == {k: v for k, v in repo_all.items() if k != "cdam"}


def test_component_defaults_are_the_math_defaults() -> None:
    # CDAMConfig's defaults (the repo) and the keyword defaults of the math functions must not drift apart.
    defaults = CDAMConfig()
    ms = inspect.signature(cdam.multiscale_cdam).parameters
    et = inspect.signature(cdam.entropy_threshold).parameters
    assert defaults.scales == ms["scales"].default == cdam.CDAM_SCALES
    assert defaults.class_temperature == ms["class_temperature"].default
    assert defaults.attention_temperature == ms["attention_temperature"].default
    assert defaults.minmax is ms["minmax"].default is True
    assert defaults.multiscale_order == ms["multiscale_order"].default == "upsample_divergence"
    assert defaults.max_chunk_elements == ms["max_chunk_elements"].default
    assert defaults.entropy_scale == et["entropy_scale"].default == 50.0
    assert defaults.entropy_log_base == et["log_base"].default == 2.0
    assert defaults.alpha == et["alpha"].default == 2.5
    assert defaults.default_threshold == et["default_threshold"].default == 0.5
    assert not hasattr(cdam, "CDAM_VARIANTS") and not hasattr(cdam, "CDAM_DATASET_DEFAULTS")
