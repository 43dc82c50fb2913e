"""Validate a VSPW-format dataset folder and summarise it (``themask check-data``).

Every problem is collected, never raised on the first one, so one run lists every bad file:
unreadable split files, missing video folders, frames that cannot be decoded, missing masks,
masks that are not single-channel, masks of another size than their frame and label values
outside ``{0..K, 255}``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from themask.data.vspw import (
    FRAME_DIR,
    MASK_DIR,
    MASK_SUFFIX,
    NUM_CLASSES,
    DataError,
    PathLike,
    list_frames,
    read_frame,
    read_raw_label,
    read_split,
)

logger = logging.getLogger(__name__)

DEFAULT_SPLITS = ("train", "val", "test")


@dataclass
class VideoReport:
    """Findings for one video: frame count, frame sizes (H, W), raw-value pixel counts, problems."""

    frames: int = 0
    sizes: Counter = field(default_factory=Counter)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    masks: int = 0
    problems: List[str] = field(default_factory=list)


@dataclass
class CheckReport:
    """Summary of a dataset check; ``ok`` is False when any problem was found."""

    splits: Dict[str, int] = field(default_factory=dict)  # split -> number of videos
    frames: Dict[str, int] = field(default_factory=dict)  # split -> number of frames
    masks: Dict[str, int] = field(default_factory=dict)  # split -> number of masks read
    sizes: Counter = field(default_factory=Counter)  # (H, W) -> number of frames
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_video(
    video_dir: PathLike, *, num_classes: int = NUM_CLASSES, require_masks: bool = True
) -> VideoReport:
    """Decode every frame and mask of one video folder and record every problem found."""
    video_dir = Path(video_dir)
    report = VideoReport()
    frame_dir = video_dir / FRAME_DIR
    if not frame_dir.is_dir():
        report.problems.append(f"{frame_dir}: video folder listed in the split does not exist")
        return report
    frames = list_frames(frame_dir)
    if not frames:
        report.problems.append(f"{frame_dir}: no frames (*.jpg) in the video folder")
    allowed = np.zeros(256, dtype=bool)
    allowed[: num_classes + 1] = True
    allowed[255] = True
    for frame_path in frames:
        report.frames += 1
        try:
            frame_hw: Optional[Tuple[int, int]] = read_frame(frame_path).shape[:2]
            report.sizes[frame_hw] += 1
        except DataError as err:
            report.problems.append(str(err))
            frame_hw = None
        mask_path = video_dir / MASK_DIR / (frame_path.stem + MASK_SUFFIX)
        if not mask_path.is_file():
            if require_masks:
                report.problems.append(f"{mask_path}: mask missing for frame {frame_path.name}")
            continue
        try:
            raw = read_raw_label(mask_path)
        except DataError as err:
            report.problems.append(str(err))
            continue
        report.masks += 1
        if raw.max(initial=0) > 255 or raw.min(initial=0) < 0:
            report.problems.append(
                f"{mask_path}: label values must be in {{0..{num_classes}, 255}}, "
                f"found range {int(raw.min())}..{int(raw.max())}"
            )
            continue
        counts = np.bincount(raw.astype(np.int64).ravel(), minlength=256)
        report.histogram += counts
        bad = np.flatnonzero((counts > 0) & ~allowed)
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:10])
            report.problems.append(
                f"{mask_path}: label values must be in {{0..{num_classes}, 255}}, found {shown}"
            )
        if frame_hw is not None and raw.shape != frame_hw:
            report.problems.append(
                f"{mask_path}: mask size {raw.shape[1]}x{raw.shape[0]} (WxH) differs from frame "
                f"{frame_path.name} size {frame_hw[1]}x{frame_hw[0]}"
            )
    return report


def _check_video_args(args: Tuple[str, int, bool]) -> VideoReport:
    return check_video(args[0], num_classes=args[1], require_masks=args[2])


def check_dataset(
    root: PathLike,
    *,
    splits: Optional[Sequence[str]] = None,
    num_classes: int = NUM_CLASSES,
    unlabelled_splits: Sequence[str] = (),
    jobs: int = 1,
) -> CheckReport:
    """Check the given splits of a VSPW-format folder (default: those of train/val/test present).

    Videos of ``unlabelled_splits`` may lack masks (masks found there are still checked).
    ``jobs > 1`` checks videos in that many processes.
    """
    root = Path(root)
    report = CheckReport()
    if not root.is_dir():
        report.problems.append(f"{root}: dataset root does not exist")
        return report
    if splits is None:
        splits = [s for s in DEFAULT_SPLITS if (root / f"{s}.txt").is_file()]
        if not splits:
            report.problems.append(f"{root}: no split files (train.txt, val.txt, test.txt) found")
            return report
    tasks: List[Tuple[str, str, int, bool]] = []
    for split in splits:
        try:
            names = read_split(root, split)
        except DataError as err:
            report.problems.append(str(err))
            continue
        report.splits[split] = len(names)
        report.frames[split] = 0
        report.masks[split] = 0
        labelled = split not in unlabelled_splits
        tasks.extend((split, str(root / "data" / n), num_classes, labelled) for n in names)
    arguments = [t[1:] for t in tasks]
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(_check_video_args, arguments, chunksize=4))
    else:
        results = [_check_video_args(a) for a in arguments]
    for (split, *_), video in zip(tasks, results):
        report.frames[split] += video.frames
        report.masks[split] += video.masks
        report.sizes.update(video.sizes)
        report.histogram += video.histogram
        report.problems.extend(video.problems)
    return report


def format_report(report: CheckReport, class_names: Sequence[str]) -> str:
    """Human-readable summary: videos and frames per split, frame sizes, class histogram."""
    lines = []
    for split, videos in report.splits.items():
        lines.append(
            f"{split}: {videos} videos, {report.frames[split]} frames, {report.masks[split]} masks"
        )
    sizes = ", ".join(f"{w}x{h} ({n})" for (h, w), n in report.sizes.most_common(8))
    lines.append(f"frame sizes (WxH): {sizes or 'none'}")
    total = int(report.histogram.sum())
    if total:
        lines.append("label pixels by raw value:")
        names = {0: "others (ignored)", 255: "void (ignored)"}
        names.update({i + 1: n for i, n in enumerate(class_names)})
        for value in np.flatnonzero(report.histogram):
            count = int(report.histogram[value])
            name = names.get(int(value), "INVALID")
            lines.append(f"  {value:>3} {name:<36} {count:>12} {100.0 * count / total:6.2f}%")
        absent = [n for i, n in enumerate(class_names) if report.histogram[i + 1] == 0]
        if absent:
            more = " ..." if len(absent) > 10 else ""
            lines.append(f"classes never present: {len(absent)} ({', '.join(absent[:10])}{more})")
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s):")
        lines.extend(f"  {p}" for p in report.problems)
    else:
        lines.append("no problems found")
    return "\n".join(lines)
