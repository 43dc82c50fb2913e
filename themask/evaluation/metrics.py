"""VSPW metrics (docs/VSPW.md §3) as fractions (``nan``: undefined), accumulated on the device."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from themask.data.vspw import IGNORE_INDEX
from themask.distributed import all_reduce

ArrayLike = Tensor | np.ndarray

PUBLISHED_VC_SKIP = 16  # VSS-CFFM VC_perclip.py: clip_num = 16, checked before both n


def _as_tensor(x: ArrayLike) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def segmentation_metrics(conf: ArrayLike) -> dict[str, object]:
    """``mIoU`` (classes with union > 0), ``mIoU_present``, ``WIoU``, ``aAcc``, ``mAcc``, per-class
    ``IoU`` and ``Acc`` of a (K, K) confusion matrix (rows = GT; docs/VSPW.md §3.1–3.2)."""
    m = _as_tensor(conf).detach().to("cpu", torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"segmentation_metrics: expected a square matrix, got {tuple(m.shape)}")
    inter, gt = m.diagonal(), m.sum(dim=1)
    union = gt + m.sum(dim=0) - inter
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, inter / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, inter / gt.clamp(min=1), nan)
    present, total = gt > 0, gt.sum()
    return {  # the mean of no value is nan
        "mIoU": float(iou[union > 0].mean()),
        "mIoU_present": float(iou[present].mean()),
        "WIoU": float((gt[present] / total * iou[present]).sum()) if total > 0 else math.nan,
        "aAcc": float(inter.sum() / total) if total > 0 else math.nan,
        "mAcc": float(acc[present].mean()),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


def scalar_metrics(results: Mapping[str, object]) -> dict[str, float]:
    """The scalar entries of an ``evaluate_split`` result (per-class lists left out)."""
    numbers = {k: v for k, v in results.items() if isinstance(v, (int, float))}
    return {k: float(v) for k, v in numbers.items() if not isinstance(v, bool)}


class SegmentationAccumulator:
    """Streaming confusion matrix over a split; ``compute()`` → :func:`segmentation_metrics`."""

    def __init__(
        self,
        *,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        device: str | torch.device = "cpu",
    ) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.device = torch.device(device)
        k2 = num_classes * num_classes
        self.counts = torch.zeros(k2 + 3, dtype=torch.int64, device=self.device)
        self.matrix = self.counts[:k2].view(num_classes, num_classes)

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add the pixels of ``pred`` / ``target`` (one shape); ``compute`` checks the ranges."""
        pred_t, target_t = _as_tensor(pred).to(self.device), _as_tensor(target).to(self.device)
        if pred_t.shape != target_t.shape:
            shapes = f"pred shape {tuple(pred_t.shape)} != target shape {tuple(target_t.shape)}"
            raise ValueError(f"confusion matrix: {shapes}")
        # bins: the K×K matrix (row-major), bad targets, bad predictions (of the rest), ignored
        k, k2 = self.num_classes, self.num_classes * self.num_classes
        pred_t, target_t = pred_t.reshape(-1).long(), target_t.reshape(-1).long()
        ignored = target_t == self.ignore_index
        bad_target = ~ignored & ((target_t < 0) | (target_t >= k))
        bad_pred = ~ignored & ~bad_target & ((pred_t < 0) | (pred_t >= k))
        index = torch.where(bad_target, k2, target_t * k + pred_t)
        index = torch.where(bad_pred, k2 + 1, index)
        index = torch.where(ignored, k2 + 2, index)
        self.counts.index_add_(0, index, torch.ones_like(index))

    def all_reduce(self) -> None:
        """Sum the counts over all processes (every rank, before ``compute``)."""
        self.counts.copy_(all_reduce(self.counts))

    def compute(self) -> dict[str, object]:
        k2 = self.num_classes * self.num_classes
        bad_target, bad_pred = self.counts[k2 : k2 + 2].tolist()
        if bad_target:
            rule = f"target values must be in [0, {self.num_classes}) or {self.ignore_index}"
            raise ValueError(f"confusion matrix: {rule}; {bad_target} pixel(s) are not")
        if bad_pred:
            rule = f"predicted values must be in [0, {self.num_classes})"
            raise ValueError(f"confusion matrix: {rule}; {bad_pred} pixel(s) are not")
        return segmentation_metrics(self.matrix)


class VideoConsistencyAccumulator:
    """mVC_n (docs/VSPW.md §3.3): ``start_video()``, ``update(pred, gt)`` per frame, ``end_video``;
    videos of N ≤ ``skip_up_to`` frames (default n; published: ``PUBLISHED_VC_SKIP``) add none."""

    def __init__(
        self, n: int, *, skip_up_to: int | None = None, device: str | torch.device = "cpu"
    ) -> None:
        if n < 2:
            raise ValueError(f"VideoConsistencyAccumulator: window length n must be >= 2, got {n}")
        self.n, self.skip_up_to = n, n if skip_up_to is None else skip_up_to
        self.device = torch.device(device)
        self.totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # [Σ VC, windows]
        self._video_totals: Tensor | None = None  # the current video's; None between videos

    def start_video(self) -> None:
        if self._video_totals is not None:
            raise RuntimeError("VideoConsistencyAccumulator: start_video() before end_video()")
        self._video_totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._prev: Tensor | None = None  # (2, H, W): the last frame's GT and prediction
        self._runs = torch.zeros(0)  # (2, H, W): frames since each value last changed
        self._pending: Tensor | None = None  # [VC, 1] of the window ending on the last frame
        self.frames_seen = 0

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Add the next frame of the current video. pred, gt: (H, W) integer maps."""
        if self._video_totals is None:
            raise RuntimeError("VideoConsistencyAccumulator: update() outside start/end_video()")
        pred_t, gt_t = _as_tensor(pred).to(self.device), _as_tensor(gt).to(self.device)
        if pred_t.shape != gt_t.shape or pred_t.dim() != 2:
            raise ValueError(
                f"VideoConsistencyAccumulator: expected pred and gt of one (H, W) shape, got "
                f"{tuple(pred_t.shape)} and {tuple(gt_t.shape)}"
            )
        if self._pending is not None:  # a later frame exists, so that window is counted
            self._video_totals += self._pending
            self._pending = None
        current = torch.stack([gt_t.long(), pred_t.long()])
        if self._prev is None:
            self._runs = torch.zeros(current.shape, dtype=torch.int32, device=self.device)
        elif self._prev.shape != current.shape:
            raise ValueError(
                f"VideoConsistencyAccumulator: frame size changed within a video: "
                f"{tuple(self._prev.shape[1:])} -> {tuple(gt_t.shape)}"
            )
        else:
            self._runs = torch.where(current == self._prev, self._runs + 1, 0)
        self._prev = current
        self.frames_seen += 1
        if self.frames_seen >= self.n:
            # the last n frames are stable where the run spans n − 1 equalities
            stable_gt, stable_pred = self._runs >= self.n - 1
            size = stable_gt.sum().double()  # stays on the device: no sync per frame
            value = (stable_gt & stable_pred).sum().double() / size.clamp(min=1)
            self._pending = torch.stack([value, (size > 0).double()])

    def end_video(self) -> None:
        """Close the current video (its last window is dropped)."""
        if self._video_totals is None:
            raise RuntimeError("VideoConsistencyAccumulator: end_video() without start_video()")
        if self.frames_seen > self.skip_up_to:
            self.totals += self._video_totals
        self._video_totals = None

    def all_reduce(self) -> None:
        """Sum the window totals over all processes (every rank, before ``compute``)."""
        self.totals.copy_(all_reduce(self.totals))

    def compute(self) -> float:
        total, count = self.totals.tolist()
        return total / count if count > 0 else math.nan


def per_class_table(
    metrics: Mapping[str, Any], class_names: list[str] | None = None
) -> list[dict[str, object]]:
    """Rows ``{"class", "name", "IoU", "Acc"}`` of the per-class results of a metrics dict."""
    ious, accs = list(metrics["IoU"]), list(metrics["Acc"])
    names = class_names if class_names is not None else [str(i) for i in range(len(ious))]
    if len(names) != len(ious):
        raise ValueError(f"per_class_table: {len(names)} class names for {len(ious)} classes")
    return [{"class": i, "name": n, "IoU": ious[i], "Acc": accs[i]} for i, n in enumerate(names)]


def format_percent(value: object, width: int = 6) -> str:
    """A fraction as a percentage with 2 decimals; ``-`` for an undefined (nan) value."""
    v = float(value)  # type: ignore[arg-type]
    return f"{'-':>{width}}" if math.isnan(v) else f"{100 * v:{width}.2f}"


def summarize_metrics(metrics: Mapping[str, object]) -> str:
    """One line of the scalar metrics in percent, e.g. ``mIoU 41.20, aAcc 80.03, mVC16 -``."""
    return ", ".join(
        f"{key} {format_percent(value, 0)}"
        for key, value in scalar_metrics(metrics).items()
        if not key.startswith("num_")
    )


def format_metrics_table(metrics: dict[str, object], class_names: list[str] | None = None) -> str:
    """Printable text: the summary metrics (×100, ``-`` = undefined), then per-class IoU / Acc."""
    labels = {
        "mIoU": "mIoU (mmseg: classes predicted or present)",
        "mIoU_present": "mIoU (Evaluator: classes present in GT)",
        "WIoU": "Weighted IoU",
        "aAcc": "pixel accuracy (aAcc)",
        "mAcc": "mean class accuracy (mAcc)",
    }
    for key in sorted((k for k in metrics if k.startswith("mVC")), key=lambda k: int(k[3:])):
        labels[key] = f"{key} (video consistency, {key[3:]} frames)"
    width = max(len(v) for v in labels.values())
    lines = [f"{labels[k]:<{width}}  {format_percent(metrics[k])}" for k in labels if k in metrics]
    if "IoU" in metrics:
        rows = per_class_table(metrics, class_names)
        name_width = max(12, max(len(str(r["name"])) for r in rows))
        lines += ["", f"{'id':>3}  {'class':<{name_width}}  {'IoU':>6}  {'Acc':>6}"]
        for r in rows:
            iou, acc = format_percent(r["IoU"]), format_percent(r["Acc"])
            lines.append(f"{r['class']:>3}  {r['name']:<{name_width}}  {iou}  {acc}")
    return "\n".join(lines)


def metrics_to_json(
    metrics: dict[str, object], class_names: list[str] | None = None
) -> dict[str, object]:
    """A JSON-safe copy (``nan`` → ``None``); with names, per-class values become name maps."""
    out: dict[str, object] = json.loads(json.dumps(metrics), parse_constant=lambda _: None)
    if class_names is not None and "IoU" in metrics:
        rows = per_class_table(out, class_names)
        out["per_class"] = {str(r["name"]): {"IoU": r["IoU"], "Acc": r["Acc"]} for r in rows}
    return out
