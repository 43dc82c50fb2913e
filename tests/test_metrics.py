"""Metrics: worked examples of docs/VSPW.md §5, brute-force mVC, streaming, DDP reduce."""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from themask.evaluation.metrics import (
    SegmentationAccumulator,
    VideoConsistencyAccumulator,
    format_metrics_table,
    metrics_to_json,
    per_class_table,
    segmentation_metrics,
)

# docs/VSPW.md §5.2 (rows = GT, columns = prediction)
TOY_MATRIX = np.array([[50, 5, 5, 0], [5, 25, 0, 0], [0, 0, 0, 0], [0, 0, 0, 10]])


def _pixels_from_matrix(matrix: np.ndarray, rng: np.random.Generator):
    """Shuffled (pred, target) pixel lists whose confusion matrix is ``matrix``."""
    target, pred = [], []
    for a in range(matrix.shape[0]):
        for b in range(matrix.shape[1]):
            target += [a] * int(matrix[a, b])
            pred += [b] * int(matrix[a, b])
    order = rng.permutation(len(target))
    return np.array(pred)[order], np.array(target)[order]


def confusion_matrix(pred, target, num_classes):
    """The accumulator's matrix of one update (ranges checked by ``compute``)."""
    acc = SegmentationAccumulator(num_classes=num_classes)
    acc.update(pred, target)
    acc.compute()
    return acc.matrix


def test_toy_confusion_matrix_worked_example():
    rng = np.random.default_rng(0)
    pred, target = _pixels_from_matrix(TOY_MATRIX, rng)
    # add ignored pixels with arbitrary predictions: they must not count anywhere
    pred = np.concatenate([pred, [0, 3, 2, 1]])
    target = np.concatenate([target, [255] * 4])
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 4)
    assert conf.tolist() == TOY_MATRIX.tolist()

    m = segmentation_metrics(conf)
    assert m["IoU"][0] == pytest.approx(50 / 65)
    assert m["IoU"][1] == pytest.approx(25 / 35)
    assert m["IoU"][2] == 0.0
    assert m["IoU"][3] == pytest.approx(1.0)
    assert m["mIoU"] == pytest.approx(0.620879, abs=1e-6)
    assert m["mIoU_present"] == pytest.approx(0.827839, abs=1e-6)
    assert m["WIoU"] == pytest.approx(0.775824, abs=1e-6)
    assert m["aAcc"] == pytest.approx(0.85)
    assert m["mAcc"] == pytest.approx((50 / 60 + 25 / 30 + 10 / 10) / 3)
    assert math.isnan(m["Acc"][2])


def test_class_absent_everywhere_is_ignored_by_both_variants():
    conf = np.zeros((3, 3), dtype=np.int64)
    conf[0, 0], conf[0, 1], conf[1, 1] = 3, 1, 4
    m = segmentation_metrics(conf)
    assert math.isnan(m["IoU"][2])
    assert m["mIoU"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert m["mIoU_present"] == pytest.approx(m["mIoU"])


def test_metrics_match_naive_loops_on_random_matrix():
    rng = np.random.default_rng(1)
    conf = rng.integers(0, 20, size=(6, 6))
    conf[4, :] = 0  # a class absent from the GT but predicted
    m = segmentation_metrics(conf)
    ious, present_ious, weighted = [], [], 0.0
    total = conf.sum()
    for c in range(6):
        g = sum(conf[c, b] for b in range(6))
        q = sum(conf[a, c] for a in range(6))
        union = g + q - conf[c, c]
        iou = conf[c, c] / union
        ious.append(iou)
        if g > 0:
            present_ious.append(iou)
            weighted += g / total * iou
    assert m["mIoU"] == pytest.approx(sum(ious) / len(ious))
    assert m["mIoU_present"] == pytest.approx(sum(present_ious) / len(present_ious))
    assert m["WIoU"] == pytest.approx(weighted)
    assert m["aAcc"] == pytest.approx(np.trace(conf) / total)


def test_confusion_matrix_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="target values"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 4)
    with pytest.raises(ValueError, match="predicted values"):
        confusion_matrix(torch.tensor([0, 4]), torch.tensor([0, 1]), 4)


def test_streaming_accumulation_equals_one_shot():
    rng = np.random.default_rng(2)
    k = 5
    target = rng.integers(0, k, size=(7, 9, 11))
    target[rng.random(target.shape) < 0.2] = 255
    pred = rng.integers(0, k, size=target.shape)
    acc = SegmentationAccumulator(num_classes=k)
    for t in range(7):  # frame by frame, uneven chunks of rows
        acc.update(pred[t, :4], target[t, :4])
        acc.update(torch.from_numpy(pred[t, 4:]), torch.from_numpy(target[t, 4:]))
    naive = np.zeros((k, k), dtype=np.int64)
    for g, p in zip(target.ravel(), pred.ravel()):
        if g != 255:
            naive[g, p] += 1
    assert acc.matrix.tolist() == naive.tolist()
    assert acc.compute() == segmentation_metrics(torch.from_numpy(naive))
    rows = per_class_table(acc.compute(), [f"c{i}" for i in range(k)])
    assert [r["name"] for r in rows] == [f"c{i}" for i in range(k)]


# docs/VSPW.md §5.1: raw GT values, predictions in train ids
TOY_GT = [[[5, 5], [0, 7]], [[5, 5], [0, 8]], [[5, 6], [0, 8]]]
TOY_PRED = [[[4, 4], [3, 6]], [[4, 2], [3, 6]], [[4, 2], [1, 7]]]


def _run_vc(n, videos):
    acc = VideoConsistencyAccumulator(n)
    for gts, preds in videos:
        acc.start_video()
        for g, p in zip(gts, preds):
            acc.update(torch.as_tensor(p), torch.as_tensor(g))
        acc.end_video()
    return acc


def test_mvc_worked_example():
    acc2 = _run_vc(2, [(TOY_GT, TOY_PRED)])
    assert int(acc2.totals[1]) == 1  # window i = 1 (ending on the last frame) is not counted
    assert acc2.compute() == pytest.approx(2 / 3)
    acc3 = _run_vc(3, [(TOY_GT, TOY_PRED)])  # N <= n: skipped
    assert int(acc3.totals[1]) == 0
    assert math.isnan(acc3.compute())


def _brute_force_mvc(n, videos):
    values = []
    for gts, preds in videos:
        num_frames = len(gts)
        if num_frames <= n:
            continue
        h, w = gts[0].shape
        for i in range(num_frames - n):
            stable, both = 0, 0
            for y in range(h):
                for x in range(w):
                    g_same = all(gts[i][y, x] == gts[i + j][y, x] for j in range(1, n))
                    p_same = all(preds[i][y, x] == preds[i + j][y, x] for j in range(1, n))
                    stable += g_same
                    both += g_same and p_same
            if stable:
                values.append(both / stable)
    return sum(values) / len(values), len(values)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_mvc_matches_brute_force_on_random_videos(n):
    rng = np.random.default_rng(10 + n)
    videos = []
    for num_frames in (3, 4, 6, 9, 12):
        # few values and slow changes so that stable pixels exist
        gt = [rng.integers(0, 3, size=(4, 5))]
        pred = [rng.integers(0, 3, size=(4, 5))]
        for _ in range(num_frames - 1):
            g, p = gt[-1].copy(), pred[-1].copy()
            g[rng.random(g.shape) < 0.1] = rng.integers(0, 3)
            p[rng.random(p.shape) < 0.15] = rng.integers(0, 3)
            gt.append(g)
            pred.append(p)
        videos.append((gt, pred))
    expected, windows = _brute_force_mvc(n, videos)
    acc = _run_vc(n, videos)
    assert int(acc.totals[1]) == windows
    assert acc.compute() == pytest.approx(expected, abs=1e-12)


def test_mvc_api_misuse_raises():
    acc = VideoConsistencyAccumulator(2)
    with pytest.raises(RuntimeError):
        acc.update(torch.zeros(2, 2), torch.zeros(2, 2))
    acc.start_video()
    acc.update(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="frame size changed"):
        acc.update(torch.zeros(3, 2), torch.zeros(3, 2))


def _ddp_worker(rank: int, world: int, init_file: str, conn_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rng = np.random.default_rng(100 + rank)
        pred = rng.integers(0, 4, size=(3, 5, 6))
        target = rng.integers(0, 4, size=(3, 5, 6))
        acc = SegmentationAccumulator(num_classes=4)
        acc.update(pred, target)
        vc = VideoConsistencyAccumulator(2)
        vc.totals += torch.tensor([0.5 * (rank + 1), rank + 1], dtype=torch.float64)
        acc.all_reduce()
        vc.all_reduce()
        torch.save(
            {"matrix": acc.matrix, "totals": vc.totals}, os.path.join(conn_dir, f"{rank}.pt")
        )
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduce_sums_over_processes():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_ddp_worker, args=(world, init_file, tmp), nprocs=world, join=True)
        results = [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=True) for r in range(2)]
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for rank in range(world):
        rng = np.random.default_rng(100 + rank)
        pred = rng.integers(0, 4, size=(3, 5, 6))
        target = rng.integers(0, 4, size=(3, 5, 6))
        expected += confusion_matrix(pred, target, 4)
    for r in results:
        assert r["matrix"].tolist() == expected.tolist()
        assert r["totals"].tolist() == [1.5, 3.0]


def test_table_and_json_report_percentages_and_undefined_values():
    m = segmentation_metrics(TOY_MATRIX)
    m["mVC8"], m["mVC16"] = 0.5, float("nan")
    table = format_metrics_table(m, ["a", "b", "c", "d"])
    assert "62.09" in table and "82.78" in table and "77.58" in table and "50.00" in table
    row_c = next(line for line in table.splitlines() if line.split()[:2] == ["2", "c"])
    assert row_c.split()[2:] == ["0.00", "-"]
    out = metrics_to_json(m, ["a", "b", "c", "d"])
    json.dumps(out, allow_nan=False)  # strict JSON: no NaN left
    assert out["mVC16"] is None and out["per_class"]["c"] == {"IoU": 0.0, "Acc": None}
