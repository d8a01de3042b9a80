"""IoUAccumulator against hand-worked cases and an independent confusion-matrix computation (protocol.md §10)."""
from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cass_plugins.evaluation.metrics import IoUAccumulator

NAN = float("nan")


def _same(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y) for x, y in zip(a, b)) and len(a) == len(b)


def _hand_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    pred1 = np.array([[0, 0, 1], [1, 2, 2]])
    gt1 = np.array([[0, 1, 1], [255, 2, 0]])
    pred2 = np.array([[1, 1], [1, 1]])
    gt2 = np.array([[1, 1], [255, 255]])
    return [(pred1, gt1), (pred2, gt2)]


def test_hand_worked_two_images() -> None:
    # Non-ignored (pred, gt): image 1 → (0,0) (0,1) (1,1) (2,2) (2,0); image 2 → (1,1) (1,1).
    # I = [1, 3, 1, 0], P = [2, 3, 2, 0], G = [2, 4, 1, 0], U = P + G − I = [3, 4, 2, 0]; class 3 never occurs.
    acc = IoUAccumulator(4)
    for pred, gt in _hand_pairs():
        acc.update(torch.from_numpy(pred), torch.from_numpy(gt))
    assert acc.area_intersect.tolist() == [1, 3, 1, 0]
    assert acc.area_pred_label.tolist() == [2, 3, 2, 0]
    assert acc.area_label.tolist() == [2, 4, 1, 0]
    assert acc.area_union.tolist() == [3, 4, 2, 0]
    res = acc.compute()
    assert _same(res["IoU"], [33.33, 75.0, 50.0, NAN])
    assert _same(res["Acc"], [50.0, 75.0, 100.0, NAN])
    assert res["mIoU"] == 52.78  # (1/3 + 3/4 + 1/2) / 3, the absent class excluded
    assert res["mAcc"] == 75.0
    assert res["aAcc"] == res["pAcc"] == 71.43  # 5 / 7
    assert res["num_images"] == 2 and res["num_pixels"] == 7


def test_predicted_but_unlabelled_class_counts_as_zero() -> None:
    acc = IoUAccumulator(4)
    acc.update(np.array([[3, 1]]), np.array([[0, 1]]))
    res = acc.compute(digits=None)
    # IoU: class 0 → 0/1, class 1 → 1/1, class 2 → NaN (excluded), class 3 → 0/1 (predicted only, counts).
    assert _same(res["IoU"], [0.0, 100.0, NAN, 0.0])
    assert res["mIoU"] == pytest.approx(100 / 3)
    assert _same(res["Acc"], [0.0, 100.0, NAN, NAN])  # Acc is NaN wherever the class has no labelled pixel
    assert res["mAcc"] == 50.0 and res["aAcc"] == 50.0


def _reference(pairs: list[tuple[np.ndarray, np.ndarray]], n: int) -> dict[str, np.ndarray | float]:
    """Confusion matrix over non-ignored pixels (rows = gt, cols = pred), metrics in percent, unrounded."""
    conf = np.zeros((n, n), dtype=np.int64)
    for pred, gt in pairs:
        m = gt != 255
        conf += np.bincount(n * gt[m] + pred[m], minlength=n * n).reshape(n, n)
    tp = np.diag(conf).astype(float)
    rows, cols = conf.sum(1).astype(float), conf.sum(0).astype(float)
    iou = np.array([tp[k] / (rows[k] + cols[k] - tp[k]) if rows[k] + cols[k] > 0 else np.nan for k in range(n)])
    acc = np.array([tp[k] / rows[k] if rows[k] > 0 else np.nan for k in range(n)])
    return {
        "IoU": 100 * iou, "Acc": 100 * acc, "aAcc": 100 * tp.sum() / conf.sum(),
        "mIoU": 100 * np.nanmean(iou), "mAcc": 100 * np.nanmean(acc),
    }


def _random_pairs(seed: int, count: int = 6, n: int = 7) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        h, w = rng.integers(3, 12, size=2)
        gt = rng.integers(0, n - 2, size=(h, w))  # classes n−2 and n−1 never labelled
        pred = np.where(rng.random((h, w)) < 0.6, gt, rng.integers(0, n - 1, size=(h, w)))  # n−2 predicted only
        gt[rng.random((h, w)) < 0.2] = 255
        pairs.append((pred, gt))
    return pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_confusion_matrix_reference(seed: int) -> None:
    n = 7
    pairs = _random_pairs(seed, n=n)
    acc = IoUAccumulator(n)
    for pred, gt in pairs:
        acc.update(pred, gt)
    ref = _reference(pairs, n)
    res = acc.compute(digits=None)
    assert math.isnan(res["IoU"][n - 1]) and not math.isnan(res["IoU"][n - 2])
    np.testing.assert_allclose(res["IoU"], ref["IoU"], rtol=1e-12)
    np.testing.assert_allclose(res["Acc"], ref["Acc"], rtol=1e-12)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert res[key] == pytest.approx(ref[key], rel=1e-12)
    assert acc.compute()["mIoU"] == round(float(ref["mIoU"]), 2)


def test_out_of_range_values_are_dropped_and_counted() -> None:
    # As torch.histc does in mmseg: label 9 and prediction 5 fall outside 0..3 and leave the histograms.
    acc = IoUAccumulator(4)
    acc.update(np.array([[0, 9, 5, 1]]), np.array([[0, 9, 2, 255]]))
    assert acc.area_label.tolist() == [1, 0, 1, 0]
    assert acc.area_pred_label.tolist() == [1, 0, 0, 0]
    assert acc.area_intersect.tolist() == [1, 0, 0, 0]
    assert (acc.invalid_label_pixels, acc.invalid_pred_pixels) == (1, 2)


def test_merge_and_state_round_trip() -> None:
    pairs = _random_pairs(3)
    whole, first, second = IoUAccumulator(7), IoUAccumulator(7), IoUAccumulator(7)
    for i, (pred, gt) in enumerate(pairs):
        whole.update(pred, gt)
        (first if i < 2 else second).update(pred, gt)
    # A JSON round trip in between, as when resuming from a results file.
    restored = IoUAccumulator.from_state(json.loads(json.dumps(first.state_dict())))
    merged = restored.merge(second)
    assert merged.state_dict() == whole.state_dict()
    assert merged.num_images == len(pairs)
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(IoUAccumulator(8))
    bad = whole.state_dict()
    bad["area_union"][0] += 1
    with pytest.raises(ValueError, match="inconsistent"):
        IoUAccumulator.from_state(bad)


def test_input_validation_and_batch_dim() -> None:
    acc = IoUAccumulator(3)
    with pytest.raises(TypeError, match="integer"):
        acc.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    acc.update(torch.ones(1, 2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.uint8))  # (1, H, W) prediction
    assert acc.area_intersect.tolist() == [0, 4, 0]


def test_empty_accumulator_gives_nan() -> None:
    res = IoUAccumulator(3).compute()
    assert math.isnan(res["mIoU"]) and math.isnan(res["aAcc"]) and res["num_pixels"] == 0


def test_markdown_table() -> None:
    acc = IoUAccumulator(4)
    for pred, gt in _hand_pairs():
        acc.update(pred, gt)
    table = acc.markdown_table(["background", "cat", "dog", "cow"])
    lines = table.splitlines()
    assert lines[0] == "| class | IoU | Acc |"
    assert "| cat | 75.00 | 75.00 |" in lines
    assert "| cow | nan | nan |" in lines
    assert lines[-1] == "| 71.43 | 52.78 | 75.00 |"
    with pytest.raises(ValueError, match="3 class names for 4"):
        acc.markdown_table(["a", "b", "c"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, pairs: list, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        acc = IoUAccumulator(7)
        for pred, gt in pairs[rank::2]:
            acc.update(pred, gt)
        out[rank] = acc.all_reduce().state_dict()
    finally:
        dist.destroy_process_group()


def test_all_reduce_is_noop_without_distributed() -> None:
    acc = IoUAccumulator(3)
    acc.update(np.array([[1]]), np.array([[1]]))
    before = acc.state_dict()
    assert acc.all_reduce() is acc and acc.state_dict() == before


def test_all_reduce_two_ranks() -> None:
    pairs = _random_pairs(4)
    whole = IoUAccumulator(7)
    for pred, gt in pairs:
        whole.update(pred, gt)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_main, args=(_free_port(), pairs, out), nprocs=2, join=True)
        assert out[0] == out[1] == whole.state_dict()
