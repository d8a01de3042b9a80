"""Sliding-window geometry and accumulation (protocol.md §7)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cass_plugins.pipeline.windows import SlidingWindowAccumulator, iter_window_batches, window_grid


def test_hand_worked_grids():
    # 336 = 224 + 112: two windows per side
    assert window_grid(336, 336, 224, 112) == [
        (0, 224, 0, 224), (0, 224, 112, 336), (112, 336, 0, 224), (112, 336, 112, 336),
    ]
    # H = 500: (500 − 224 + 111) // 112 + 1 = 4 rows; the last starts at 336, ends at min(560, 500) = 500, shifts to 276
    rows = sorted({(y1, y2) for y1, y2, _, _ in window_grid(500, 224, 224, 112)})
    assert rows == [(0, 224), (112, 336), (224, 448), (276, 500)]
    # smaller than the crop: one window of the whole image
    assert window_grid(100, 150, 224, 112) == [(0, 100, 0, 150)]
    # one side smaller: whole side, the other side slides
    assert window_grid(100, 300, 224, 112) == [(0, 100, 0, 224), (0, 100, 76, 300)]


def _count_map(windows, H, W):
    count = np.zeros((H, W), dtype=np.int64)
    for y1, y2, x1, x2 in windows:
        count[y1:y2, x1:x2] += 1
    return count


SIZES = [
    (1, 1), (16, 16), (100, 37), (223, 224), (224, 224), (225, 224), (335, 336), (336, 336), (337, 448),
    (448, 448), (500, 375), (375, 500), (560, 1120), (1000, 3),
]


@pytest.mark.parametrize("crop, stride", [(224, 112), (224, 224), (336, 112), (448, 224), (7, 3), (5, 5)])
def test_geometry_properties(crop, stride):
    for H, W in SIZES + [(crop * 3, crop * 2), (stride * 7, stride * 5), (crop + 1, crop - 1)]:
        windows = window_grid(H, W, crop, stride)
        # counts from the closed form 1 + ceil((side − crop) / stride) when side > crop, else 1
        n_h = 1 + math.ceil((H - crop) / stride) if H > crop else 1
        n_w = 1 + math.ceil((W - crop) / stride) if W > crop else 1
        assert len(windows) == n_h * n_w
        assert len(set(windows)) == len(windows)
        for y1, y2, x1, x2 in windows:
            assert 0 <= y1 < y2 <= H and 0 <= x1 < x2 <= W
            assert (y2 - y1, x2 - x1) == (min(crop, H), min(crop, W))
        assert min(w[0] for w in windows) == 0 and max(w[1] for w in windows) == H
        assert min(w[2] for w in windows) == 0 and max(w[3] for w in windows) == W
        assert (_count_map(windows, H, W) > 0).all(), (H, W, crop, stride)
        # row-major order: rows outer
        assert windows == sorted(windows, key=lambda w: (w[0], w[2]))


def test_stride_larger_than_crop_is_rejected():
    with pytest.raises(ValueError, match="stride"):
        window_grid(100, 100, 10, 20)


def test_accumulator_hand_worked():
    # 2×3 image, crop 2, stride 1 → windows (0,2,0,2) and (0,2,1,3). Window A adds 1, window B adds 3: columns
    # average to 1, (1+3)/2 = 2, 3.
    windows = window_grid(2, 3, 2, 1)
    assert windows == [(0, 2, 0, 2), (0, 2, 1, 3)]
    acc = SlidingWindowAccumulator(1, 2, 3)
    acc.add(windows[0], torch.ones(1, 2, 2))
    acc.add(windows[1], torch.full((1, 1, 1), 3.0))  # a 1×1 grid is up-sampled to a constant 2×2
    expected = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]])
    assert torch.equal(acc.result(), expected)


def test_accumulator_upsamples_half_pixel():
    # grid [0, 4] (1×2) up-sampled to 2×4 with half-pixel centres: source x = (i + 0.5)/2 − 0.5 = −0.25, 0.25, 0.75,
    # 1.25 → clamped 0, 0.25, 0.75, 1 → values 0, 1, 3, 4
    acc = SlidingWindowAccumulator(1, 2, 4)
    acc.add((0, 2, 0, 4), torch.tensor([[[0.0, 4.0]]]))
    assert torch.allclose(acc.result(), torch.tensor([[[0.0, 1.0, 3.0, 4.0]] * 2]))


def test_add_batch_equals_sequential_adds():
    H, W, crop, stride, K = 40, 29, 16, 8, 3
    windows = window_grid(H, W, crop, stride)
    gen = torch.Generator().manual_seed(0)
    logits = {w: torch.randn(K, 4, 4, generator=gen) for w in windows}
    seq = SlidingWindowAccumulator(K, H, W)
    for w in windows:
        seq.add(w, logits[w])
    bat = SlidingWindowAccumulator(K, H, W)
    seen = []
    for batch in iter_window_batches(windows, batch_size=4):
        bat.add_batch(batch, torch.stack([logits[w] for w in batch]))
        seen.extend(batch)
    assert sorted(seen) == sorted(windows)
    torch.testing.assert_close(bat.result(), seq.result(), rtol=1e-6, atol=1e-6)


def test_constant_logits_average_to_the_constant():
    H, W = 50, 70
    acc = SlidingWindowAccumulator(2, H, W, dtype=torch.float64)
    for w in window_grid(H, W, 32, 12):
        acc.add(w, torch.tensor([1.5, -2.0], dtype=torch.float64).view(2, 1, 1).expand(2, 2, 2))
    out = acc.result()
    assert out.shape == (2, H, W) and out.dtype == torch.float64
    assert torch.allclose(out[0], torch.full((H, W), 1.5, dtype=torch.float64))
    assert torch.allclose(out[1], torch.full((H, W), -2.0, dtype=torch.float64))


def test_uncovered_pixels_raise():
    acc = SlidingWindowAccumulator(1, 4, 4)
    acc.add((0, 2, 0, 4), torch.zeros(1, 1, 1))
    with pytest.raises(RuntimeError, match="8 of 16 pixels"):
        acc.result()


def test_accumulator_validates_inputs():
    acc = SlidingWindowAccumulator(2, 4, 4)
    with pytest.raises(ValueError):
        acc.add((0, 5, 0, 4), torch.zeros(2, 1, 1))
    with pytest.raises(ValueError):
        acc.add((0, 4, 0, 4), torch.zeros(3, 1, 1))
    with pytest.raises(ValueError, match="one size"):
        acc.add_batch([(0, 4, 0, 4), (0, 2, 0, 2)], torch.zeros(2, 2, 1, 1))


def test_iter_window_batches_groups_by_size():
    windows = [(0, 4, 0, 4), (0, 4, 2, 3), (0, 4, 4, 8), (0, 4, 8, 12), (0, 4, 5, 6), (4, 8, 0, 4)]
    batches = list(iter_window_batches(windows, batch_size=2))
    assert batches == [[(0, 4, 0, 4), (0, 4, 4, 8)], [(0, 4, 8, 12), (4, 8, 0, 4)], [(0, 4, 2, 3), (0, 4, 5, 6)]]
    for batch in batches:
        assert len({(y2 - y1, x2 - x1) for y1, y2, x1, x2 in batch}) == 1
    with pytest.raises(ValueError):
        list(iter_window_batches(windows, 0))
