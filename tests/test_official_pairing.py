"""End-to-end head pairing of ``cass-official`` on constructed spectra, and per-window assignments.

The spectra of the random tiny models are near-identical (ties, docs/matching.md), so the first test replaces
``key_spectrum`` by constructed spectra with a unique, asymmetric optimum and checks the fused heads and weights
against the authors' rule written here from the description in docs/matching.md: with
``row_ind, col_ind = linear_sum_assignment(C)`` (rows VFM), CLIP head i is fused with VFM head ``col_ind[i]``,
weighted by ``W = 1 − C[i, col_ind[i]]``.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import cass_plugins as cp
from cass_plugins.cass import spectral
from conftest import make_tiny_clip, make_tiny_vfm

H = 4  # heads of the tiny CLIP and VFM


def _cost64(spec_v: np.ndarray, spec_c: np.ndarray) -> np.ndarray:
    """C[i, j] = 1 − Σ|sort(λ_v[i]) − sort(λ_c[j])| after L2 then L1 normalisation (float64, from the formula)."""
    def norm(s: np.ndarray) -> np.ndarray:
        s = s / np.linalg.norm(s, axis=-1, keepdims=True)
        return s / np.abs(s).sum(axis=-1, keepdims=True)

    v, c = -np.sort(-norm(spec_v), axis=-1), -np.sort(-norm(spec_c), axis=-1)
    return 1.0 - np.abs(v[:, None, :] - c[None, :, :]).sum(-1)


def _constructed_spectra(seed: int, m: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectra (VFM, CLIP) whose cost has a unique optimum by ≥ 1e-2 and a pairing that is not its own inverse."""
    rng = np.random.default_rng(seed)
    while True:
        decay_v, decay_c = rng.uniform(0.05, 1.5, size=(H, 1)), rng.uniform(0.05, 1.5, size=(H, 1))
        spec_v = np.exp(-decay_v * np.arange(m)) * rng.uniform(0.5, 2.0, size=(H, 1))
        spec_c = np.exp(-decay_c * np.arange(m)) * rng.uniform(0.5, 2.0, size=(H, 1))
        cost = _cost64(spec_v, spec_c)
        totals = sorted((sum(cost[p[j], j] for j in range(H)), p) for p in itertools.permutations(range(H)))
        pairs = np.array(totals[0][1])
        involution = np.array_equal(pairs[pairs], np.arange(H))
        if totals[1][0] - totals[0][0] > 1e-2 and not involution:
            return spec_v, spec_c, cost


@pytest.fixture
def constructed(monkeypatch: pytest.MonkeyPatch):
    """Replace the key spectra: CLIP's are computed first in every distillation, then the VFM's."""
    per_image = [_constructed_spectra(seed) for seed in (0, 1)]
    calls = {"n": 0}

    def fake_key_spectrum(keys: torch.Tensor, scale: float, m: int = 20) -> torch.Tensor:
        which = 1 if calls["n"] % 2 == 0 else 0  # CLIP (index 1 of the tuple) first, then VFM
        calls["n"] += 1
        assert keys.shape[1] == H
        return torch.stack([torch.from_numpy(spec[which][:, :m]) for spec in per_image[: keys.shape[0]]])

    monkeypatch.setattr(spectral, "key_spectrum", fake_key_spectrum)
    return per_image


def test_cass_official_fuses_the_authors_heads_on_a_unique_optimum(constructed) -> None:
    model, vfm = make_tiny_clip(), make_tiny_vfm()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), cp.patch_clip(model, vfm, "cass-official") as handle:
        default = cp.encode_dense(model, x).features
        matchings = handle.last_matching
    for m, (_, _, cost) in zip(matchings, constructed):
        row_ind, col_ind = linear_sum_assignment(cost)
        assert row_ind.tolist() == list(range(H))
        assert m.assignment.tolist() == col_ind.tolist()  # CLIP head i <- VFM head col_ind[i]
        expected_w = [1.0 - cost[i, col_ind[i]] for i in range(H)]
        np.testing.assert_allclose(m.weights.numpy(), expected_w, atol=1e-6)
        assert m.margin > 1e-3
    # the reported heads are the fused ones: forcing them reproduces the output bit for bit ...
    fused = [m.assignment.tolist() for m in matchings]
    with torch.no_grad(), cp.patch_clip(model, vfm, "cass-official", matching=fused):
        forced = cp.encode_dense(model, x).features
    assert torch.equal(forced, default)
    # ... while fusing the true Hungarian pairs instead changes it
    true_pairs = [m.pairs.tolist() for m in matchings]
    assert true_pairs != fused
    with torch.no_grad(), cp.patch_clip(model, vfm, "cass-official", matching=true_pairs):
        other = cp.encode_dense(model, x).features
    assert not torch.allclose(other, default)


def test_cass_paper_fuses_the_true_pairs(constructed) -> None:
    model, vfm = make_tiny_clip(), make_tiny_vfm()
    with torch.no_grad(), cp.patch_clip(model, vfm, "cass-paper") as handle:
        cp.encode_dense(model, torch.randn(2, 3, 64, 64))
        matchings = handle.last_matching
    for m, (_, _, cost) in zip(matchings, constructed):
        _, col_ind = linear_sum_assignment(cost)
        pairs = np.empty(H, dtype=np.int64)
        pairs[col_ind] = np.arange(H)  # VFM row paired with each CLIP column
        assert m.assignment.tolist() == pairs.tolist()
        np.testing.assert_allclose(m.weights.numpy(), [1.0 - cost[pairs[i], i] for i in range(H)], atol=1e-6)


# ------------------------------------------------------------------------------------------ per-window matchings
ASSIGNMENTS = [[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2]]


def test_matching_list_per_window(tiny_clip, tiny_vfm) -> None:
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad(), cp.patch_clip(tiny_clip, tiny_vfm, matching=ASSIGNMENTS, lowrank="exact") as handle:
        batched = cp.encode_dense(tiny_clip, x).features
        assert [m.assignment.tolist() for m in handle.last_matching] == ASSIGNMENTS
        assert [m.window for m in handle.last_matching] == [0, 1, 2]
        with pytest.raises(ValueError, match="assignments for 3 windows but window 3"):
            cp.encode_dense(tiny_clip, x[:1])
        handle.reset_windows()
        cp.encode_dense(tiny_clip, x[:1])
        assert handle.last_matching[0].window == 0
    # window 1 alone with its assignment given for every window gives the same features
    with torch.no_grad(), cp.patch_clip(tiny_clip, tiny_vfm, matching=ASSIGNMENTS[1], lowrank="exact"):
        single = cp.encode_dense(tiny_clip, x[1:2]).features
    torch.testing.assert_close(batched[1:2], single, rtol=0, atol=1e-6)


def test_matching_callable_sees_cost_and_window(tiny_clip, tiny_vfm) -> None:
    seen: list[tuple[int, torch.Tensor]] = []

    def choose(cost: torch.Tensor, window: int):
        seen.append((window, cost))
        return "sequential" if window == 0 else ASSIGNMENTS[window]

    with torch.no_grad(), cp.patch_clip(tiny_clip, tiny_vfm, matching=choose) as handle:
        cp.encode_dense(tiny_clip, torch.randn(2, 3, 64, 64))
        cp.encode_dense(tiny_clip, torch.randn(1, 3, 64, 64))
        last = handle.last_matching
    assert [w for w, _ in seen] == [0, 1, 2]
    assert last[0].assignment.tolist() == ASSIGNMENTS[2] and last[0].window == 2
    torch.testing.assert_close(seen[2][1].float(), last[0].cost.float())

    with torch.no_grad(), cp.patch_clip(tiny_clip, tiny_vfm, matching=lambda cost, w: 3.5):
        with pytest.raises(TypeError, match="returned 3.5 for window 0"):
            cp.encode_dense(tiny_clip, torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("bad", ["greedy", [[0, 1, 2, 3], "x"], [], [[0, 1], [True, 0]]])
def test_bad_matching_values_refused_at_patch_time(tiny_clip, tiny_vfm, bad) -> None:
    with pytest.raises(ValueError, match="matching="):
        cp.patch_clip(tiny_clip, tiny_vfm, matching=bad)
    assert cp.get_patch(tiny_clip) is None


def test_segmenter_records_every_window_and_the_clusters(tiny_clip, tiny_vfm) -> None:
    from cass_plugins.pipeline.windows import window_grid

    image = (torch.rand(3, 80, 160) * 255).to(torch.uint8)
    kw = dict(short_side=64, crop=64, stride=32, window_batch=2, lowrank="exact")
    windows = window_grid(64, 128, 64, 32)
    per_window = [ASSIGNMENTS[i % 3] for i in range(len(windows))]
    with cp.Segmenter(tiny_clip, tiny_vfm, matching=per_window, **kw) as seg:
        result = seg.segment(image, "cat; dog, puppy; sky")
        again = seg.segment(image, "cat; dog, puppy; sky")  # windows counted from 0 again for every image
    assert len(windows) == 3 and result.record["windows"] == windows
    assert [m.assignment.tolist() for m in result.record["matching"]] == per_window
    assert [m.window for m in result.record["matching"]] == [0, 1, 2]
    assert torch.equal(again.logits, result.logits)
    clusters = result.record["ota_clusters"]
    assert sorted(q for group in clusters for q in group) == ["cat", "dog", "puppy", "sky"]
