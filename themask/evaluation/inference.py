"""Inference on videos: streaming evaluation of a split, sliding-window prediction.

``evaluate_split`` walks every video of a ``VSPWIndex`` with the test-clip protocol
(reference/vspw.md §2.2–2.3, every frame predicted once), scores each frame at its stored
resolution and feeds the metric accumulators in frame order; nothing but the frames of the
current clip (and those waiting for an earlier frame) is kept.

``predict_video`` / ``StreamingPredictor`` predict an unbounded frame stream with causal
sliding windows (``themask.data.clips.sliding_windows``), encoding every frame once and
reusing its backbone + pixel-decoder features in all the windows it belongs to.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Callable,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from themask.data.clips import TEST_CLIP_STRIDE, causal_window, test_clips
from themask.data.config import DataConfig
from themask.data.description import DatasetDescription
from themask.data.transforms import TestTransform, normalize_frames
from themask.data.vspw import (
    IGNORE_INDEX,
    DataError,
    Video,
    VSPWIndex,
    read_frame,
    read_raw_label,
)
from themask.distributed import get_rank, get_world_size, is_main
from themask.evaluation.metrics import (
    PUBLISHED_VC_SKIP,
    SegmentationAccumulator,
    VideoConsistencyAccumulator,
    all_reduce_sum_,
)
from themask.evaluation.visualize import save_label_png
from themask.io import PathLike
from themask.precision import AmpSpec, autocast_context

logger = logging.getLogger(__name__)

__all__ = [
    "EvalReport",
    "evaluate_data",
    "evaluate_split",
    "predict_video",
    "scores_to_labels",
    "FramePrediction",
    "StreamingPredictor",
]

Transform = Callable[[List[np.ndarray]], Tensor]  # list of (H, W, 3) uint8 → (T, 3, h, w)
def upload(x: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory without blocking the host."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def network_input(transform: Transform, frames: List[np.ndarray], device: torch.device) -> Tensor:
    """``transform(frames)`` (T, 3, h, w) on ``device``; a ``TestTransform``'s frames travel as
    uint8 and are normalised there (4x less traffic)."""
    if isinstance(transform, TestTransform):
        return normalize_frames(upload(transform.resize(frames), device))
    return upload(transform(frames), device)


def scores_to_labels(scores: Tensor, size: Tuple[int, int]) -> Tensor:
    """Class scores (T, K, h, w) → labels (T, H, W) int64 at ``size`` = (H, W).

    Scores are resized bilinearly (align_corners False) one frame at a time, so a K×H×W
    float map of one frame is the largest temporary.
    """
    labels = []
    for frame_scores in scores:
        resized = frame_scores.float()[None]
        if tuple(resized.shape[-2:]) != tuple(size):
            resized = F.interpolate(resized, size=size, mode="bilinear", align_corners=False)
        labels.append(resized[0].argmax(dim=0))
    return torch.stack(labels)


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; afterwards every submodule gets its own previous mode back
    (a trainer may keep frozen parts in eval mode while the rest trains)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def evaluate_split(
    model: nn.Module,
    index: VSPWIndex,
    *,
    clip_len: int,
    transform: Transform,
    device: Union[str, torch.device],
    num_classes: Optional[int] = None,
    write_dir: Optional[PathLike] = None,
    palette: Optional[np.ndarray] = None,
    amp: AmpSpec = None,
    vc_lengths: Sequence[int] = (8, 16),
    vc_gt: str = "train_id",
    vc_rule: str = "published",
    clip_stride: int = TEST_CLIP_STRIDE,
    max_videos: Optional[int] = None,
    distributed: bool = False,
    progress: bool = True,
) -> "EvalReport":
    """Predict every frame of ``index`` with test clips of ``clip_len`` frames and score it.

    ``model(frames (1, T, 3, h, w))`` in eval mode must return class scores (1, T, K, h, w);
    ``transform`` maps the clip's original frames to the network input (T, 3, h, w).
    Scores are resized to each frame's stored size, argmax'ed and compared with the GT.
    Frames without a mask (sparse datasets) are predicted as context but not scored, and
    mVC sees only the masked frames, as the published scripts (they list the mask folder).
    ``num_classes`` defaults to the index's dataset description.

    ``vc_gt`` picks the GT encoding of mVC (see ``VideoConsistencyAccumulator``):
    ``"train_id"`` (0 and 255 both ignore; the CFFM script, default) or ``"raw"`` (raw PNG
    values; the VSPW authors' script). ``vc_rule``: ``"published"`` skips videos of at most
    16 (masked) frames for every mVC_n (VSS-CFFM ``VC_perclip.py``, the published tables);
    ``"per_length"`` skips those of at most n frames for mVC_n. ``write_dir``: also write
    ``<dir>/<video>/<stem>.png`` ('P' mode, train ids, ``palette``).
    ``distributed=True`` (all ranks must call): the videos are split over the processes and
    the metric sums reduced, so every rank returns the same result; with ``False`` the calling
    process evaluates everything alone (e.g. rank 0 during training).

    Returns an ``EvalReport``: the dict of :func:`themask.evaluation.metrics.segmentation_metrics`
    plus ``mVC<n>`` per window length, ``num_videos`` and ``num_frames`` (frames scored).
    """
    if vc_gt not in ("train_id", "raw"):
        raise ValueError(f"vc_gt must be 'train_id' or 'raw', got {vc_gt!r}")
    if vc_rule not in ("published", "per_length"):
        raise ValueError(f"vc_rule must be 'published' or 'per_length', got {vc_rule!r}")
    description = index.description
    num_classes = num_classes or description.num_classes
    if write_dir is not None and palette is None:
        raise ValueError("evaluate_split: write_dir needs a palette for the prediction PNGs")
    if not index.labelled:
        raise ValueError(f"evaluate_split: split '{index.split}' of {index.root} has no masks")
    device = torch.device(device)
    net = _unwrap(model)
    seg = SegmentationAccumulator(num_classes=num_classes, ignore_index=IGNORE_INDEX, device=device)
    skip = PUBLISHED_VC_SKIP if vc_rule == "published" else None
    vcs = {n: VideoConsistencyAccumulator(n, skip_up_to=skip, device=device) for n in vc_lengths}
    videos = index.videos[:max_videos] if max_videos is not None else index.videos
    mine = videos[get_rank() :: get_world_size()] if distributed else videos
    num_scored = 0
    bar = tqdm(
        total=sum(len(v) for v in mine),
        desc=f"eval {index.split}",
        unit="frame",
        disable=not (progress and (is_main() or not distributed)),
    )
    with _eval_mode(net), bar:
        for video in mine:
            for vc in vcs.values():
                vc.start_video()
            predictions = _predict_in_frame_order(
                net, video, clip_len=clip_len, clip_stride=clip_stride, transform=transform,
                device=device, amp=amp,
            )
            scored = 0
            for frame, pred in predictions:  # pred: (H, W) int64
                mask_path = video.mask_path(frame)
                if mask_path is not None:
                    _score_frame(mask_path, pred, seg, vcs, description, vc_gt)
                    scored += 1
                if write_dir is not None:
                    save_label_png(
                        pred.to("cpu", torch.uint8).numpy(),
                        Path(write_dir) / video.name / f"{video.frame_paths[frame].stem}.png",
                        palette,
                    )
                bar.update(1)
            for vc in vcs.values():
                vc.end_video()
            num_scored += scored
    counts = torch.tensor([len(mine), num_scored], dtype=torch.float64, device=device)
    if distributed:
        seg.all_reduce()
        for vc in vcs.values():
            vc.all_reduce()
        all_reduce_sum_(counts)
    results = EvalReport(seg.compute())
    for n, vc in vcs.items():
        results[f"mVC{n}"] = vc.compute()
    results["num_videos"] = int(counts[0])
    results["num_frames"] = int(counts[1])
    return results


class EvalReport(dict):
    """Result dict of :func:`evaluate_split` (fractions in [0, 1]; ``nan`` = undefined)."""

    SUMMARY_KEYS = ("mIoU", "mIoU_present", "WIoU", "aAcc", "mAcc")

    def summary(self) -> Dict[str, float]:
        """The scalar metrics: both mIoU variants, WIoU, aAcc, mAcc and every ``mVC<n>``."""
        keys = list(self.SUMMARY_KEYS) + sorted(
            (k for k in self if k.startswith("mVC")), key=lambda k: int(k[3:])
        )
        return {k: float(self[k]) for k in keys}


def evaluate_data(
    model: nn.Module,
    data: DataConfig,
    *,
    split: str,
    clip_len: int,
    device: Union[str, torch.device],
    max_videos: Optional[int] = None,
    write_dir: Optional[PathLike] = None,
    amp: AmpSpec = None,
    vc_gt: str = "train_id",
    vc_rule: str = "published",
    distributed: bool = False,
    progress: bool = True,
) -> EvalReport:
    """:func:`evaluate_split` on ``<data.root>/<split>`` with the settings of a ``DataConfig``:
    test transform from ``data.scale`` / ``data.size_divisor``, class count and palette from
    the dataset description. The other arguments are those of ``evaluate_split``.
    """
    description = data.description
    return evaluate_split(
        model,
        VSPWIndex(data.root, split, description=description),
        clip_len=clip_len,
        transform=TestTransform(scale=data.scale, size_divisor=data.size_divisor),
        device=device,
        write_dir=write_dir,
        palette=description.palette,
        amp=amp,
        vc_gt=vc_gt,
        vc_rule=vc_rule,
        max_videos=max_videos,
        distributed=distributed,
        progress=progress,
    )


def _predict_in_frame_order(
    net: nn.Module,
    video: Video,
    *,
    clip_len: int,
    clip_stride: int,
    transform: Transform,
    device: torch.device,
    amp: AmpSpec,
) -> Iterator[Tuple[int, Tensor]]:
    """Yield ``(frame index, labels (H, W))`` of every frame of ``video`` in frame order.

    Test clips may come out of frame order (T = 2: {0, 3}, {1, 4}, {2, 5}); a frame waits
    only until all earlier frames are predicted.
    """
    pending: Dict[int, Tensor] = {}
    next_frame = 0
    size = None  # (H, W) of the video's first frame read
    for clip in test_clips(len(video), clip_len, stride=clip_stride):
        frames = [read_frame(video.frame_paths[i]) for i in clip]
        size = size or frames[0].shape[:2]
        for index, frame in zip(clip, frames):
            if frame.shape[:2] != size:
                (h0, w0), (h1, w1) = size, frame.shape[:2]
                raise DataError(
                    f"video {video.name}: frame {video.frame_paths[index].name} is {w1}x{h1}, "
                    f"earlier frames {w0}x{h0}; the frames of a video must share one size"
                )
        inputs = network_input(transform, frames, device).unsqueeze(0)  # (1, T, 3, h, w)
        with torch.no_grad(), autocast_context(amp, device):
            scores = net(inputs)  # (1, T, K, h, w)
        pending.update(zip(clip, scores_to_labels(scores[0], frames[0].shape[:2])))
        while next_frame in pending:
            yield next_frame, pending.pop(next_frame)
            next_frame += 1
    if pending or next_frame != len(video):
        raise RuntimeError(f"test clips of {video.name} did not cover every frame once")


def _score_frame(
    mask_path: Path,
    pred: Tensor,
    seg: SegmentationAccumulator,
    vcs: Dict[int, VideoConsistencyAccumulator],
    description: DatasetDescription,
    vc_gt: str,
) -> None:
    target = upload(torch.from_numpy(description.read_label(mask_path)), pred.device)
    if target.shape != pred.shape:
        raise DataError(
            f"{mask_path}: mask size {tuple(target.shape)} differs from its frame's "
            f"{tuple(pred.shape)}"
        )
    seg.update(pred, target)
    if vcs:
        vc_target = target
        if vc_gt == "raw":
            vc_target = upload(torch.from_numpy(np.array(read_raw_label(mask_path))), pred.device)
        for vc in vcs.values():
            vc.update(pred, vc_target)


@dataclass
class FramePrediction:
    """Prediction of one frame of a stream: ``frame`` (H, W, 3) uint8, ``labels`` (H, W) int64."""

    index: int
    frame: np.ndarray
    labels: np.ndarray


class StreamingPredictor:
    """Causal sliding-window prediction with per-frame feature reuse.

    The window of frame t is ``[t − (T−1)·step, …, t − step, t]`` (indices below 0 clamped
    to 0), the same as ``themask.data.clips.sliding_windows``; the scores of its last frame
    are kept. Each pushed frame is encoded once (``model.encode``); the decoder runs on the
    concatenated features of the window (``FrameFeatures.cat``), so only the last
    (T−1)·step + 1 frames' features are held. A single-frame model uses T = 1.
    Put the model in eval mode first (``predict_video`` does).
    """

    def __init__(self, model: nn.Module, *, clip_len: int, step: int = TEST_CLIP_STRIDE) -> None:
        if clip_len < 1 or step < 1:
            raise ValueError(f"clip_len and step must be >= 1, got {clip_len} and {step}")
        self.model = _unwrap(model)
        self.clip_len = clip_len if getattr(self.model, "is_temporal", True) else 1
        if self.clip_len != clip_len:
            logger.info("single-frame model: predicting with clip_len 1 instead of %d", clip_len)
        self.step = step
        self._history: Deque = deque(maxlen=(self.clip_len - 1) * step + 1)
        self._count = 0

    def reset(self) -> None:
        """Start a new stream (forget the cached features)."""
        self._history.clear()
        self._count = 0

    def window(self, t: int) -> List[int]:
        """Frame indices of the window that predicts frame ``t``."""
        return causal_window(t, self.clip_len, step=self.step)

    @torch.no_grad()
    def push(self, frame: Tensor) -> Tensor:
        """Add the next frame (3, h, w), normalised; return its class scores (K, h, w)."""
        features = self.model.encode(frame[None, None])  # one frame: B = T = 1
        self._history.append(features)
        t = self._count
        self._count += 1
        first = t - len(self._history) + 1  # frame index of self._history[0]
        parts = [self._history[i - first] for i in self.window(t)]
        clip_features = parts[0].cat(parts) if len(parts) > 1 else parts[0]
        predictions = self.model.decode(clip_features, batch=1, frames=len(parts))
        scores = self.model.semantic_scores(predictions, tuple(frame.shape[-2:]))
        return scores[0, -1]  # (K, h, w)


def predict_video(
    model: nn.Module,
    frames_iter: Iterable[np.ndarray],
    *,
    clip_len: int,
    transform: Transform,
    device: Union[str, torch.device],
    step: int = TEST_CLIP_STRIDE,
    amp: AmpSpec = None,
) -> Iterator[FramePrediction]:
    """Predict a stream of (H, W, 3) uint8 RGB frames; yields one ``FramePrediction`` per frame.

    Uses ``StreamingPredictor`` (causal windows of ``clip_len`` frames ``step`` apart, each
    frame encoded once); scores are resized to the frame's size and argmax'ed. Frames may
    differ in size: where the network input size changes, the windows start afresh (as at
    the first frame), so every frame is segmented at its own size.
    """
    device = torch.device(device)
    net = _unwrap(model)
    predictor = StreamingPredictor(net, clip_len=clip_len, step=step)
    input_size = None
    with _eval_mode(net):
        for t, frame in enumerate(frames_iter):
            inputs = network_input(transform, [frame], device)[0]  # (3, h, w)
            if inputs.shape[-2:] != input_size:
                predictor.reset()
                input_size = inputs.shape[-2:]
            with autocast_context(amp, device):
                scores = predictor.push(inputs)
            labels = scores_to_labels(scores[None], frame.shape[:2])[0]
            yield FramePrediction(index=t, frame=frame, labels=labels.cpu().numpy())
