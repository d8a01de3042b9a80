"""PAMR against a slow per-pixel float64 reference written from baselines.md §4."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cass_plugins.pipeline.pamr as pamr_module
from cass_plugins.pipeline.pamr import PAMR, apply_pamr


def _offsets(d: int) -> list[tuple[int, int]]:
    # the spec's order: (−d,−d), (−d,0), (−d,+d), (0,−d), (0,+d), (+d,−d), (+d,0), (+d,+d)
    return [(dy, dx) for dy in (-d, 0, d) for dx in (-d, 0, d) if (dy, dx) != (0, 0)]


def _pamr_reference(image: np.ndarray, mask: np.ndarray, num_iter: int, dilations) -> np.ndarray:
    """Per-pixel loops; replicate padding = clamping the neighbour coordinate into the image."""
    B, K, H, W = image.shape
    P = 8 * len(dilations)
    aff = np.zeros((B, P, H, W))
    for b in range(B):
        for y in range(H):
            for x in range(W):
                def at(arr, dy, dx):
                    return arr[:, min(max(y + dy, 0), H - 1), min(max(x + dx, 0), W - 1)]

                samples, diffs = [], []
                for d in dilations:
                    samples.append(image[b, :, y, x])
                    for dy, dx in _offsets(d):
                        n = at(image[b], dy, dx)
                        samples.append(n)
                        diffs.append(np.abs(image[b, :, y, x] - n))
                sigma = np.std(np.stack(samples), axis=0, ddof=1)  # (K,), over 9·|D| values
                a = -np.stack(diffs) / (1e-8 + 0.1 * sigma)  # (P, K)
                a = a.mean(axis=1)
                e = np.exp(a - a.max())
                aff[b, :, y, x] = e / e.sum()
    m = mask.astype(np.float64).copy()
    for _ in range(num_iter):
        new = np.zeros_like(m)
        for b in range(B):
            for y in range(H):
                for x in range(W):
                    p = 0
                    for d in dilations:
                        for dy, dx in _offsets(d):
                            yy, xx = min(max(y + dy, 0), H - 1), min(max(x + dx, 0), W - 1)
                            new[b, :, y, x] += aff[b, p, y, x] * m[b, :, yy, xx]
                            p += 1
        m = new
    return m


@pytest.mark.parametrize("dilations", [(1, 2), (1, 13)])  # 13 > H, W: padding wider than the image
def test_matches_slow_reference(dilations):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 3, 12, 10))
    image[0, :, :6] += 3.0  # an edge, so the affinity is far from uniform
    mask = rng.normal(size=(2, 4, 12, 10))
    out = PAMR(num_iter=3, dilations=dilations)(torch.from_numpy(image), torch.from_numpy(mask))
    ref = _pamr_reference(image, mask, 3, dilations)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_float32_close_to_reference():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 3, 9, 11))
    mask = rng.normal(size=(1, 2, 9, 11))
    out = PAMR(num_iter=2, dilations=(1, 3))(torch.from_numpy(image).float(), torch.from_numpy(mask).half())
    assert out.dtype == torch.float16  # back to the mask's dtype
    ref = _pamr_reference(image.astype(np.float32).astype(np.float64), mask.astype(np.float16), 2, (1, 3))
    np.testing.assert_allclose(out.float().numpy(), ref, atol=5e-3)


def test_constant_mask_is_a_fixed_point():
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(1, 3, 20, 17, generator=gen, dtype=torch.float64)
    mask = torch.tensor([0.3, -1.2, 5.0], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 20, 17)
    out = PAMR(num_iter=5, dilations=(2, 4))(image, mask)
    torch.testing.assert_close(out, mask, rtol=0, atol=1e-12)


def test_constant_image_gives_uniform_neighbour_mean():
    # zero differences → zero affinity logits → uniform softmax: the mask becomes the plain mean of the 16 neighbours
    image = torch.ones(1, 3, 8, 8, dtype=torch.float64)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    mask[0, 0, 4, 4] = 16.0
    out = PAMR(num_iter=1, dilations=(1, 2))(image, mask)[0, 0]
    expected = torch.zeros(8, 8, dtype=torch.float64)
    for d in (1, 2):
        for dy, dx in _offsets(d):
            expected[4 - dy, 4 - dx] += 1.0  # pixel (4−dy, 4−dx) sees (4, 4) as its neighbour (dy, dx)
    torch.testing.assert_close(out, expected)


def test_affinity_sums_to_one():
    image = torch.randn(2, 3, 7, 9)
    aff = PAMR(dilations=(1, 2, 4)).affinity(image)
    assert aff.shape == (2, 24, 7, 9)
    torch.testing.assert_close(aff.sum(1), torch.ones(2, 7, 9))


def test_mask_resized_with_align_corners_true():
    image = torch.randn(1, 3, 9, 9)
    small = torch.randn(1, 2, 3, 3)
    out = PAMR(num_iter=0)(image, small)
    torch.testing.assert_close(out, F.interpolate(small, size=(9, 9), mode="bilinear", align_corners=True))


def test_apply_pamr_unbatched_and_zero_iterations():
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(3, 10, 12, generator=gen)
    logits = torch.randn(4, 10, 12, generator=gen)
    assert apply_pamr(image, logits, 0) is logits
    out = apply_pamr(image, logits, 2, dilations=(1, 2))
    torch.testing.assert_close(out, PAMR(2, (1, 2))(image[None], logits[None])[0])
    with pytest.raises(ValueError):
        apply_pamr(image, torch.randn(2, 4, 10, 12), 1)


@pytest.mark.parametrize("error", [RuntimeError("boom"), torch.OutOfMemoryError("CUDA out of memory")])
def test_apply_pamr_warns_and_returns_input_on_runtime_error(monkeypatch, error):
    def fail(self, image, mask):
        raise error

    monkeypatch.setattr(pamr_module.PAMR, "forward", fail)
    logits = torch.randn(2, 5, 5)
    with pytest.warns(RuntimeWarning, match="PAMR skipped"):
        out = apply_pamr(torch.randn(3, 5, 5), logits, 10)
    assert out is logits
