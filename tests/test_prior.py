"""OPS (cass.md §3) against a float64 loop re-computation."""
from __future__ import annotations

import math

import pytest
import torch

from cass_plugins.cass.prior import PresencePriorHead


def _cos64(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(sum(x * y for x, y in zip(a.tolist(), b.tolist())) / (a.norm() * b.norm()))


def test_prior_matches_loop() -> None:
    torch.manual_seed(0)
    img, text = torch.randn(3, 16), torch.randn(5, 16)
    p = PresencePriorHead.prior(img, text)
    assert p.shape == (3, 5) and p.dtype == torch.float32
    ref = torch.tensor([[_cos64(img[b], text[c]) for c in range(5)] for b in range(3)], dtype=torch.float64)
    torch.testing.assert_close(p.double(), ref, atol=1e-6, rtol=0)
    # Scale invariance: a cosine, no temperature.
    torch.testing.assert_close(PresencePriorHead.prior(7 * img, 0.1 * text), p, atol=1e-6, rtol=0)
    assert PresencePriorHead.prior(img[0], text).shape == (1, 5)


@pytest.mark.parametrize("spatial", [(7,), (3, 4)])
def test_forward_matches_loop(spatial: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    gamma = 0.25
    logits = torch.randn(2, 4, *spatial, dtype=torch.float64)
    prior = torch.randn(2, 4, dtype=torch.float64)
    out = PresencePriorHead(gamma)(logits, prior)
    flat = logits.reshape(2, 4, -1)
    ref = torch.empty_like(flat)
    for b in range(2):
        for c in range(4):
            for i in range(flat.shape[-1]):
                ref[b, c, i] = (1 - gamma) * flat[b, c, i].item() + gamma * prior[b, c].item()
    torch.testing.assert_close(out, ref.reshape(logits.shape), atol=1e-15, rtol=0)
    # A (1, Q) prior broadcasts over windows.
    out1 = PresencePriorHead(gamma)(logits, prior[:1])
    torch.testing.assert_close(out1[1], (1 - gamma) * logits[1] + gamma * prior[0].reshape(4, *([1] * len(spatial))))


def test_gamma_zero_and_one() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float16)
    prior = torch.randn(2, 3)
    out = PresencePriorHead(0.0)(logits, prior)
    assert out is logits and torch.equal(out, logits)
    one = PresencePriorHead(1.0)(logits.float(), prior)
    assert torch.equal(one, prior[:, :, None, None].expand_as(one))
    half = PresencePriorHead(0.5)(logits, prior)
    assert half.dtype == torch.float16  # returned in the logits' dtype


def test_invalid() -> None:
    for g in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="gamma"):
            PresencePriorHead(g)
    head = PresencePriorHead(0.1)
    with pytest.raises(ValueError, match="prior"):
        head(torch.zeros(2, 3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="image_embedding"):
        head.prior(torch.zeros(2, 8), torch.zeros(3, 7))
    assert "gamma=0.1" in repr(head)
