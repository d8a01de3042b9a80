"""cass_plugins.cass.matching against hand-worked costs and brute-force enumeration (cass.md §2.7, §6, §9, §10)."""
from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch

from cass_plugins.cass.matching import HeadMatching, match_heads

# Unique optimum, hand-enumerated (assignment = VFM row per CLIP column, total):
# (0,1,2) 1+2+3=6 | (1,0,2) 4+5+3=12 | (2,1,0) 8+2+6=16 | (0,2,1) 1+9+7=17 | (1,2,0) 4+9+6=19 | (2,0,1) 8+5+7=20
C3 = torch.tensor([[1.0, 5.0, 6.0], [4.0, 2.0, 7.0], [8.0, 9.0, 3.0]])


def _additive(hv: int, hc: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(hv, generator=g, dtype=torch.float64)
    b = torch.rand(hc, generator=g, dtype=torch.float64)
    return a[:, None] - b[None, :]


def _brute_force(cost: np.ndarray, capacity: int) -> list[tuple[float, tuple[int, ...]]]:
    """All assignments (VFM head per CLIP head) using each VFM head at most ``capacity`` times, by total."""
    hv, hc = cost.shape
    out = []
    for a in itertools.product(range(hv), repeat=hc):
        if max(a.count(v) for v in range(hv)) <= capacity:
            out.append((math.fsum(cost[a[j], j] for j in range(hc)), a))
    return sorted(out)


def test_unique_optimum_assignment_and_margin() -> None:
    m = match_heads(C3)
    assert isinstance(m, HeadMatching)
    assert m.assignment.tolist() == [0, 1, 2]
    assert m.assignment.dtype == torch.long
    assert m.margin == 6.0  # 12 − 6
    assert m.strategy == "complementary"


def test_orientation_rows_are_vfm_heads() -> None:
    # CLIP head 0's cheapest VFM head is 2, CLIP head 1's is 0, CLIP head 2's is 1.
    cost = torch.tensor([[9.0, 0.0, 9.0], [9.0, 9.0, 0.0], [0.0, 9.0, 9.0]])
    assert match_heads(cost).pairs.tolist() == [2, 0, 1]
    assert match_heads(cost, pairing="paper").assignment.tolist() == [2, 0, 1]


def test_similar_maximises_and_margin_sign() -> None:
    m = match_heads(C3, "similar")
    assert m.pairs.tolist() == [2, 0, 1]  # total 20
    assert m.assignment.tolist() == [1, 2, 0]  # official: the inverse is fused
    assert m.margin == 1.0  # 20 − 19 in the maximisation: ≥ 0 means optimal


def test_sequential_and_explicit_margin_under_complementary_objective() -> None:
    m = match_heads(C3, "sequential")
    assert m.assignment.tolist() == [0, 1, 2] and m.margin == 6.0
    e = match_heads(C3, [1, 0, 2])
    assert e.strategy == "explicit" and e.assignment.tolist() == [1, 0, 2]
    assert e.margin == -6.0  # 6 (best other) − 12 (chosen): not optimal
    # official: fused heads [2, 0, 1] are the solver pairing [1, 2, 0] read the authors' way; that pairing
    # sums C[1,0] + C[2,1] + C[0,2] = 4 + 9 + 6 = 19
    t = match_heads(C3, torch.tensor([2, 0, 1]))
    assert t.assignment.tolist() == [2, 0, 1] and t.pairs.tolist() == [1, 2, 0]
    assert t.margin == 6.0 - 19.0  # complementary objective
    p = match_heads(C3, torch.tensor([2, 0, 1]), pairing="paper")
    assert p.pairs.tolist() == [2, 0, 1] and p.margin == 6.0 - 20.0


@pytest.mark.parametrize(
    "bad,match",
    [([0, 1], "2 entries but there are 3 CLIP heads"), ([0, 1, 3], r"entry 2 is 3.*\[0, 2\]"),
     ([0, -1, 2], r"entry 1 is -1"), ([0, 1.0, 2], "expected an int"), ([True, 0, 1], "expected an int")],
)
def test_bad_explicit_assignment_rejected(bad: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        match_heads(C3, bad)


def test_bad_options_rejected() -> None:
    with pytest.raises(ValueError, match="unknown matching strategy"):
        match_heads(C3, "greedy")
    with pytest.raises(ValueError, match="tie_break"):
        match_heads(C3, tie_break="random")
    with pytest.raises(ValueError, match="pairing"):
        match_heads(C3, pairing="other")
    with pytest.raises(ValueError, match="NaN"):
        match_heads(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="matrix"):
        match_heads(torch.zeros(2, 2, 2))


def test_official_vs_paper_pairing_weights() -> None:
    # explicit assignment [1, 2, 0]: CLIP 0 <- VFM 1, CLIP 1 <- VFM 2, CLIP 2 <- VFM 0.
    off = match_heads(C3, [1, 2, 0], pairing="official")
    # official quirk: w[i] = 1 − C[i, a(i)]  -> 1−C[0,1], 1−C[1,2], 1−C[2,0]
    assert off.weights.tolist() == [1 - 5.0, 1 - 7.0, 1 - 8.0]
    pap = match_heads(C3, [1, 2, 0], pairing="paper")
    # paper: w[i] = 1 − C[a(i), i] (the fused pair) -> 1−C[1,0], 1−C[2,1], 1−C[0,2]
    assert pap.weights.tolist() == [1 - 4.0, 1 - 9.0, 1 - 6.0]
    assert pap.pairing == "paper" and off.pairing == "official"


def test_weights_use_original_cost_dtype() -> None:
    cost = _additive(4, 4, seed=1) + torch.eye(4, dtype=torch.float64) * 1e-9
    m = match_heads(cost, pairing="paper")
    assert m.cost.dtype == torch.float32 and m.weights.dtype == torch.float64
    ref = [1.0 - cost[m.assignment[i], i].item() for i in range(4)]
    assert m.weights.tolist() == ref
    assert match_heads(cost, solve_dtype=torch.float64).cost.dtype == torch.float64


def _run_additive(cost: torch.Tensor) -> list[int]:
    return match_heads(cost, solve_dtype=torch.float64).assignment.tolist()


def test_additive_cost_ties_deterministic_with_zero_margin() -> None:
    cost = _additive(6, 6, seed=2)
    first = match_heads(cost, solve_dtype=torch.float64)
    assert abs(first.margin) <= 1e-12
    assert all(_run_additive(cost) == first.assignment.tolist() for _ in range(5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_additive(cost)
        torch.set_num_threads(2)
        two = _run_additive(cost)
    finally:
        torch.set_num_threads(threads)
    assert one == two == first.assignment.tolist()


def test_additive_cost_float32_exact_dyadic_tie() -> None:
    a = torch.tensor([0.5, 0.25, 0.75, 0.125])
    b = torch.tensor([0.0625, 0.375, 0.5, 0.875])
    m = match_heads(a[:, None] - b[None, :])
    assert m.margin == 0.0


def test_tie_break_sequential_prefers_identity() -> None:
    a = torch.tensor([0.5, 0.25, 0.75, 0.125, 0.0])
    b = torch.tensor([0.0625, 0.375, 0.5, 0.875, 0.25])
    cost = a[:, None] - b[None, :]
    assert match_heads(cost, tie_break="sequential").assignment.tolist() == [0, 1, 2, 3, 4]
    assert match_heads(cost, "similar", tie_break="sequential").assignment.tolist() == [0, 1, 2, 3, 4]
    # the preference never overrides a real difference (≥ 1e-6): C3's optimum is the identity by value,
    # a permuted copy's is not.
    perm = C3[:, [2, 0, 1]]  # column j of perm is column (2,0,1)[j] of C3
    assert match_heads(perm, tie_break="sequential").pairs.tolist() == [2, 0, 1]
    near = torch.eye(3, dtype=torch.float64) * 2e-6  # identity costs 6e-6 more than any derangement
    assert match_heads(near, tie_break="sequential", solve_dtype=torch.float64).pairs.tolist() != [0, 1, 2]


@pytest.mark.parametrize("solve_dtype", [torch.float64, torch.float32])
def test_tie_break_sequential_identity_on_random_additive_costs(solve_dtype: torch.dtype) -> None:
    # §10: generic additive costs are tied only up to float rounding (not on any rounding grid).
    for seed in range(20):
        cost = _additive(12, 12, seed=100 + seed)
        m = match_heads(cost, tie_break="sequential", solve_dtype=solve_dtype, pairing="paper")
        assert m.assignment.tolist() == list(range(12)), seed
        assert abs(m.margin) < 1e-5


def test_tie_break_round_is_optimal_on_rounded_costs() -> None:
    g = torch.Generator().manual_seed(3)
    cost = torch.rand(5, 5, generator=g, dtype=torch.float64)
    m = match_heads(cost, tie_break="round", solve_dtype=torch.float64)
    rounded = np.round(cost.numpy() * 1e6)
    best = _brute_force(rounded, 1)[0][0]
    assert math.fsum(rounded[m.pairs[j], j] for j in range(5)) == best


@pytest.mark.parametrize("hv,hc", [(2, 5), (3, 4), (1, 3)])
def test_rectangular_fewer_vfm_heads_reuses_rows(hv: int, hc: int) -> None:
    g = torch.Generator().manual_seed(hv * 10 + hc)
    cost = torch.rand(hv, hc, generator=g, dtype=torch.float64)
    m = match_heads(cost, solve_dtype=torch.float64, pairing="paper")
    capacity = -(-hc // hv)
    ranked = _brute_force(cost.numpy(), capacity)
    assert tuple(m.assignment.tolist()) == ranked[0][1]
    if len(ranked) > 1:
        assert abs(m.margin - (ranked[1][0] - ranked[0][0])) < 1e-12
    else:
        assert m.margin == math.inf
    assert m.weights.tolist() == [1.0 - cost[m.assignment[i], i].item() for i in range(hc)]
    with pytest.raises(ValueError, match="pairing='paper'"):
        match_heads(cost)


def test_rectangular_more_vfm_heads() -> None:
    g = torch.Generator().manual_seed(7)
    cost = torch.rand(6, 3, generator=g, dtype=torch.float64)
    m = match_heads(cost, solve_dtype=torch.float64, pairing="paper")
    ranked = _brute_force(cost.numpy(), 1)
    assert tuple(m.assignment.tolist()) == ranked[0][1]
    assert abs(m.margin - (ranked[1][0] - ranked[0][0])) < 1e-12
    assert len(set(m.assignment.tolist())) == 3
    assert match_heads(cost, "sequential", pairing="paper").assignment.tolist() == [0, 1, 2]


def test_random_square_margin_matches_brute_force_second_best() -> None:
    g = torch.Generator().manual_seed(11)
    cost = torch.rand(5, 5, generator=g)
    m = match_heads(cost)  # solved on float32: reference on the float32 values in float64
    ranked = _brute_force(cost.to(torch.float64).numpy(), 1)
    assert tuple(m.pairs.tolist()) == ranked[0][1]
    assert abs(m.margin - (ranked[1][0] - ranked[0][0])) < 1e-12


def test_single_head_margin_inf() -> None:
    m = match_heads(torch.tensor([[0.3]]))
    assert m.assignment.tolist() == [0] and m.margin == math.inf
    assert m.weights.tolist() == pytest.approx([0.7])


def test_tie_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    cost = _additive(4, 4, seed=5)
    with caplog.at_level(logging.DEBUG, logger="cass_plugins.cass.matching"):
        match_heads(cost, solve_dtype=torch.float64)
    records = [r for r in caplog.records if r.name == "cass_plugins.cass.matching"]
    assert records and all(r.levelno == logging.DEBUG for r in records)
    assert "margin" in records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="cass_plugins.cass.matching"):
        match_heads(C3)
    assert not [r for r in caplog.records if r.name == "cass_plugins.cass.matching"]


# Asymmetric hand-worked costs whose optimal pairing is a cycle (not its own inverse), so the official reading
# (CLIP head i ← VFM head col_ind[i]) and the true pairing (VFM head i ↔ CLIP head col_ind[i]) fuse different heads.
# 3×3, rows VFM: the pairing VFM0↔CLIP2, VFM1↔CLIP0, VFM2↔CLIP1 costs 1 + 2 + 3 = 6; the runner-up, VFM0↔CLIP2,
# VFM1↔CLIP1, VFM2↔CLIP0, costs 1 + 6 + 7 = 14 (the other four permutations: 15, 15, 16, 24).
CYCLE3 = torch.tensor([[5.0, 9.0, 1.0], [2.0, 6.0, 8.0], [7.0, 3.0, 4.0]])
# 4×4: the pairing VFM0↔CLIP1, VFM1↔CLIP3, VFM2↔CLIP0, VFM3↔CLIP2 costs 1+2+3+4; every other entry is ≥ 10.
CYCLE4 = torch.tensor(
    [[11.0, 1.0, 12.0, 13.0], [14.0, 15.0, 16.0, 2.0], [3.0, 17.0, 18.0, 19.0], [20.0, 21.0, 4.0, 22.0]]
)


def test_official_pairing_3x3_fuses_the_inverse_with_row_weights() -> None:
    # linear_sum_assignment(CYCLE3) -> row_ind [0,1,2], col_ind [2,0,1].
    off = match_heads(CYCLE3, solve_dtype=torch.float64)
    assert off.pairs.tolist() == [1, 2, 0]  # CLIP0 paired with VFM1, CLIP1 with VFM2, CLIP2 with VFM0
    # official: CLIP head i ← VFM head col_ind[i] = [2, 0, 1], w[i] = 1 − C[i, col_ind[i]] = 1 − [1, 2, 3]
    assert off.assignment.tolist() == [2, 0, 1]
    assert off.weights.tolist() == [0.0, -1.0, -2.0]
    assert off.margin == 8.0  # 14 − 6
    # paper: the true pairs are fused, w of the fused pair: 1 − C[1,0], 1 − C[2,1], 1 − C[0,2]
    pap = match_heads(CYCLE3, solve_dtype=torch.float64, pairing="paper")
    assert pap.assignment.tolist() == [1, 2, 0] and pap.pairs.tolist() == [1, 2, 0]
    assert pap.weights.tolist() == [-1.0, -2.0, 0.0]
    assert pap.margin == 8.0


def test_official_pairing_4x4_fuses_the_inverse_with_row_weights() -> None:
    # linear_sum_assignment(CYCLE4) -> col_ind [1, 3, 0, 2]
    off = match_heads(CYCLE4)
    assert off.pairs.tolist() == [2, 0, 3, 1]
    assert off.assignment.tolist() == [1, 3, 0, 2]
    assert off.weights.tolist() == [0.0, -1.0, -2.0, -3.0]  # 1 − C[i, col_ind[i]] = 1 − [1, 2, 3, 4]
    pap = match_heads(CYCLE4, pairing="paper")
    assert pap.assignment.tolist() == [2, 0, 3, 1]
    assert pap.weights.tolist() == [-2.0, 0.0, -3.0, -1.0]  # 1 − C[2,0], 1 − C[0,1], 1 − C[3,2], 1 − C[1,3]


def test_official_explicit_assignment_round_trips() -> None:
    # Passing a run's fused heads back reproduces its heads, weights and margin.
    off = match_heads(CYCLE4)
    again = match_heads(CYCLE4, off.assignment.tolist())
    assert again.assignment.tolist() == off.assignment.tolist() and again.pairs.tolist() == off.pairs.tolist()
    assert again.weights.tolist() == off.weights.tolist() and again.margin == off.margin
    # a non-permutation has no pairing reading: fused as given, margin undefined
    many = match_heads(CYCLE4, [0, 0, 1, 1])
    assert many.pairs is None and math.isnan(many.margin)
    assert many.weights.tolist() == [1 - 11.0, 1 - 14.0, 1 - 17.0, 1 - 21.0]  # 1 − C[i, a[i]]
