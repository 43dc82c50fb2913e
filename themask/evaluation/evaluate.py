"""Split evaluation: the test clips of docs/VSPW.md §2.2–2.3 over every video, metrics streamed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from themask import distributed as dist_utils
from themask.data.clips import test_clips
from themask.data.transforms import TestTransform
from themask.data.vspw import DataError, VSPWIndex, check_mask_size, read_frame, read_raw_label
from themask.evaluation.metrics import (
    PUBLISHED_VC_SKIP,
    SegmentationAccumulator,
    VideoConsistencyAccumulator,
)
from themask.evaluation.predict import Transform, eval_mode, network_input, scores_to_labels, upload
from themask.evaluation.visualize import save_label_png
from themask.io import PathLike
from themask.precision import AmpSpec, autocast_context

if TYPE_CHECKING:
    from themask.config import RunConfig
    from themask.data.vspw import Video


def evaluate_split(
    model: nn.Module,
    index: VSPWIndex,
    *,
    clip_len: int,
    transform: Transform,
    device: str | torch.device,
    num_classes: int | None = None,
    write_dir: PathLike | None = None,
    palette: np.ndarray | None = None,
    amp: AmpSpec = None,
    vc_lengths: Sequence[int] = (8, 16),
    vc_gt: str = "train_id",
    vc_rule: str = "published",
    max_videos: int | None = None,
    distributed: bool = False,
    progress: bool = True,
) -> dict[str, object]:
    """Metrics, ``mVC<n>`` and counts of the masked frames, each predicted once by test clips
    (``model``: (1, T, 3, h, w) → (1, T, K, h, w)); ``distributed``: each rank scores a share."""
    if vc_gt not in ("train_id", "raw"):
        raise ValueError(f"vc_gt must be 'train_id' or 'raw', got {vc_gt!r}")
    if vc_rule not in ("published", "per_length"):
        raise ValueError(f"vc_rule must be 'published' or 'per_length', got {vc_rule!r}")
    description = index.description
    palette = description.palette if palette is None else palette
    if not index.labelled:
        raise ValueError(f"evaluate_split: split '{index.split}' of {index.root} has no masks")
    device = torch.device(device)
    seg = SegmentationAccumulator(num_classes=num_classes or description.num_classes, device=device)
    skip = PUBLISHED_VC_SKIP if vc_rule == "published" else None
    vcs = {n: VideoConsistencyAccumulator(n, skip_up_to=skip, device=device) for n in vc_lengths}
    videos = index.videos[:max_videos]  # None: all
    mine = videos[dist_utils.get_rank() :: dist_utils.get_world_size()] if distributed else videos
    num_scored = 0
    show = progress and (dist_utils.get_rank() == 0 or not distributed)
    frames = sum(map(len, mine))
    bar = tqdm(total=frames, desc=f"eval {index.split}", unit="frame", disable=not show)
    with eval_mode(model), bar:
        for video in mine:
            for vc in vcs.values():
                vc.start_video()
            predictions = _predict_in_frame_order(
                model, video, clip_len=clip_len, transform=transform, device=device, amp=amp
            )
            for frame, pred in predictions:  # pred: (H, W) int64
                mask_path = video.mask_path(frame)
                if mask_path is not None:
                    target = upload(torch.from_numpy(description.read_label(mask_path)), device)
                    check_mask_size(mask_path, target.shape, video.frame_paths[frame], pred.shape)
                    seg.update(pred, target)
                    if vc_gt == "raw" and vcs:
                        raw = np.array(read_raw_label(mask_path))
                        target = upload(torch.from_numpy(raw), device)
                    for vc in vcs.values():
                        vc.update(pred, target)
                    num_scored += 1
                if write_dir is not None:
                    png = Path(write_dir) / video.name / f"{video.frame_paths[frame].stem}.png"
                    save_label_png(pred.to("cpu", torch.uint8).numpy(), png, palette)
                bar.update(1)
            for vc in vcs.values():
                vc.end_video()
    counts = torch.tensor([len(mine), num_scored], dtype=torch.float64, device=device)
    if distributed:
        seg.all_reduce()
        for vc in vcs.values():
            vc.all_reduce()
        counts = dist_utils.all_reduce(counts)
    results = {**seg.compute(), **{f"mVC{n}": vc.compute() for n, vc in vcs.items()}}
    return dict(results, num_videos=int(counts[0]), num_frames=int(counts[1]))


def evaluate_config(
    model: nn.Module,
    cfg: RunConfig,
    *,
    device: str | torch.device,
    split: str | None = None,
    clip_len: int | None = None,
    write_dir: PathLike | None = None,
    amp: AmpSpec = None,
    vc_gt: str = "train_id",
    vc_rule: str | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """:func:`evaluate_split` with a run config's data and eval settings (DDP: every rank calls)."""
    data, description = cfg.data, cfg.data.description
    return evaluate_split(
        model,
        VSPWIndex(data.root, split or data.val_split, description=description),
        clip_len=clip_len or data.eval_clip_len,
        transform=TestTransform(scale=data.scale, size_divisor=data.size_divisor),
        device=device,
        write_dir=write_dir,
        amp=amp or cfg.eval.amp,
        vc_gt=vc_gt,
        vc_rule=vc_rule or cfg.eval.vc_rule,
        max_videos=cfg.eval.max_videos,
        distributed=dist_utils.is_initialized(),
        progress=progress,
    )


def _predict_in_frame_order(
    net: nn.Module,
    video: Video,
    *,
    clip_len: int,
    transform: Transform,
    device: torch.device,
    amp: AmpSpec,
) -> Iterator[tuple[int, Tensor]]:
    """``(frame index, labels (H, W))`` of every frame in order (a frame predicted early waits)."""
    pending: dict[int, Tensor] = {}
    next_frame, size = 0, None  # size: (H, W) of the video's first frame read
    for clip in test_clips(len(video), clip_len):
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
