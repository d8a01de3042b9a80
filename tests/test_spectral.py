"""cass_plugins.cass.spectral against float64 references written straight from the spec (cass.md §1.1, §2, §9)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

from reference_spectral import distill_and_fuse, graph_spectrum

from cass_plugins.cass.spectral import (
    attention_graph,
    eigenscale,
    fuse_graphs,
    gather_heads,
    gaussian_window,
    key_spectrum,
    low_rank,
    low_rank_graph,
    normalize_spectrum,
    range_match,
    rank_mask,
    spectral_cost,
    spectral_distance,
    zero_diagonal,
)

SCALE = 0.125


def _keys(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _graph_with_spectrum(values: list[float], n: int, seed: int = 0) -> torch.Tensor:
    """Symmetric n×n matrix Q diag(values, 0…) Qᵀ with a random orthogonal Q."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.zeros(n, dtype=torch.float64)
    lam[: len(values)] = torch.tensor(values, dtype=torch.float64)
    return (q * lam) @ q.T


def _ref_low_rank(a: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r truncated SVD reconstruction of each matrix, float64 (independent of the module)."""
    u, s, vh = torch.linalg.svd(a.to(torch.float64))
    return u[..., :, :r] @ torch.diag_embed(s[..., :r]) @ vh[..., :r, :]


def _ref_phi(s: np.ndarray, eps: float = 1.5) -> np.ndarray:
    lo, hi = s.min(), s.max()
    return (s - lo) / (hi - lo) * (eps * hi - (2 - eps) * lo) + (2 - eps) * lo


# ------------------------------------------------------------------------------------------ graphs


def test_attention_graph_matches_float64_loop() -> None:
    k = _keys(2, 3, 7, 5)
    got = attention_graph(k, SCALE)
    assert got.shape == (2, 3, 7, 7)
    for b in range(2):
        for h in range(3):
            for p in range(7):
                for q in range(7):
                    ref = SCALE * float(sum(k[b, h, p, c] * k[b, h, q, c] for c in range(5)))
                    assert abs(got[b, h, p, q].item() - ref) < 1e-12


@pytest.mark.parametrize("gh,gw,std", [(3, 5, 1.5), (4, 4, 5.0), (1, 6, 2.0), (7, 2, 0.7)])
def test_gaussian_window_closed_form(gh: int, gw: int, std: float) -> None:
    got = gaussian_window(gh, gw, std, dtype=torch.float64)
    n = gh * gw
    assert got.shape == (n, n)
    for p in range(n):
        for q in range(n):
            (a, b), (c, d) = divmod(p, gw), divmod(q, gw)
            ref = math.exp(-((a - c) ** 2 + (b - d) ** 2) / (2 * std * std))
            assert abs(got[p, q].item() - ref) < 1e-15
    assert torch.equal(torch.diagonal(got), torch.ones(n, dtype=torch.float64))


@pytest.mark.parametrize("gh,gw,std", [(3, 5, 1.5), (6, 4, 5.0), (5, 5, 2.0)])
def test_gaussian_window_matches_naclip_conv_construction(gh: int, gw: int, std: float) -> None:
    # baselines.md §1.3: (2gh−1)×(2gw−1) unnormalised window from linspace(−(n−1)c, (n−1)c, 2n−1),
    # c = 1/(σ√2), exp(−(x²+y²)); one one-hot image per token, conv2d padding='same', reshape N×N.
    c = 1.0 / (std * math.sqrt(2.0))
    ys = torch.linspace(-(gh - 1) * c, (gh - 1) * c, 2 * gh - 1, dtype=torch.float64)
    xs = torch.linspace(-(gw - 1) * c, (gw - 1) * c, 2 * gw - 1, dtype=torch.float64)
    window = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2))
    n = gh * gw
    onehots = torch.eye(n, dtype=torch.float64).reshape(n, 1, gh, gw)
    ref = F.conv2d(onehots, window[None, None], padding="same").reshape(n, n)
    got = gaussian_window(gh, gw, std, dtype=torch.float64)
    assert torch.allclose(got, ref, atol=1e-14, rtol=0)


def test_gaussian_window_dtype_and_validation() -> None:
    assert gaussian_window(2, 3, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError):
        gaussian_window(0, 3)
    with pytest.raises(ValueError):
        gaussian_window(2, 3, std=0.0)


# ----------------------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("n,dh,m", [(30, 8, 20), (40, 32, 20), (12, 16, 20), (25, 25, 5)])
def test_key_spectrum_equals_eigvalsh_of_full_graph(n: int, dh: int, m: int) -> None:
    k = _keys(2, 3, n, dh, seed=n + dh)
    got = key_spectrum(k, SCALE, m)
    assert got.dtype == torch.float64 and got.shape == (2, 3, m)
    full = SCALE * k @ k.transpose(-1, -2)
    ev = np.sort(np.linalg.eigvalsh(full.numpy()), axis=-1)[..., ::-1]
    ref = np.zeros((2, 3, m))
    take = min(m, n)
    ref[..., :take] = ev[..., :take]
    ref[np.abs(ref) < 1e-10] = 0.0  # the N − Dh eigenvalues are exactly zero in theory
    assert np.allclose(got.numpy(), ref, atol=1e-9, rtol=1e-10)
    assert torch.all(got[..., :-1] >= got[..., 1:])


def test_graph_spectrum_matches_numpy() -> None:
    a = _keys(3, 9, 9, seed=3)
    a = a + a.transpose(-1, -2)  # symmetric, indefinite
    got = graph_spectrum(a, m=12)
    ref = np.sort(np.linalg.eigvalsh(a.numpy()), axis=-1)[..., ::-1]
    assert got.shape == (3, 12)
    assert np.allclose(got[..., :9].numpy(), ref, atol=1e-12)
    assert torch.all(got[..., 9:] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_spectra_accept_low_precision(dtype: torch.dtype) -> None:
    k = _keys(2, 16, 8, seed=1, dtype=dtype)
    got = key_spectrum(k, SCALE)
    k64 = k.to(torch.float64)
    ev = np.sort(np.linalg.eigvalsh((SCALE * k64 @ k64.transpose(-1, -2)).numpy()), axis=-1)[..., ::-1]
    assert got.dtype == torch.float64 and got.shape == (2, 20)
    assert np.allclose(got[..., :16].numpy(), ev, atol=1e-9)
    assert torch.all(got[..., 16:] == 0)
    assert graph_spectrum(attention_graph(k, SCALE)).dtype == torch.float64


def test_normalize_spectrum_is_l1_normalisation() -> None:
    x = torch.tensor([[4.0, 3.0, 0.5, 0.0], [1.0, -1.0, 2.0, 0.0]], dtype=torch.float64)
    got = normalize_spectrum(x)
    ref = x / x.abs().sum(-1, keepdim=True)
    assert torch.allclose(got, ref, atol=1e-15)
    assert torch.allclose(normalize_spectrum(got), got, atol=1e-15)  # idempotent


def test_normalize_spectrum_zero_vector_and_half() -> None:
    x = torch.zeros(3, 20, dtype=torch.float16)
    got = normalize_spectrum(x)
    assert got.dtype == torch.float16 and torch.equal(got, torch.zeros_like(x))
    y = torch.tensor([6.0e4, 3.0e4, 1.0e4], dtype=torch.float16)  # squares overflow fp16
    got = normalize_spectrum(y)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.float(), torch.tensor([0.6, 0.3, 0.1]), atol=1e-3)


def test_spectral_distance_hand_worked_sum_not_mean() -> None:
    u = torch.tensor([3.0, 1.0, 2.0])
    v = torch.tensor([0.0, 5.0, 1.0])
    # sorted: [3,2,1] vs [5,1,0] -> 2 + 1 + 1
    assert spectral_distance(u, v).item() == 4.0
    ub = torch.stack([u, v])  # broadcast (2, 3) against (3,)
    assert torch.equal(spectral_distance(ub, v), torch.tensor([4.0, 0.0]))


def test_spectral_cost_against_scipy_wasserstein_times_m() -> None:
    m = 20
    sv = key_spectrum(_keys(4, 30, 8, seed=5), SCALE, m)
    sc = key_spectrum(_keys(3, 30, 8, seed=6), SCALE, m)
    got = spectral_cost(sv, sc)
    assert got.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            u = (sv[i] / sv[i].abs().sum()).numpy()
            v = (sc[j] / sc[j].abs().sum()).numpy()
            # scipy's W of equal-size samples is the mean |sorted difference|; the spec wants the sum.
            ref = 1.0 - m * wasserstein_distance(u, v)
            assert abs(got[i, j].item() - ref) < 1e-12


def test_spectral_cost_batched_and_degenerate() -> None:
    sv = key_spectrum(_keys(2, 4, 16, 8, seed=7), SCALE)
    sc = key_spectrum(torch.zeros(2, 4, 16, 8), SCALE)
    got = spectral_cost(sv, sc)
    assert got.shape == (2, 4, 4)
    # zero CLIP spectra normalise to zeros, so W = Σ|normalised λ_v| = 1
    assert torch.allclose(got, torch.zeros_like(got), atol=1e-12)
    assert torch.isfinite(spectral_cost(sc, sc)).all()


# ------------------------------------------------------------------------------------- range match


def test_range_match_per_item_over_heads_tokens_channels() -> None:
    x = _keys(2, 3, 5, 4, seed=8) * 3 + 1
    ref = _keys(2, 3, 7, 4, seed=9)
    got = range_match(x, ref, dims=(1, 2, 3))
    for b in range(2):
        xb, rb = x[b].numpy(), ref[b].numpy()
        expect = (xb - xb.min()) / (xb.max() - xb.min()) * (rb.max() - rb.min()) + rb.min()
        assert np.allclose(got[b].numpy(), expect, atol=1e-12)
        assert abs(got[b].min().item() - rb.min()) < 1e-12 and abs(got[b].max().item() - rb.max()) < 1e-12


def test_range_match_per_head_graphs_negative_dims() -> None:
    x = _keys(2, 3, 6, 6, seed=10)
    ref = _keys(2, 3, 6, 6, seed=11)
    got = range_match(x, ref, dims=(-2, -1))
    assert torch.allclose(got.amin((-2, -1)), ref.amin((-2, -1)), atol=1e-12)
    assert torch.allclose(got.amax((-2, -1)), ref.amax((-2, -1)), atol=1e-12)


def test_range_match_degenerate_no_nan() -> None:
    x = torch.full((2, 4, 4), 3.0)
    ref = _keys(2, 4, 4, seed=12, dtype=torch.float32)
    got = range_match(x, ref, dims=(-2, -1))
    # documented guard: unscaled (factor 1), shifted so min x lands on min ref
    assert torch.allclose(got, ref.amin((-2, -1), keepdim=True).expand_as(got))
    got0 = range_match(torch.zeros(3, 3), torch.zeros(3, 3), dims=(0, 1))
    assert torch.equal(got0, torch.zeros(3, 3))
    const_ref = range_match(ref, torch.ones(2, 4, 4), dims=(-2, -1))
    assert torch.equal(const_ref, torch.ones(2, 4, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_range_match_half(dtype: torch.dtype) -> None:
    x = (_keys(3, 8, seed=13) * 1000).to(dtype)
    ref = (_keys(3, 8, seed=14) * 10000).to(dtype)
    got = range_match(x, ref, dims=(0, 1))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert abs(got.float().max().item() - ref.float().max().item()) <= 64


# ---------------------------------------------------------------------------------------- low rank


@pytest.mark.parametrize("r", [1, 4, 10])
def test_exact_low_rank_from_graph_matches_svd(r: int) -> None:
    k = _keys(2, 3, 24, 16, seed=15)
    a = SCALE * k @ k.transpose(-1, -2)
    u, s, v, ranks = low_rank(a, r, "exact")
    assert u.shape == (2, 3, 24, r) and s.shape == (2, 3, r) and torch.equal(ranks, torch.full((2, 3), r))
    ref_s = torch.linalg.svdvals(a)[..., :r]
    assert torch.allclose(s, ref_s, atol=1e-10)
    d = u @ torch.diag_embed(s) @ v.transpose(-1, -2)
    assert torch.allclose(d, _ref_low_rank(a, r), atol=1e-9)


def test_exact_low_rank_from_keys_matches_svd_of_graph() -> None:
    k = _keys(2, 3, 40, 12, seed=16)
    a = SCALE * k @ k.transpose(-1, -2)
    u, s, v, ranks = low_rank(None, 10, "exact", keys=k, scale=SCALE)
    assert torch.allclose(s, torch.linalg.svdvals(a)[..., :10], atol=1e-10)
    assert torch.allclose(u @ torch.diag_embed(s) @ v.transpose(-1, -2), _ref_low_rank(a, 10), atol=1e-9)
    # the graph argument (if given) does not change the keys path
    u2, s2, _, _ = low_rank(a, 10, "exact", keys=k, scale=SCALE)
    assert torch.allclose(s2, s)


def test_exact_low_rank_pads_when_head_dim_below_rank() -> None:
    k = _keys(3, 20, 4, seed=17)  # rank 4 < 10
    a = SCALE * k @ k.transpose(-1, -2)
    u, s, v, ranks = low_rank(None, 10, "exact", keys=k, scale=SCALE)
    assert torch.equal(ranks, torch.full((3,), 4))
    assert torch.all(s[..., 4:] == 0) and torch.all(u[..., 4:] == 0)
    assert torch.allclose(u @ torch.diag_embed(s) @ v.transpose(-1, -2), a, atol=1e-10)


def test_randomized_low_rank_reproducible_and_rng_untouched() -> None:
    a = _graph_with_spectrum([float(30 - i) for i in range(30)], 30, seed=18)
    state = torch.get_rng_state()
    r1 = low_rank(a, 10, "randomized", seed=3)
    r2 = low_rank(a, 10, "randomized", seed=3)
    r3 = low_rank(a, 10, "randomized", seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(r1.U, r2.U) and torch.equal(r1.S, r2.S) and torch.equal(r1.V, r2.V)
    assert not torch.equal(r1.S, r3.S)  # slow spectral decay: the sketch depends on the seed


def test_randomized_low_rank_exact_when_graph_rank_at_most_q() -> None:
    k = _keys(2, 4, 36, 6, seed=19)  # graphs of rank 6 ≤ q = 10
    a = SCALE * k @ k.transpose(-1, -2)
    u, s, v, ranks = low_rank(a, 10, "randomized", q=10, niter=2)
    assert torch.equal(ranks, torch.full((2, 4), 10))
    d = u @ torch.diag_embed(s) @ v.transpose(-1, -2)
    assert torch.allclose(d, a, atol=1e-9)
    u6, s6, v6, _ = low_rank(a, 6, "randomized")
    assert torch.allclose(s6, torch.linalg.svdvals(a)[..., :6], atol=1e-9)


def test_randomized_rejects_rank_above_q() -> None:
    with pytest.raises(ValueError, match="rank"):
        low_rank(torch.eye(12), 11, "randomized", q=10)


def test_energy_rank_algorithm1_hand_built() -> None:
    # top q0=10: [6, 2, 1, 0.6, 0.2, 0.2, 0, 0, 0, 0], total 10.
    vals = [6.0, 2.0, 1.0, 0.6, 0.2, 0.2]
    a = _graph_with_spectrum(vals, 16, seed=20)
    # η = 0.95 -> 9.5: cumsum 6, 8, 9, 9.6 -> k = 4;  η = 0.85 -> 8.5 -> k = 3;  η = 0.5 -> k = 1.
    # (η = 1 would be decided by the ±1e-16 eigenvalues of the null space; 0.999 -> 9.99 -> k = 6.)
    for eta, k in [(0.95, 4), (0.85, 3), (0.5, 1), (0.999, 6)]:
        u, s, v, ranks = low_rank(a, None, "energy", eta=eta, q0=10)
        assert ranks.item() == k, (eta, ranks)
        assert s.shape == (10,)
        assert torch.allclose(s[:k], torch.tensor(vals[:k], dtype=torch.float64), atol=1e-12)
        assert torch.all(s[k:] == 0) and torch.all(u[:, k:] == 0) and torch.all(v[:, k:] == 0)
        assert torch.allclose(u @ torch.diag(s) @ v.T, _ref_low_rank(a, k), atol=1e-10)


def test_eigengap_rank_hand_built() -> None:
    vals = [10.0, 9.0, 8.0, 3.0, 2.5, 2.0, 1.0]  # gaps 1, 1, 5, 0.5, 0.5, 1 -> k = 3
    a = _graph_with_spectrum(vals, 12, seed=21)
    assert low_rank(a, None, "eigengap", q0=10).ranks.item() == 3
    # ties go to the smallest k: gaps 2, 2 -> k = 1
    b = _graph_with_spectrum([4.0, 2.0, 0.0], 6, seed=22)
    assert low_rank(b, None, "eigengap", q0=3).ranks.item() == 1


def test_adaptive_ranks_differ_per_head_and_rank_caps() -> None:
    a = torch.stack([
        _graph_with_spectrum([6.0, 2.0, 1.0, 0.6, 0.2, 0.2], 16, seed=23),  # energy(0.95) k = 4
        _graph_with_spectrum([9.0, 0.8, 0.2], 16, seed=24),                 # energy(0.95) k = 2
    ])
    lr = low_rank(a, None, "energy", eta=0.95)
    assert lr.ranks.tolist() == [4, 2]
    assert torch.allclose(low_rank_graph(lr.U, lr.S, lr.V)[1], _ref_low_rank(a[1], 2), atol=1e-10)
    assert low_rank(a, 3, "energy", eta=0.95).ranks.tolist() == [3, 2]
    # keys basis and the randomized basis agree on these exactly low-rank graphs
    assert low_rank(a, None, "energy", eta=0.95, basis="randomized").ranks.tolist() == [4, 2]


def test_low_rank_validation() -> None:
    a = torch.eye(5)
    with pytest.raises(ValueError, match="unknown low-rank method"):
        low_rank(a, 2, "magic")
    with pytest.raises(ValueError, match="eta"):
        low_rank(a, None, "energy", eta=1.5)
    with pytest.raises(ValueError, match="scale"):
        low_rank(None, 2, "exact", keys=torch.ones(5, 2))
    with pytest.raises(ValueError, match="basis"):
        low_rank(a, None, "energy", basis="nope")


@pytest.mark.parametrize("method", ["randomized", "exact", "energy", "eigengap"])
@pytest.mark.parametrize("fill", [0.0, 2.0])
def test_low_rank_degenerate_graphs_no_nan(method: str, fill: float) -> None:
    a = torch.full((2, 3, 12, 12), fill)
    out = low_rank(a, None, method)
    for t in (out.U, out.S, out.V):
        assert torch.isfinite(t).all()
    assert torch.allclose(low_rank_graph(out.U, out.S, out.V), a, atol=1e-5)  # constant graphs have rank ≤ 1
    d = low_rank_graph(out.U, eigenscale(out.S, mask=rank_mask(out.ranks, out.S.shape[-1])), out.V)
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["randomized", "exact", "energy"])
def test_low_rank_half_inputs(dtype: torch.dtype, method: str) -> None:
    k = _keys(2, 20, 4, seed=25, dtype=dtype)
    a = attention_graph(k, SCALE)
    out = low_rank(a, None, method)
    assert out.U.dtype == dtype and out.S.dtype == dtype and out.ranks.dtype == torch.long
    d = low_rank_graph(out.U.double(), out.S.double(), out.V.double())
    assert torch.allclose(d, a.double(), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------ eigenscaling


def test_eigenscale_literal_formula() -> None:
    s = np.array([9.0, 5.0, 2.5, 1.0])
    got = eigenscale(torch.tensor(s), 1.5).numpy()
    assert np.allclose(got, _ref_phi(s, 1.5), atol=1e-14)
    # endpoints: σmin -> (2−ε)σmin, σmax -> ε·σmax
    assert abs(got[-1] - 0.5) < 1e-14 and abs(got[0] - 13.5) < 1e-14
    got2 = eigenscale(torch.tensor(s), 1.2).numpy()
    assert np.allclose(got2, _ref_phi(s, 1.2), atol=1e-14)


def test_eigenscale_uses_retained_values_only() -> None:
    s = torch.tensor([[8.0, 4.0, 2.0, 0.0, 0.0], [5.0, 1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    ranks = torch.tensor([3, 2])
    got = eigenscale(s, mask=rank_mask(ranks, 5))
    assert np.allclose(got[0, :3].numpy(), _ref_phi(np.array([8.0, 4.0, 2.0])), atol=1e-14)
    assert np.allclose(got[1, :2].numpy(), _ref_phi(np.array([5.0, 1.0])), atol=1e-14)
    assert torch.all(got[:, 3:] == 0) and got[1, 2] == 0
    # without the mask the padded zeros would have been σmin
    assert not torch.allclose(eigenscale(s)[0, :3], got[0, :3])


def test_eigenscale_degenerate_and_half() -> None:
    c = torch.full((2, 4), 3.0)
    assert torch.equal(eigenscale(c), c)
    z = torch.zeros(3)
    assert torch.equal(eigenscale(z), z)
    one = torch.tensor([[7.0, 0.0, 0.0]])
    assert torch.equal(eigenscale(one, mask=rank_mask(torch.tensor([1]), 3)), one)
    empty = eigenscale(one, mask=torch.zeros(1, 3, dtype=torch.bool))
    assert torch.equal(empty, one)
    h = torch.tensor([40000.0, 20000.0, 100.0], dtype=torch.float16)
    got = eigenscale(h)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert np.allclose(got.double().numpy(), _ref_phi(h.double().numpy()), rtol=1e-3)


# ---------------------------------------------------------------------------- graph ops and fusion


def test_low_rank_graph_and_zero_diagonal() -> None:
    u = _keys(2, 5, 3, seed=26)
    v = _keys(2, 5, 3, seed=27)
    s = _keys(2, 3, seed=28)
    got = low_rank_graph(u, s, v)
    ref = torch.einsum("bpr,br,bqr->bpq", u, s, v)
    assert torch.allclose(got, ref, atol=1e-13)
    z = zero_diagonal(got)
    assert torch.all(torch.diagonal(z, dim1=-2, dim2=-1) == 0)
    off = ~torch.eye(5, dtype=torch.bool)
    assert torch.equal(z[:, off], got[:, off])


def test_fuse_graphs_literal_per_head_weights() -> None:
    d = _keys(2, 3, 4, 4, seed=29)
    a = _keys(2, 3, 4, 4, seed=30)
    w = torch.tensor([0.2, 0.5, 1.3], dtype=torch.float64)
    got = fuse_graphs(d, a, w, 10.0)
    for h in range(3):
        ref = (10.0 * w[h] * d[:, h] + a[:, h]) / (10.0 * w[h] + 1)
        assert torch.allclose(got[:, h], ref, atol=1e-14)
    wb = torch.tensor([[0.2, 0.5, 1.3], [0.0, 1.0, 2.0]], dtype=torch.float64)
    got_b = fuse_graphs(d, a, wb, 1.0)
    assert torch.allclose(got_b[1, 0], a[1, 0]) and torch.allclose(got_b[1, 2], (2 * d[1, 2] + a[1, 2]) / 3)


def test_fuse_graphs_half_no_overflow() -> None:
    d = torch.full((1, 2, 3, 3), 60000.0, dtype=torch.float16)
    a = torch.full((1, 2, 3, 3), 60000.0, dtype=torch.float16)
    got = fuse_graphs(d, a, torch.tensor([1.5, 2.0]), 10.0)  # λ·w·D alone overflows fp16
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert torch.allclose(got.float(), torch.full((1, 2, 3, 3), 60000.0), rtol=1e-3)


def test_gather_heads_shared_and_per_item_assignment() -> None:
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    got = gather_heads(x, torch.tensor([2, 2, 0, 1]))
    assert got.shape == (2, 4, 2, 2)
    assert torch.equal(got[1, 0], x[1, 2]) and torch.equal(got[0, 2], x[0, 0])
    per_item = torch.tensor([[0, 1, 2], [2, 1, 0]])
    got = gather_heads(x, per_item)
    assert torch.equal(got[1, 0], x[1, 2]) and torch.equal(got[0, 0], x[0, 0])


# ---------------------------------------------------------------------------------------- distill


def _ref_distill(vfm: torch.Tensor, clip: torch.Tensor, w: torch.Tensor, lam: float, r: int | None,
                 eig: bool) -> torch.Tensor:
    """Spec §2 steps 8-11 per (item, head), float64, written from the spec with torch.linalg.svd."""
    vfm, clip = vfm.double(), clip.double()
    out = torch.empty_like(clip)
    for b in range(clip.shape[0]):
        for h in range(clip.shape[1]):
            g = vfm[b, h]
            if r is None:
                dmat = g.clone()
            else:
                u, s, vh = torch.linalg.svd(g)
                s = s[:r]
                if eig:
                    s = torch.tensor(_ref_phi(s.numpy()))
                dmat = u[:, :r] @ torch.diag(s) @ vh[:r]
            dmat.fill_diagonal_(0)
            c = clip[b, h]
            dmat = (dmat - dmat.min()) / (dmat.max() - dmat.min()) * (c.max() - c.min()) + c.min()
            wh = float(w[h])
            out[b, h] = (lam * wh * dmat + c) / (lam * wh + 1)
    return out


@pytest.mark.parametrize("eig", [True, False])
def test_distill_exact_matches_reference(eig: bool) -> None:
    kv = _keys(2, 3, 25, 16, seed=31)
    kc = _keys(2, 3, 25, 16, seed=32)
    av, ac = SCALE * kv @ kv.transpose(-1, -2), SCALE * kc @ kc.transpose(-1, -2)
    w = torch.tensor([0.3, 0.9, 0.1], dtype=torch.float64)
    ref = _ref_distill(av, ac, w, 10.0, 10, eig)
    got, ranks = distill_and_fuse(av, ac, w, 10.0, lowrank="exact", rank=10, eigenscaling=eig)
    assert torch.equal(ranks, torch.full((2, 3), 10))
    assert torch.allclose(got, ref, atol=1e-9)
    got_k, _ = distill_and_fuse(None, ac, w, 10.0, vfm_keys=kv, scale=SCALE, lowrank="exact", rank=10,
                                 eigenscaling=eig)
    assert torch.allclose(got_k, ref, atol=1e-9)


def test_distill_full_graph_and_assignment() -> None:
    kv = _keys(1, 3, 16, 8, seed=33)
    kc = _keys(1, 3, 16, 8, seed=34)
    av, ac = SCALE * kv @ kv.transpose(-1, -2), SCALE * kc @ kc.transpose(-1, -2)
    w = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64)
    assignment = torch.tensor([2, 0, 0])
    ref = _ref_distill(av[:, [2, 0, 0]], ac, w, 1.0, None, False)
    got, ranks = distill_and_fuse(av, ac, w, 1.0, assignment=assignment, lowrank=None, eigenscaling=False)
    assert ranks is None and torch.allclose(got, ref, atol=1e-12)
    with pytest.raises(ValueError, match="eigenscaling"):
        distill_and_fuse(av, ac, w, 1.0, lowrank=None, eigenscaling=True)


def test_distill_randomized_close_to_exact_for_low_rank_graphs() -> None:
    kv = _keys(2, 3, 30, 6, seed=35)  # rank 6 ≤ q
    kc = _keys(2, 3, 30, 16, seed=36)
    av, ac = SCALE * kv @ kv.transpose(-1, -2), SCALE * kc @ kc.transpose(-1, -2)
    w = torch.tensor([0.3, 0.9, 0.1], dtype=torch.float64)
    ref = _ref_distill(av, ac, w, 10.0, 6, True)
    got, _ = distill_and_fuse(av, ac, w, 10.0, lowrank="randomized", rank=6, eigenscaling=True)
    assert torch.allclose(got, ref, atol=1e-8)


@pytest.mark.parametrize("lowrank", ["randomized", "exact", "energy", "eigengap", None])
def test_distill_degenerate_inputs_no_nan(lowrank: str | None) -> None:
    zeros = torch.zeros(1, 2, 9, 9)
    const = torch.full((1, 2, 9, 9), 4.0)
    w = torch.tensor([0.5, 1.0])
    for vfm, clip in [(zeros, zeros), (const, zeros), (zeros, const), (const, const)]:
        got, _ = distill_and_fuse(vfm, clip, w, 10.0, lowrank=lowrank, eigenscaling=lowrank is not None)
        assert torch.isfinite(got).all()
    got, _ = distill_and_fuse(None, const, w, 10.0, vfm_keys=torch.zeros(1, 2, 9, 4), scale=SCALE,
                               lowrank=lowrank, eigenscaling=lowrank is not None)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_distill_half_precision(dtype: torch.dtype) -> None:
    kv = _keys(1, 2, 16, 8, seed=37)
    kc = _keys(1, 2, 16, 8, seed=38)
    av, ac = SCALE * kv @ kv.transpose(-1, -2), SCALE * kc @ kc.transpose(-1, -2)
    w = torch.tensor([0.4, 0.8])
    got, _ = distill_and_fuse(av.to(dtype), ac.to(dtype), w, 10.0, lowrank="exact")
    assert got.dtype == dtype and torch.isfinite(got).all()
    ref = _ref_distill(av.to(dtype), ac.to(dtype), w, 10.0, 10, True)
    assert torch.allclose(got.double(), ref, atol=5e-2, rtol=1e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_randomized_low_rank_cuda_seeded_and_close_to_cpu_exact() -> None:
    k = _keys(2, 3, 40, 6, seed=39)  # rank 6 ≤ q: the randomized result is exact up to rounding
    a = SCALE * k @ k.transpose(-1, -2)
    ac = a.cuda().to(torch.float16)
    state = torch.cuda.get_rng_state()
    r1 = low_rank(ac, 10, "randomized", seed=5)
    r2 = low_rank(ac, 10, "randomized", seed=5)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    assert torch.equal(r1.U, r2.U) and torch.equal(r1.S, r2.S)
    d = low_rank_graph(r1.U.double(), r1.S.double(), r1.V.double()).cpu()
    assert torch.allclose(d, ac.double().cpu(), atol=2e-2)
    fused, _ = distill_and_fuse(ac, ac, torch.tensor([0.5, 1.0, 2.0], device="cuda"), 10.0)
    assert fused.dtype == torch.float16 and fused.is_cuda and torch.isfinite(fused).all()
