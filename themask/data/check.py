"""``themask check-data``: every problem of a dataset folder, a summary; a draft description."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from themask.data.description import (
    DESCRIPTION_FILE,
    VSPW_FRAMES,
    VSPW_MASKS,
    DatasetDescription,
    DescriptionError,
    load_description,
)
from themask.data.vspw import (
    DataError,
    PathLike,
    check_mask_size,
    map_raw_labels,
    read_frame,
    read_raw_label,
    read_split,
    scan_video,
)

# (frames, masks) folder patterns tried by ``write_draft_description``: VSPW, then DAVIS
KNOWN_LAYOUTS = ((VSPW_FRAMES, VSPW_MASKS), ("JPEGImages/{video}", "Annotations/{video}"))
_zeros = partial(np.zeros, 256, dtype=np.int64)  # a count per stored mask value


@dataclass
class CheckReport:
    """Findings of a dataset check, or of one of its videos; ``ok``: no problem found."""

    description: DatasetDescription
    splits: dict[str, int] = field(default_factory=dict)  # split -> number of videos
    frames: Counter = field(default_factory=Counter)  # split -> number of frames
    masks: Counter = field(default_factory=Counter)  # split -> number of masks read
    sizes: Counter = field(default_factory=Counter)  # (H, W) -> number of frames
    histogram: np.ndarray = field(default_factory=_zeros)  # stored value -> pixels
    mask_counts: np.ndarray = field(default_factory=_zeros)  # stored value -> masks with it
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_video(
    root: PathLike, split: str, name: str, description: DatasetDescription, require_masks: bool
) -> CheckReport:
    """Decode every frame and mask of one video of ``split``; record every problem found."""
    video, problems = scan_video(root, name, description, require_masks=require_masks)
    report = CheckReport(description, problems=problems)
    if video is None or video.mask_paths is None:
        return report
    for frame_path, mask_path in zip(video.frame_paths, video.mask_paths):
        report.frames[split] += 1
        try:
            frame_hw: tuple[int, int] | None = read_frame(frame_path).shape[:2]
            report.sizes[frame_hw] += 1
        except DataError as err:
            problems.append(str(err))
            frame_hw = None
        if mask_path is None:
            continue
        raw = None
        try:
            raw = read_raw_label(mask_path)
            map_raw_labels(raw, source=str(mask_path), **description.encoding)
        except DataError as err:  # names the file (and the bad values)
            problems.append(str(err))
        if raw is None or raw.min(initial=0) < 0 or raw.max(initial=0) > 255:
            continue
        report.masks[split] += 1
        counts = np.bincount(raw.astype(np.int64).ravel(), minlength=256)
        report.histogram += counts
        report.mask_counts += counts > 0
        if frame_hw is not None:
            try:
                check_mask_size(mask_path, raw.shape, frame_path, frame_hw)
            except DataError as err:
                problems.append(str(err))
    if len(report.sizes) > 1:
        sizes = ", ".join(f"{w}x{h} ({n})" for (h, w), n in report.sizes.items())
        problems.append(
            f"{video.frame_paths[0].parent}: video {name} has frames of different sizes: "
            f"{sizes} (WxH, frames)"
        )
    return report


def check_dataset(
    root: PathLike,
    *,
    splits: Sequence[str] | None = None,
    unlabelled_splits: Sequence[str] = (),
    jobs: int = 1,
) -> CheckReport:
    """Check ``splits`` (default: the description's, or those of train/val/test present) of the
    dataset at ``root``; videos of ``unlabelled_splits`` may lack masks. ``jobs`` processes."""
    root = Path(root)
    description = load_description(root)
    report = CheckReport(description)
    if not root.is_dir():
        report.problems.append(f"{root}: dataset root does not exist")
        return report
    if splits is None:  # the description's, else those with a split file
        splits = list(description.splits or ()) or [
            s for s in ("train", "val", "test") if description.split_file(root, s).is_file()
        ]
        if not splits:
            report.problems.append(f"{root}: no split files (train.txt, val.txt, test.txt) found")
            return report
    tasks: list[tuple[str, str, str, DatasetDescription, bool]] = []
    for split in splits:
        try:
            names = read_split(description.split_file(root, split))
        except DataError as err:
            report.problems.append(str(err))
            continue
        report.splits[split] = len(names)
        labelled = split not in unlabelled_splits
        tasks += [(str(root), split, name, description, labelled) for name in names]
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            videos = list(pool.map(check_video, *zip(*tasks), chunksize=4))
    else:
        videos = [check_video(*task) for task in tasks]
    for video in videos:  # its findings counted in the report
        for name in ("frames", "masks", "sizes", "histogram", "mask_counts", "problems"):
            setattr(report, name, getattr(report, name) + getattr(video, name))
    return report


def format_report(report: CheckReport) -> str:
    """Summary: videos, frames, masks per split, frame sizes, masks and pixels per stored value."""
    description = report.description
    lines = [f"description: {description.source}"] + [
        f"{split}: {videos} videos, {report.frames[split]} frames, {report.masks[split]} masks"
        for split, videos in report.splits.items()
    ]
    sizes = ", ".join(f"{w}x{h} ({n})" for (h, w), n in report.sizes.most_common(8))
    lines.append(f"frame sizes (WxH): {sizes or 'none'}")
    total = int(report.histogram.sum())
    if total:
        width = max(12, *(len(c) for c in description.classes))
        header = f"{'id':>3}  {'class':<{width}}  {'value':>5}  {'frames':>7}  {'pixels':>12}"
        lines.append(f"{header}  {'share':>7}")
        classes = list(zip(description.classes, description.class_values))
        rows = [(str(i), c, v) for i, (c, v) in enumerate(classes)]
        rows += [("-", "(ignored)", v) for v in description.ignore_values]
        rows += [
            ("-", "(INVALID)", int(v))
            for v in np.flatnonzero(report.histogram)
            if v not in description.ignore_values and v not in description.class_values
        ]
        for ident, name, value in rows:
            pixels = int(report.histogram[value])
            lines.append(
                f"{ident:>3}  {name:<{width}}  {value:>5}  {int(report.mask_counts[value]):>7}  "
                f"{pixels:>12}  {100.0 * pixels / total:6.2f}%"
            )
        absent = [c for c, v in classes if report.histogram[v] == 0]
        if absent:
            more = " ..." if len(absent) > 10 else ""
            lines.append(f"classes never present: {len(absent)} ({', '.join(absent[:10])}{more})")
    problems = [f"{len(report.problems)} problem(s):", *(f"  {p}" for p in report.problems)]
    lines += problems if report.problems else ["no problems found"]
    return "\n".join(lines)


def write_draft_description(
    root: PathLike, *, frames: str | None = None, masks: str | None = None
) -> Path:
    """Write a draft ``ROOT/dataset.yaml`` (never over one), a class per stored mask value, from
    the layout ``frames``/``masks`` (default: the first of ``KNOWN_LAYOUTS`` with videos)."""
    root = Path(root)
    out = root / DESCRIPTION_FILE
    if out.exists():
        raise DataError(f"{out} already exists; edit it or remove it to draft a new one")
    layouts = [(frames, masks)] if frames and masks else list(KNOWN_LAYOUTS)
    for frames, masks in layouts:
        if "{video}" not in f"{frames}" or "{video}" not in f"{masks}":
            raise DescriptionError(f"--frames and --masks need a {{video}} part, got {frames}")
        at = len(root.parts) + Path(frames).parts.index("{video}")  # the video name's part
        folders = root.glob(frames.replace("{video}", "*"))
        videos = sorted(p.parts[at] for p in folders if p.is_dir())
        if videos:
            break
    else:
        tried = "; ".join(f"{f} + {m}" for f, m in layouts)
        raise DataError(f"{root}: no video folders found (layouts tried: {tried})")
    layout = DatasetDescription(classes=("?",), frames=frames, masks=masks)
    histogram, sparse = _zeros(), False
    for name in videos:
        video, _ = scan_video(root, name, layout, require_masks=False)
        found = [m for m in video.mask_paths or () if m is not None] if video else []
        sparse = sparse or video is None or len(found) < len(video)
        for mask in found:
            histogram += np.bincount(read_raw_label(mask).astype(np.int64).ravel(), minlength=256)
    values = [int(v) for v in np.flatnonzero(histogram)]
    if not values:
        raise DataError(f"{root}: no masks found under {masks}")
    ignore = [255] if 255 in values else []
    top = max([v for v in values if v not in ignore], default=0)
    split_files = sorted(root.glob("*.txt")) + sorted(root.glob("ImageSets/*.txt"))
    draft = DatasetDescription(
        classes=tuple(f"class_{v}" for v in range(top + 1)),
        ignore_values=tuple(ignore),
        label_offset=0,
        frames=frames,
        masks=masks,
        splits={p.stem: p.relative_to(root).as_posix() for p in split_files} or None,
        sparse=sparse,
    )
    listed = ", ".join(f"{v} ({histogram[v]} px)" for v in values)
    header = (
        f"# Draft written by `themask check-data --init-description` for {len(videos)} videos.\n"
        f"# Stored mask values found: {listed}.\n"
        "# Replace the placeholder class names (train id = stored value - label_offset); mark\n"
        "# values that are not classes in ignore_values (and raise label_offset if needed).\n"
    )
    if not split_files:
        header += "# No split files found: add splits: {train: FILE, val: FILE}\n"
    out.write_text(header + draft.to_yaml(palette=False), encoding="utf-8")
    return out
