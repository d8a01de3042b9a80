"""Logit resizing and the label decision (protocol.md §8), against float64 numpy re-computations and hand cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cass_plugins.pipeline.postprocess import labels_at_size, logits_to_labels, upsample_banded, upsample_logits, upsample_rows


def _softmax_np(x: np.ndarray, axis: int = 0) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# -------------------------------------------------------------------------------------------------- upsampling


def test_two_step_equals_explicit_chain_and_differs_from_one_step():
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(4, 5, 7, generator=gen)
    via, size = (80, 112), (61, 90)
    chain = F.interpolate(
        F.interpolate(grid[None], size=via, mode="bilinear", align_corners=False),
        size=size, mode="bilinear", align_corners=False,
    )[0]
    single = F.interpolate(grid[None], size=size, mode="bilinear", align_corners=False)[0]
    two = upsample_logits(grid, size, two_step_via=via)
    one = upsample_logits(grid, size)
    assert two.shape == one.shape == (4, *size)
    assert torch.equal(two, chain)
    assert torch.equal(one, single)
    assert not torch.allclose(two, one, atol=1e-3)  # the two protocols really differ
    assert upsample_logits(grid[None], size).shape == (1, 4, *size)


def test_upsample_same_size_is_identity():
    x = torch.randn(2, 6, 6)
    assert torch.equal(upsample_logits(x, (6, 6)), x)


# ------------------------------------------------------------------------------------------------------ labels


def test_synonym_max_matches_float64_reference():
    rng = np.random.default_rng(1)
    logits = rng.uniform(-0.2, 0.4, size=(5, 3, 4))
    q2c = [0, 1, 1, 2, 1]
    labels, probs = logits_to_labels(torch.from_numpy(logits), q2c, logit_scale=40.0)

    p = _softmax_np(40.0 * logits, axis=0)
    ref = np.stack([p[0], np.maximum(np.maximum(p[1], p[2]), p[4]), p[3]])
    assert probs.dtype == torch.float64 and probs.shape == (3, 3, 4)
    np.testing.assert_allclose(probs.numpy(), ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(labels.numpy(), ref.argmax(0))
    assert labels.dtype == torch.int64
    assert (probs.sum(0) < 1 - 1e-9).any()  # not renormalised


def test_float32_input_and_class_without_query():
    logits = torch.tensor([[[0.3]], [[0.1]]])
    labels, probs = logits_to_labels(logits, [0, 2], logit_scale=10.0)
    assert probs.shape == (3, 1, 1) and probs.dtype == torch.float32
    assert probs[1].item() == 0.0  # class 1 has no query
    p = _softmax_np(10.0 * np.array([0.3, 0.1]))
    np.testing.assert_allclose([probs[0].item(), probs[2].item()], p, rtol=1e-6)
    assert labels.item() == 0


def test_prob_thd_is_strict():
    # two classes, equal logits: probabilities exactly 0.5 / 0.5, argmax tie → class 0
    logits = torch.zeros(2, 1, 1, dtype=torch.float64)
    labels, _ = logits_to_labels(logits, [0, 1], logit_scale=1.0, prob_thd=0.5, background_index=1)
    assert labels.item() == 0  # 0.5 < 0.5 is false: kept
    labels, _ = logits_to_labels(logits, [0, 1], logit_scale=1.0, prob_thd=0.5 + 1e-12, background_index=1)
    assert labels.item() == 1  # below: background
    labels, _ = logits_to_labels(logits, [0, 1], logit_scale=1.0, prob_thd=0.0)
    assert labels.item() == 0


def test_prob_thd_sets_background_index_zero():
    logits = torch.tensor([[[0.0, 0.0]], [[3.0, 0.1]], [[0.0, 0.05]]], dtype=torch.float64)
    labels, probs = logits_to_labels(logits, [0, 1, 2], logit_scale=1.0, prob_thd=0.6)
    # pixel 0: class 1 with p = e³/(e³+2) ≈ 0.909 → kept; pixel 1: max p ≈ 0.35 → background
    assert labels.tolist() == [[1, 0]]
    assert probs[:, 0, 1].max().item() < 0.6


def _area_logits() -> torch.Tensor:
    # 1×10 image, 3 classes. Argmax: class 0 on 4 px, class 1 on 5 px, class 2 on 1 px (pixel 9, class 1 second).
    L = torch.zeros(3, 1, 10, dtype=torch.float64)
    L[0, 0, :4] = 1.0
    L[1, 0, 4:9] = 1.0
    L[2, 0, 9] = 1.0
    L[1, 0, 9] = 0.5
    return L


def test_area_thd_relative_to_foreground_pixels():
    L = _area_logits()
    q2c = [0, 1, 2]
    base, _ = logits_to_labels(L, q2c, logit_scale=10.0)
    assert base[0].tolist() == [0] * 4 + [1] * 5 + [2]
    # foreground = 6 px. area_thd = 0.2 → threshold 1.2 ≥ 1 px: class 2 dropped, pixel 9 goes to class 1
    labels, probs = logits_to_labels(L, q2c, logit_scale=10.0, area_thd=0.2)
    assert labels[0].tolist() == [0] * 4 + [1] * 6
    assert torch.all(probs[2] == 0)
    # area_thd = 0.15: relative to the foreground 0.9 < 1 → kept (relative to the whole image, 1.5, it would drop)
    labels, probs = logits_to_labels(L, q2c, logit_scale=10.0, area_thd=0.15)
    assert labels[0].tolist() == base[0].tolist()
    assert probs[2, 0, 9] > 0
    # boundary: count == area_thd · foreground (1 == 1/6 · 6) → dropped (keep needs strictly more)
    labels, _ = logits_to_labels(L, q2c, logit_scale=10.0, area_thd=1 / 6)
    assert labels[0, 9].item() == 1
    # the background class is never dropped, however small
    labels, _ = logits_to_labels(L, q2c, logit_scale=10.0, area_thd=0.9)
    assert labels[0, :4].tolist() == [0] * 4


def test_area_thd_then_prob_thd():
    # after class 2 is dropped pixel 9 falls to class 1, whose probability there is tiny; prob_thd must use the
    # post-drop maxima and send it to background, while pixels 4..8 (class 1, p ≈ 1) stay
    L = _area_logits()
    labels, probs = logits_to_labels(L, [0, 1, 2], logit_scale=10.0, area_thd=0.2, prob_thd=0.9)
    p = _softmax_np(10.0 * L.numpy(), axis=0)
    assert p[1, 0, 9] < 0.9  # pixel 9's surviving class is below the threshold → background
    assert labels[0, 9].item() == 0
    assert labels[0, 4:9].tolist() == [1] * 5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_logits_raise(bad):
    logits = torch.zeros(2, 3, 3)
    logits[1, 1, 1] = bad
    with pytest.raises(ValueError, match="NaN"):
        logits_to_labels(logits, [0, 1])


def test_shape_errors():
    with pytest.raises(ValueError):
        logits_to_labels(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError):
        logits_to_labels(torch.zeros(3, 2, 2), [0, 1])


# ------------------------------------------------------------------------------------------------------ chunks


def _bilinear_np(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """align_corners=False bilinear resize of (K, h, w), written out (half-pixel centres, edge clamping)."""
    k, h, w = x.shape
    out_h, out_w = size

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = axis(h, out_h)
    x0, x1, fx = axis(w, out_w)
    rows = x[:, y0] * (1 - fy)[None, :, None] + x[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("area_thd", [None, 0.3])
def test_chunked_equals_single_pass_and_reference(dtype, area_thd):
    """Upsampled grid logits → labels: every chunk size gives the same bits; both match a float64 re-computation."""
    gen = torch.Generator().manual_seed(3)
    grid = (torch.rand(7, 6, 9, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    size = (37, 53)  # 1961 pixels
    logits = upsample_logits(grid, size)
    q2c = [0, 1, 1, 2, 3, 3, 1]  # synonyms: class 1 has three queries, class 3 two
    kw = dict(logit_scale=40.0, prob_thd=0.5, area_thd=area_thd)
    ref_labels, ref_probs = logits_to_labels(logits, q2c, chunk_pixels=logits[0].numel(), **kw)
    for chunk in (64, 100, 37, 5):
        labels, probs = logits_to_labels(logits, q2c, chunk_pixels=chunk, **kw)
        assert torch.equal(labels, ref_labels) and torch.equal(probs, ref_probs), chunk

    # independent float64 reference: resize, softmax, synonym max, area rule, threshold
    up = _bilinear_np(grid.double().numpy(), size)
    np.testing.assert_allclose(logits.double().numpy(), up, atol=1e-6 if dtype == torch.float32 else 1e-12)
    p = _softmax_np(40.0 * up, axis=0)
    cls = np.stack([p[0], p[[1, 2, 6]].max(0), p[3], p[[4, 5]].max(0)])
    if area_thd is not None:
        counts = np.bincount(cls.argmax(0).ravel(), minlength=4)
        fg = counts[1:].sum()
        for c in range(1, 4):
            if counts[c] <= area_thd * fg:
                cls[c] = 0
    labels = np.where(cls.max(0) < 0.5, 0, cls.argmax(0))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(ref_probs.double().numpy(), cls, atol=tol)
    sorted_p = np.sort(cls, axis=0)
    clear = ((sorted_p[-1] - sorted_p[-2]) > 1e-4) & (np.abs(cls.max(0) - 0.5) > 1e-4)  # float32 near-ties aside
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(ref_labels.numpy()[clear], labels[clear])
    assert len(np.unique(labels)) >= 2 and (labels == 0).any()  # the threshold and several classes are exercised
    if area_thd is not None:
        assert (counts[1:] <= area_thd * fg).any()  # the area rule dropped a class


def test_chunk_pixels_must_be_positive():
    with pytest.raises(ValueError, match="chunk_pixels"):
        logits_to_labels(torch.zeros(2, 3, 3), [0, 1], chunk_pixels=0)


_MEMORY_SCRIPT = """
import resource, sys, torch
from cass_plugins.pipeline.postprocess import logits_to_labels
q, h, w, chunk = (int(a) for a in sys.argv[1:5])
torch.set_num_threads(2)
logits = torch.empty(q, h, w).uniform_(-0.1, 0.3)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
before = rss()
labels, probs = logits_to_labels(logits, list(range(q)), prob_thd=0.1, chunk_pixels=chunk or None)
output = probs.numel() * probs.element_size() + labels.numel() * labels.element_size()
print(rss() - before - output)
"""


def peak_extra_bytes(queries: int, height: int, width: int, chunk_pixels: int = 0) -> int:
    """Peak resident memory of one logits_to_labels call beyond its input and output, measured in a fresh process."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(queries), str(height), str(width),
                           str(chunk_pixels)], capture_output=True, text=True, timeout=600, check=True)
    return int(proc.stdout.split()[-1])


@pytest.mark.slow
def test_peak_memory_is_bounded_by_the_chunk():
    """150 classes: the extra memory does not grow with the image (it did: ~3 × Q × H × W values before)."""
    small = peak_extra_bytes(150, 500, 750)
    large = peak_extra_bytes(150, 1000, 1500)
    one_plane = 1000 * 1500 * 4
    assert large < 300e6 and large < 1.5 * small + 50e6, (small, large)
    assert large < 150 * one_plane / 5  # far below one more copy of the logits (900 MB)
    single = peak_extra_bytes(150, 1000, 1500, chunk_pixels=10**9)  # one chunk: the former whole-image path
    assert single > 5 * large, (single, large)


# ------------------------------------------------------------------------------------------------ row bands


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("src, size", [((6, 9), (37, 53)), ((23, 17), (200, 301)), ((40, 30), (29, 11)), ((5, 5), (5, 40))])
def test_row_bands_equal_one_call_and_match_interpolate(dtype, src, size):
    """Any split into bands gives the bits of one call; both agree with F.interpolate and a float64 formula."""
    grid = torch.randn(4, *src, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    full = upsample_rows(grid, size, (0, size[0]))
    assert full.shape == (4, *size) and full.dtype == dtype
    for rows in (1, 3, 16):
        bands = [upsample_rows(grid, size, (r, min(size[0], r + rows))) for r in range(0, size[0], rows)]
        assert torch.equal(torch.cat(bands, 1), full), rows
    assert torch.equal(upsample_banded(grid, size, band_elements=4 * size[1] * 3), full)
    ref = F.interpolate(grid[None], size=size, mode="bilinear", align_corners=False)[0]
    eps = torch.finfo(dtype).eps * float(grid.abs().max())
    assert float((full - ref).abs().max()) <= 32 * eps
    np.testing.assert_allclose(full.double().numpy(), _bilinear_np(grid.double().numpy(), size), rtol=0, atol=32 * eps)


def test_upsample_rows_rejects_bad_ranges():
    with pytest.raises(ValueError, match="rows"):
        upsample_rows(torch.zeros(2, 3, 3), (6, 6), (4, 4))
    with pytest.raises(ValueError, match="rows"):
        upsample_rows(torch.zeros(2, 3, 3), (6, 6), (0, 7))


@pytest.mark.parametrize("area_thd", [None, 0.3])
@pytest.mark.parametrize("prob_thd", [0.0, 0.5])
def test_labels_at_size_equal_float64_reference(area_thd, prob_thd):
    """Banded labels = full upsample + softmax + synonym max + area rule + threshold, in float64 numpy."""
    gen = torch.Generator().manual_seed(8)
    grid = torch.rand(7, 9, 13, generator=gen, dtype=torch.float64) * 0.3
    size = (61, 83)
    q2c = [0, 1, 1, 2, 3, 3, 1]
    kw = dict(logit_scale=40.0, prob_thd=prob_thd, area_thd=area_thd)
    labels = labels_at_size(grid, size, q2c, band_elements=7 * 83 * 4, **kw)  # 4-row bands
    full_labels, _ = logits_to_labels(upsample_banded(grid, size), q2c, **kw)
    assert torch.equal(labels, full_labels)

    p = _softmax_np(40.0 * _bilinear_np(grid.numpy(), size), axis=0)
    cls = np.stack([p[0], p[[1, 2, 6]].max(0), p[3], p[[4, 5]].max(0)])
    if area_thd is not None:
        counts = np.bincount(cls.argmax(0).ravel(), minlength=4)
        dropped = [c for c in range(1, 4) if counts[c] <= area_thd * counts[1:].sum()]
        assert dropped  # the rule acts on this input
        cls[dropped] = 0
    expected = np.where(cls.max(0) < prob_thd, 0, cls.argmax(0))
    np.testing.assert_array_equal(labels.numpy(), expected)
    assert len(np.unique(expected)) >= 2
    if prob_thd:
        assert ((expected == 0) & (cls.argmax(0) != 0)).any()  # the threshold acts
