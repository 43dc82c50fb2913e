"""VSPW metrics (docs/VSPW.md §3): confusion matrix → mIoU, WIoU, accuracies; mVC_n.

Everything is streaming: the accumulators hold one K×K matrix, resp. two counters plus a
few per-pixel maps of the current video, never a whole split of predictions. Updates never
wait for the device (no host reads per frame): range checks and sums stay on the device and
are read once, by ``compute``.
Values are fractions in [0, 1] (the CLI prints them ×100); ``nan`` marks an undefined value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from themask.distributed import all_reduce

ArrayLike = Tensor | np.ndarray

__all__ = [
    "segmentation_metrics",
    "SegmentationAccumulator",
    "VideoConsistencyAccumulator",
    "format_metrics_table",
    "metrics_to_json",
    "per_class_table",
]


def _as_tensor(x: ArrayLike) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _confusion_counts(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """(K·K + 3,) int64 on pred's device, without a host sync: the row-major confusion matrix,
    then the pixels with an out-of-range target, those with an out-of-range prediction (of
    the others) and the ignored ones."""
    if pred.shape != target.shape:
        raise ValueError(
            f"confusion matrix: pred shape {tuple(pred.shape)} != target shape "
            f"{tuple(target.shape)}"
        )
    k2 = num_classes * num_classes
    target = target.to(pred.device).reshape(-1).long()
    pred = pred.reshape(-1).long()
    ignored = target == ignore_index
    bad_target = ~ignored & ((target < 0) | (target >= num_classes))
    bad_pred = ~ignored & ~bad_target & ((pred < 0) | (pred >= num_classes))
    index = torch.where(bad_target, k2, target * num_classes + pred)
    index = torch.where(bad_pred, k2 + 1, index)
    index = torch.where(ignored, k2 + 2, index)
    counts = torch.zeros(k2 + 3, dtype=torch.int64, device=pred.device)
    return counts.index_add_(0, index, torch.ones_like(index))


def _check_ranges(counts: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise if ``_confusion_counts`` saw out-of-range values (reads two numbers back)."""
    k2 = num_classes * num_classes
    bad_target, bad_pred = counts[k2 : k2 + 2].tolist()
    if bad_target:
        raise ValueError(
            f"confusion matrix: target values must be in [0, {num_classes}) or {ignore_index}; "
            f"{bad_target} pixel(s) are not"
        )
    if bad_pred:
        raise ValueError(
            f"confusion matrix: predicted values must be in [0, {num_classes}); "
            f"{bad_pred} pixel(s) are not"
        )


def segmentation_metrics(conf: ArrayLike) -> dict[str, object]:
    """Metrics of a (K, K) confusion matrix (rows = GT), docs/VSPW.md §3.1–3.2.

    Returns a dict of
      ``mIoU``          mmseg variant: mean IoU over classes with union > 0;
      ``mIoU_present``  Evaluator variant: mean IoU over classes present in the GT;
      ``WIoU``          frequency-weighted IoU, Σ_c (g_c / Σ g) · IoU_c;
      ``aAcc``          pixel accuracy Σ I_c / Σ g_c;
      ``mAcc``          mean over classes present in the GT of I_c / g_c;
      ``IoU``, ``Acc``  per-class lists (``nan`` where undefined).
    """
    m = _as_tensor(conf).detach().to("cpu", torch.float64)
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"segmentation_metrics: expected a square matrix, got {tuple(m.shape)}")
    inter = m.diagonal()
    gt = m.sum(dim=1)
    predicted = m.sum(dim=0)
    union = gt + predicted - inter
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, inter / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, inter / gt.clamp(min=1), nan)
    present = gt > 0
    total = gt.sum()

    def mean_or_nan(values: Tensor) -> float:
        return float(values.mean()) if values.numel() else math.nan

    return {
        "mIoU": mean_or_nan(iou[union > 0]),
        "mIoU_present": mean_or_nan(iou[present]),
        "WIoU": float((gt[present] / total * iou[present]).sum()) if total > 0 else math.nan,
        "aAcc": float(inter.sum() / total) if total > 0 else math.nan,
        "mAcc": mean_or_nan(acc[present]),
        "IoU": iou.tolist(),
        "Acc": acc.tolist(),
    }


def scalar_metrics(results: dict[str, object]) -> dict[str, float]:
    """The scalar entries of an ``evaluate_split`` result (per-class lists left out)."""
    return {
        k: float(v)
        for k, v in results.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class SegmentationAccumulator:
    """Streaming confusion matrix over a split; ``compute()`` → :func:`segmentation_metrics`."""

    def __init__(
        self,
        *,
        num_classes: int,
        ignore_index: int = 255,
        device: str | torch.device = "cpu",
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        k2 = num_classes * num_classes
        # the matrix, then out-of-range and ignored pixel counts (see _confusion_counts)
        self.counts = torch.zeros(k2 + 3, dtype=torch.int64, device=self.device)
        self.matrix = self.counts[:k2].view(num_classes, num_classes)

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """Add the pixels of ``pred`` / ``target`` (same shape, e.g. (H, W) or (T, H, W)).
        Values out of range are counted here and reported by ``compute``."""
        pred_t = _as_tensor(pred).to(self.device)
        self.counts += _confusion_counts(
            pred_t, _as_tensor(target), self.num_classes, self.ignore_index
        )

    def all_reduce(self) -> None:
        """Sum the counts over all processes (call once, on every rank, before ``compute``)."""
        self.counts.copy_(all_reduce(self.counts))

    def compute(self) -> dict[str, object]:
        _check_ranges(self.counts, self.num_classes, self.ignore_index)
        return segmentation_metrics(self.matrix)


PUBLISHED_VC_SKIP = 16  # VSS-CFFM VC_perclip.py: clip_num = 16, checked before both n


class VideoConsistencyAccumulator:
    """mVC_n exactly as docs/VSPW.md §3.3 (official VSPW / CFFM scripts), streaming.

    Per video of N frames, windows start at i = 0 … N−n−1 (N − n windows: the window that
    ends on the last frame is not counted, as in the official script) and a video with
    N ≤ ``skip_up_to`` contributes none. ``skip_up_to=PUBLISHED_VC_SKIP`` (16, for every n) is
    the rule of VSS-CFFM ``VC_perclip.py``, whose numbers THE-Mask and its lineage publish;
    ``skip_up_to=None`` (= n) is the per-length rule of the VSPW authors' script.
    VC of a window = |S ∩ T| / |S|, S the pixels whose GT is equal in all n frames of the
    window and T those whose prediction is; windows with empty S are dropped; mVC_n = mean
    over all windows of all videos (window-weighted, not per video).

    Feed frames in temporal order: ``start_video()``, ``update(pred, gt)`` per frame,
    ``end_video()``. Memory does not grow with the video: instead of keeping the last n
    frames, each pixel keeps the length of its current run of equal values (one previous
    frame plus two run-length maps), which decides window stability in O(H·W) per frame.
    A window's value is committed only when the frame after it arrives, which drops the
    last window of each video.

    GT encoding: equality is all that matters. Feeding train ids (VSPW 0 "others" and 255
    "void" both → 255) reproduces the CFFM script that THE-Mask's lineage uses; feeding raw
    PNG values reproduces the dataset authors' script (0 ↔ 255 flips count as unstable).
    ``themask.evaluation.inference.evaluate_split`` lets the caller choose.
    """

    def __init__(
        self,
        n: int,
        *,
        skip_up_to: int | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if n < 2:
            raise ValueError(f"VideoConsistencyAccumulator: window length n must be >= 2, got {n}")
        self.n = n
        self.skip_up_to = n if skip_up_to is None else skip_up_to
        self.device = torch.device(device)
        # [sum of window VC values, number of windows with non-empty S]
        self.totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._in_video = False
        self._reset_video()

    def _reset_video(self) -> None:
        self._prev_gt: Tensor | None = None
        self._prev_pred: Tensor | None = None
        self._run_gt: Tensor | None = None  # (H, W) frames since the GT value last changed
        self._run_pred: Tensor | None = None
        # [VC, 1] of the window ending on the previous frame ([0, 0] if its S is empty)
        self._pending: Tensor | None = None
        # this video's [sum of VC, windows], added to ``totals`` when the video is long enough
        self._video_totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.frames_seen = 0

    def start_video(self) -> None:
        if self._in_video:
            raise RuntimeError("VideoConsistencyAccumulator: start_video() before end_video()")
        self._reset_video()
        self._in_video = True

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Add the next frame of the current video. pred, gt: (H, W) integer maps."""
        if not self._in_video:
            raise RuntimeError("VideoConsistencyAccumulator: update() outside start/end_video()")
        pred_t = _as_tensor(pred).to(self.device)
        gt_t = _as_tensor(gt).to(self.device)
        if pred_t.shape != gt_t.shape or pred_t.dim() != 2:
            raise ValueError(
                f"VideoConsistencyAccumulator: expected pred and gt of one (H, W) shape, got "
                f"{tuple(pred_t.shape)} and {tuple(gt_t.shape)}"
            )
        if self._pending is not None:  # a later frame exists, so that window is counted
            self._video_totals += self._pending
            self._pending = None
        if self._prev_gt is None:
            self._run_gt = torch.zeros(gt_t.shape, dtype=torch.int32, device=self.device)
            self._run_pred = torch.zeros_like(self._run_gt)
        else:
            assert self._run_gt is not None and self._run_pred is not None  # set with _prev_gt
            assert self._prev_pred is not None
            if self._prev_gt.shape != gt_t.shape:
                raise ValueError(
                    f"VideoConsistencyAccumulator: frame size changed within a video: "
                    f"{tuple(self._prev_gt.shape)} -> {tuple(gt_t.shape)}"
                )
            self._run_gt = torch.where(gt_t == self._prev_gt, self._run_gt + 1, 0)
            self._run_pred = torch.where(pred_t == self._prev_pred, self._run_pred + 1, 0)
        self._prev_gt, self._prev_pred = gt_t, pred_t
        self.frames_seen += 1
        if self.frames_seen >= self.n:
            # The window of the last n frames is stable where the run spans n−1 equalities.
            stable_gt = self._run_gt >= self.n - 1
            stable_pred = self._run_pred >= self.n - 1
            size = stable_gt.sum().double()  # stays on the device: no sync per frame
            value = (stable_gt & stable_pred).sum().double() / size.clamp(min=1)
            self._pending = torch.stack([value, (size > 0).double()])

    def end_video(self) -> None:
        """Close the current video (its last window is dropped, see the class docstring)."""
        if not self._in_video:
            raise RuntimeError("VideoConsistencyAccumulator: end_video() without start_video()")
        if self.frames_seen > self.skip_up_to:
            self.totals += self._video_totals
        self._in_video = False
        self._reset_video()

    def all_reduce(self) -> None:
        """Sum the window totals over all processes (call on every rank before ``compute``)."""
        self.totals.copy_(all_reduce(self.totals))

    def compute(self) -> float:
        """mVC_n as a fraction; ``nan`` when no window was counted."""
        total, count = self.totals.tolist()
        return total / count if count > 0 else math.nan


def per_class_table(
    metrics: Mapping[str, Any], class_names: list[str] | None = None
) -> list[dict[str, object]]:
    """Rows ``{"class", "name", "IoU", "Acc"}`` of the per-class results of a metrics dict."""
    ious = list(metrics["IoU"])
    accs = list(metrics["Acc"])
    names = class_names if class_names is not None else [str(i) for i in range(len(ious))]
    if len(names) != len(ious):
        raise ValueError(f"per_class_table: {len(names)} class names for {len(ious)} classes")
    return [
        {"class": i, "name": names[i], "IoU": ious[i], "Acc": accs[i]} for i in range(len(ious))
    ]


def format_percent(value: object, width: int = 6) -> str:
    """A fraction as a percentage with 2 decimals; ``-`` for an undefined (nan) value."""
    v = float(value)  # type: ignore[arg-type]
    return f"{'-':>{width}}" if math.isnan(v) else f"{100 * v:{width}.2f}"


def summarize_metrics(metrics: Mapping[str, object]) -> str:
    """One line of the scalar metrics in percent, e.g. ``mIoU 41.20, aAcc 80.03, mVC16 -``
    (the form of the train log and the train command; the eval table uses the same units)."""
    return ", ".join(
        f"{key} {format_percent(value, 0)}"
        for key, value in metrics.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not key.startswith("num_")
    )


def format_metrics_table(
    metrics: dict[str, object], class_names: list[str] | None = None
) -> str:
    """Printable text: summary lines (×100) then the per-class IoU / accuracy table.

    Reads ``mIoU``, ``mIoU_present``, ``WIoU``, ``aAcc``, ``mAcc``, any ``mVC<n>`` and the
    per-class ``IoU`` / ``Acc`` lists; ``-`` marks undefined values.
    """
    labels = {
        "mIoU": "mIoU (mmseg: classes predicted or present)",
        "mIoU_present": "mIoU (Evaluator: classes present in GT)",
        "WIoU": "Weighted IoU",
        "aAcc": "pixel accuracy (aAcc)",
        "mAcc": "mean class accuracy (mAcc)",
    }
    vc_keys = sorted((k for k in metrics if k.startswith("mVC")), key=lambda k: int(k[3:]))
    for key in vc_keys:
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

    def clean(value: object) -> object:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    out = {k: clean(v) for k, v in metrics.items()}
    if class_names is not None and "IoU" in metrics:
        out["per_class"] = {
            str(r["name"]): {"IoU": clean(r["IoU"]), "Acc": clean(r["Acc"])}
            for r in per_class_table(metrics, class_names)
        }
    return out
