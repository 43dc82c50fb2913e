"""Videos on disk (layout and labels of a ``dataset.yaml``, VSPW's by default: docs/VSPW.md §1):
split files, video folders, frame and mask readers (bad stored values: errors); VSPW's classes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from themask.io import PathLike

if TYPE_CHECKING:
    from themask.data.description import DatasetDescription

logger = logging.getLogger(__name__)

NUM_CLASSES = 124
TEST_SCALE = (853, 480)  # (long, short) side of the official test resize
IGNORE_INDEX = 255
MASK_SUFFIX = ".png"
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
_LABEL_MODES = ("L", "P", "I", "I;16")  # single-channel PIL modes: the values are label ids

# VSPW's class names and (124, 3) uint8 palette by train id (ADE20K's first; 6 and 48 share one)
_TABLE = np.loadtxt(Path(__file__).with_name("vspw_classes.txt"), dtype=str)
CLASS_NAMES: tuple[str, ...] = tuple(str(name) for name in _TABLE[:, 0])
PALETTE: np.ndarray = _TABLE[:, 1:].astype(np.uint8)


class DataError(ValueError):
    """A dataset file or folder is missing or malformed; the message names it."""


class CorruptFileError(DataError):
    """An image or mask file exists but cannot be decoded (0-byte, truncated, not an image)."""


def map_raw_labels(
    raw: np.ndarray,
    *,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
    offset: int = 1,
    ignore_values: tuple[int, ...] = (0, 255),
    source: str = "<array>",
) -> np.ndarray:
    """Stored label values (H, W) -> train ids (H, W) uint8: ``ignore_values`` ->
    ``ignore_index``, ``offset..offset+K-1`` -> ``0..K-1``; ``DataError`` on any other value."""
    table = np.full(257, -1, dtype=np.int16)  # stored value -> train id; -1: not allowed
    table[list(ignore_values)] = ignore_index
    table[offset : offset + num_classes] = np.arange(num_classes, dtype=np.int16)
    in_range = raw if raw.dtype == np.uint8 else np.where((raw >= 0) & (raw <= 255), raw, 256)
    mapped = table[in_range]
    if (mapped < 0).any():
        bad = np.unique(raw[mapped < 0])
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        ignored = ", ".join(str(v) for v in ignore_values) or "none"
        allowed = f"classes {offset}..{offset + num_classes - 1} or ignored values ({ignored})"
        raise DataError(f"{source}: stored values must be {allowed}, found {shown}")
    return mapped.astype(np.uint8)


def _decode(path: PathLike, kind: str) -> Image.Image:
    """The loaded PIL image of a frame or mask file; ``DataError`` if missing or undecodable."""
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError as err:
        raise DataError(f"{path}: {kind} file does not exist") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptFileError(
            f"{path}: cannot decode {'image' if kind == 'frame' else kind} ({err}); "
            "the file is corrupt or truncated"
        ) from err


def read_frame(path: PathLike) -> np.ndarray:
    """Decode an image file -> (H, W, 3) uint8 RGB; ``DataError`` if unreadable or truncated."""
    return np.asarray(_decode(path, "frame").convert("RGB"))


def read_raw_label(path: PathLike) -> np.ndarray:
    """A label PNG's raw pixel values (H, W), without any mapping or palette conversion."""
    image = _decode(path, "mask")
    if image.mode not in _LABEL_MODES:
        raise DataError(
            f"{path}: expected a single-channel label PNG (mode L or P), got mode {image.mode}; "
            "colour-coded (RGB) masks are not supported"
        )
    return np.asarray(image)


def check_mask_size(
    mask_path: Path, mask_hw: tuple[int, ...], frame_path: Path, frame_hw: tuple[int, ...]
) -> None:
    """``DataError`` naming the mask when its size (H, W) differs from its frame's."""
    if tuple(mask_hw) != tuple(frame_hw):
        mask = f"{mask_path}: mask size {mask_hw[1]}x{mask_hw[0]} (WxH)"
        frame = f"frame {frame_path.name} size {frame_hw[1]}x{frame_hw[0]}"
        raise DataError(f"{mask} differs from {frame}")


def read_split(path: PathLike) -> list[str]:
    """Video names listed in the split file ``path`` (CRLF and blank lines tolerated)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (expected one video folder name per line)")
    names = [n for n in map(str.strip, path.read_text(encoding="utf-8").splitlines()) if n]
    if not names:
        raise DataError(f"{path}: split file is empty (expected one video folder name per line)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}: videos listed more than once: {', '.join(duplicates[:10])}")
    return names


def list_frames(folder: PathLike) -> list[Path]:
    """Image files of ``folder`` sorted by name (hidden files such as macOS ``._*`` skipped)."""
    images = [p for p in Path(folder).iterdir() if p.suffix.lower() in FRAME_SUFFIXES]
    return sorted(p for p in images if not p.name.startswith(".") and p.is_file())


@dataclass(frozen=True)
class Video:
    """Frames sorted by name; ``mask_paths``: None (unlabelled split), None per maskless frame."""

    name: str
    frame_paths: tuple[Path, ...]
    mask_paths: tuple[Path | None, ...] | None

    def __len__(self) -> int:
        return len(self.frame_paths)

    def mask_path(self, index: int) -> Path | None:
        """The mask of frame ``index``, ``None`` when it has none."""
        return None if self.mask_paths is None else self.mask_paths[index]

    @property
    def labelled_indices(self) -> list[int]:
        """Indices of the frames that have a mask."""
        return [i for i in range(len(self)) if self.mask_path(i) is not None]


def scan_video(
    root: PathLike,
    name: str,
    description: DatasetDescription,
    *,
    masks: bool = True,
    require_masks: bool = True,
) -> tuple[Video | None, list[str]]:
    """One video's files (``None``: unusable folder; ``masks=False``: no mask paths) and the
    problems found; a missing mask is one when ``require_masks`` and the data is not sparse."""
    frame_dir = description.frame_dir(root, name)
    if not frame_dir.is_dir():
        return None, [f"{frame_dir}: video folder listed in the split does not exist"]
    frames = tuple(list_frames(frame_dir))
    problems = [] if frames else [f"{frame_dir}: no frames (*.jpg) in the video folder"]
    if not masks:
        return Video(name, frames, None), problems
    mask_dir = description.mask_dir(root, name)
    paths = [mask_dir / (p.stem + MASK_SUFFIX) for p in frames]
    found = tuple(m if m.is_file() else None for m in paths)
    if require_masks and not description.sparse:
        problems += [
            f"{m}: mask missing for frame {f.name} (dataset is not sparse)"
            for f, m, ok in zip(frames, paths, found)
            if ok is None
        ]
    return Video(name, frames, found), problems


class VSPWIndex:
    """Videos of one split (``description``: the root's ``dataset.yaml``, else VSPW's); listed
    videos without frames or (``labelled``, not sparse) masks: ``DataError`` naming the paths."""

    def __init__(
        self,
        root: PathLike,
        split: str,
        *,
        labelled: bool = True,
        description: DatasetDescription | None = None,
    ) -> None:
        from themask.data.description import load_description

        self.root, self.split, self.labelled = Path(root), split, labelled
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset root does not exist")
        self.description = description or load_description(self.root)
        self.videos: list[Video] = []
        problems: list[str] = []
        for name in read_split(self.description.split_file(self.root, split)):
            video, found = scan_video(self.root, name, self.description, masks=labelled)
            problems += found
            if video is not None:
                self.videos.append(video)
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            head = f"{self.root} split '{split}': {len(problems)} problem(s)"
            raise DataError(f"{head}:\n  {shown}{more}")
        videos, frames = len(self.videos), self.num_frames
        logger.info("%s split '%s': %d videos, %d frames", self.root, split, videos, frames)

    @property
    def num_frames(self) -> int:
        return sum(len(v) for v in self.videos)
