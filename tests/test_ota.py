"""OTA (cass.md §4, §9): Ward clustering on hand-built geometries, adjustment vs a float64 loop reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cass_plugins.cass.ota import TextEmbeddingAdjuster


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def _reference_adjust(features: torch.Tensor, text: torch.Tensor, prior: torch.Tensor, clusters: list[int],
                      alpha: float, top_n: int) -> torch.Tensor:
    """The spec, literally, in float64 with Python loops."""
    features, text, prior = features.double(), text.double(), prior.double()
    bsz, n = features.shape[:2]
    out = text.unsqueeze(0).repeat(bsz, 1, 1)
    for b in range(bsz):
        f_norm = [_unit(features[b, i]) for i in range(n)]
        for cid in sorted(set(clusters)):
            members = [i for i, c in enumerate(clusters) if c == cid]
            best = members[0]
            for m in members[1:]:
                if prior[b, m].item() > prior[b, best].item():  # strict: ties keep the first index
                    best = m
            t = text[best]
            sims = [float(f @ _unit(t)) for f in f_norm]
            top = sorted(range(n), key=lambda i: -sims[i])[:top_n]
            mu = _unit(sum(f_norm[i] for i in top) / len(top))
            out[b, best] = _unit((1 - alpha) * t + alpha * mu)
    return out


def _gram_vectors(gram: np.ndarray, dim: int) -> torch.Tensor:
    """Unit vectors with the given pairwise cosines (Cholesky of the Gram matrix), zero-padded to ``dim``."""
    low = np.linalg.cholesky(gram)
    out = np.zeros((gram.shape[0], dim))
    out[:, : gram.shape[0]] = low
    return torch.from_numpy(out)


def _partition(ids: torch.Tensor) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, c in enumerate(ids.tolist()):
        groups.setdefault(c, set()).add(i)
    return {frozenset(g) for g in groups.values()}


# ---------------------------------------------------------------------------------------------- clustering
def test_near_duplicates_group_at_h_and_split_below() -> None:
    # motorcycle/bicycle at cosine distance 0.05; car, sky, person mutually orthogonal (distance 1).
    theta = math.acos(0.95)
    text = torch.zeros(5, 8, dtype=torch.float64)
    text[0, 0] = 1.0
    text[1, 0], text[1, 1] = math.cos(theta), math.sin(theta)
    text[2, 2] = text[3, 3] = text[4, 4] = 1.0
    # Two singletons merge at exactly their distance under Ward.
    ids = TextEmbeddingAdjuster(0.1, h_threshold=0.1).cluster(text)
    assert ids.dtype == torch.long and ids.shape == (5,)
    assert _partition(ids) == {frozenset({0, 1}), frozenset({2}), frozenset({3}), frozenset({4})}
    assert _partition(TextEmbeddingAdjuster(0.1, h_threshold=0.03).cluster(text)) == {frozenset({i}) for i in range(5)}
    assert _partition(TextEmbeddingAdjuster(0.1, h_threshold=0.04999).cluster(text.float())) == \
        {frozenset({i}) for i in range(5)}
    assert sorted(set(ids.tolist())) == [0, 1, 2, 3]  # 0-based ids


def test_ward_height_of_three_synonyms() -> None:
    # a, b at distance 0.02; c at 0.05 from both. Ward (Lance-Williams) joins c at
    # sqrt((2·0.05² + 2·0.05² − 0.02²)/3) = sqrt(0.0032) ≈ 0.0566, later than the 0.05 a single/average/
    # complete linkage would give. A fourth, far query stays alone.
    gram = np.array([[1, 0.98, 0.95, 0], [0.98, 1, 0.95, 0], [0.95, 0.95, 1, 0], [0, 0, 0, 1.0]])
    text = _gram_vectors(gram, 6).float()
    height = math.sqrt((2 * 0.05**2 + 2 * 0.05**2 - 0.02**2) / 3)
    assert abs(height - 0.05657) < 1e-5
    parts = {h: _partition(TextEmbeddingAdjuster(0.1, h).cluster(text)) for h in (0.015, 0.025, 0.055, 0.06)}
    assert parts[0.015] == {frozenset({0}), frozenset({1}), frozenset({2}), frozenset({3})}
    assert parts[0.025] == {frozenset({0, 1}), frozenset({2}), frozenset({3})}
    assert parts[0.055] == parts[0.025]
    assert parts[0.06] == {frozenset({0, 1, 2}), frozenset({3})}


def test_cluster_single_query_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    adj = TextEmbeddingAdjuster(0.1, 0.1)
    assert adj.cluster(torch.randn(1, 4)).tolist() == [0]
    import scipy.cluster.hierarchy as hierarchy

    calls = []
    real = hierarchy.linkage
    monkeypatch.setattr(hierarchy, "linkage", lambda *a, **k: calls.append(1) or real(*a, **k))
    text = torch.randn(6, 4)
    first = adj.cluster(text)
    second = adj.cluster(text.clone())  # same values: cached
    assert len(calls) == 1 and torch.equal(first, second)
    adj.cluster(text, key="voc")
    adj.cluster(torch.randn(6, 4), key="voc")  # caller-supplied key wins
    assert len(calls) == 2
    with pytest.raises(ValueError, match="Q >= 1"):
        adj.cluster(torch.zeros(0, 4))


# ---------------------------------------------------------------------------------------------- adjustment
@pytest.fixture
def window_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    torch.manual_seed(0)
    feats = torch.randn(3, 12, 8, dtype=torch.float64)
    text = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    prior = torch.randn(3, 6, dtype=torch.float64)
    clusters = [0, 2, 0, 1, 2, 3]  # two pairs and two singletons
    return feats, text, prior, clusters


@pytest.mark.parametrize("top_n", [1, 2, 5])
def test_adjust_matches_loop_reference(window_data, top_n: int) -> None:
    feats, text, prior, clusters = window_data
    adj = TextEmbeddingAdjuster(alpha=0.3, h_threshold=0.1, top_n=top_n)
    out = adj.adjust(feats, text, prior, torch.tensor(clusters))
    ref = _reference_adjust(feats, text, prior, clusters, 0.3, top_n)
    assert out.shape == (3, 6, 8) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    # float32 inputs and a (B, gh, gw, d) grid give the same numbers.
    out32 = adj.adjust(feats.float().reshape(3, 3, 4, 8), text.float(), prior.float(), torch.tensor(clusters))
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, atol=1e-5, rtol=0)


def test_unchanged_members_and_singletons(window_data) -> None:
    feats, text, prior, clusters = window_data
    adj = TextEmbeddingAdjuster(alpha=0.5, h_threshold=0.1)
    out = adj.adjust(feats, text, prior, torch.tensor(clusters))
    for b in range(3):
        changed = {q for q in range(6) if not torch.equal(out[b, q], text[q])}
        # exactly one query per cluster moves; the rest are bit-identical
        assert len(changed) == 4 and {clusters[q] for q in changed} == {0, 1, 2, 3}
        assert 3 in changed and 5 in changed  # the singletons
    # All singletons: every query is adjusted.
    every = adj.adjust(feats, text, prior, torch.arange(6))
    assert not any(torch.equal(every[b, q], text[q]) for b in range(3) for q in range(6))
    torch.testing.assert_close(every, _reference_adjust(feats, text, prior, list(range(6)), 0.5, 2), atol=1e-12,
                               rtol=0)
    # Arbitrary (non-contiguous) ids describe the same partition.
    remapped = adj.adjust(feats, text, prior, torch.tensor([7, 40, 7, -1, 40, 3]))
    torch.testing.assert_close(remapped, out, atol=0, rtol=0)


def test_argmax_ties_go_to_first_index(window_data) -> None:
    feats, text, _, _ = window_data
    prior = torch.zeros(3, 6, dtype=torch.float64)
    prior[:, 4] = 0.7
    prior[:, 1] = 0.7  # tie between members 1 and 4 of cluster {1, 4}
    adj = TextEmbeddingAdjuster(alpha=0.2, h_threshold=0.1)
    out = adj.adjust(feats, text, prior, torch.tensor([0, 1, 0, 2, 1, 3]))
    for b in range(3):
        assert not torch.equal(out[b, 1], text[1]) and torch.equal(out[b, 4], text[4])
        assert not torch.equal(out[b, 0], text[0]) and torch.equal(out[b, 2], text[2])  # all-zero tie
    torch.testing.assert_close(out, _reference_adjust(feats, text, prior, [0, 1, 0, 2, 1, 3], 0.2, 2),
                               atol=1e-12, rtol=0)
    # A cluster whose priors are all -inf still adjusts one of its own members (the first).
    prior[:, 3] = prior[:, 5] = -math.inf
    out = adj.adjust(feats, text, prior, torch.tensor([0, 1, 0, 2, 1, 2]))
    assert all(not torch.equal(out[b, 3], text[3]) and torch.equal(out[b, 5], text[5]) for b in range(3))


def test_alpha_zero_and_default_clusters(window_data) -> None:
    feats, text, prior, _ = window_data
    out = TextEmbeddingAdjuster(alpha=0.0, h_threshold=0.1).adjust(feats, text, prior, torch.tensor([0] * 6))
    assert all(torch.equal(out[b], text) for b in range(3))
    adj = TextEmbeddingAdjuster(alpha=0.1, h_threshold=0.5)
    implicit = adj.adjust(feats, text, prior, None)
    explicit = adj.adjust(feats, text, prior, adj.cluster(text))
    assert torch.equal(implicit, explicit)
    # A (1, Q) prior is shared by every window.
    shared = adj.adjust(feats, text, prior[:1], None)
    torch.testing.assert_close(shared[2], adj.adjust(feats[2:], text, prior[:1], None)[0], atol=0, rtol=0)


def test_invalid_arguments(window_data) -> None:
    feats, text, prior, _ = window_data
    for kwargs in ({"alpha": -0.1, "h_threshold": 0.1}, {"alpha": 0.1, "h_threshold": -1.0},
                   {"alpha": 0.1, "h_threshold": 0.1, "top_n": 0}):
        with pytest.raises(ValueError):
            TextEmbeddingAdjuster(**kwargs)
    adj = TextEmbeddingAdjuster(0.1, 0.1)
    with pytest.raises(ValueError, match="prior"):
        adj.adjust(feats, text, prior[:, :5], None)
    with pytest.raises(ValueError, match="one id per query"):
        adj.adjust(feats, text, prior, torch.tensor([0, 1]))


def test_logits_match_loop(window_data) -> None:
    feats, text, _, _ = window_data
    grid = feats.reshape(3, 3, 4, 8)
    out = TextEmbeddingAdjuster.logits(grid, 3.0 * text)
    assert out.shape == (3, 6, 3, 4)
    ref = torch.empty(3, 6, 12, dtype=torch.float64)
    for b in range(3):
        for q in range(6):
            for i in range(12):
                ref[b, q, i] = float(_unit(feats[b, i]) @ _unit(text[q]))
    torch.testing.assert_close(out.reshape(3, 6, 12), ref, atol=1e-12, rtol=0)
    # Per-window text (B, Q, d), as returned by adjust, on (B, N, d) features.
    per_window = torch.stack([text, -text, text.roll(1, 0)])
    out2 = TextEmbeddingAdjuster(0.1, 0.1).logits(feats, per_window)
    assert out2.shape == (3, 6, 12)
    torch.testing.assert_close(out2[1], -ref[1], atol=1e-12, rtol=0)
    torch.testing.assert_close(out2[2], ref[2].roll(1, 0), atol=1e-12, rtol=0)
