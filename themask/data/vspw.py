"""Videos on disk: split files, video folders, frame/label readers; VSPW class names and palette.

Layout and label encoding come from a dataset's ``dataset.yaml``; VSPW's by default
(``docs/VSPW.md`` §1): ``<root>/<split>.txt`` lists the videos, ``data/<video>/origin/*.jpg``
their frames, ``data/<video>/mask/*.png`` single-channel masks of the same stems, where ``0``
("others") and ``255`` (void) are ignored and ``1..K`` are train ids ``0..K-1``. Any other
stored value is an error, never a silent label.
"""

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
# Single-channel PIL modes whose pixel values are raw label ids.
_LABEL_MODES = ("L", "P", "I", "I;16")

# fmt: off
CLASS_NAMES: tuple[str, ...] = (
    "wall", "ceiling", "door", "stair", "ladder", "escalator", "Playground_slide",
    "handrail_or_fence", "window", "rail", "goal", "pillar", "pole", "floor", "ground", "grass",
    "sand", "athletic_field", "road", "path", "crosswalk", "building", "house", "bridge", "tower",
    "windmill", "well_or_well_lid", "other_construction", "sky", "mountain", "stone", "wood",
    "ice", "snowfield", "grandstand", "sea", "river", "lake", "waterfall", "water",
    "billboard_or_Bulletin_Board", "sculpture", "pipeline", "flag", "parasol_or_umbrella",
    "cushion_or_carpet", "tent", "roadblock", "car", "bus", "truck", "bicycle", "motorcycle",
    "wheeled_machine", "ship_or_boat", "raft", "airplane", "tyre", "traffic_light", "lamp",
    "person", "cat", "dog", "horse", "cattle", "other_animal", "tree", "flower", "other_plant",
    "toy", "ball_net", "backboard", "skateboard", "bat", "ball",
    "cupboard_or_showcase_or_storage_rack", "box", "traveling_case_or_trolley_case", "basket",
    "bag_or_package", "trash_can", "cage", "plate", "tub_or_bowl_or_pot", "bottle_or_cup",
    "barrel", "fishbowl", "bed", "pillow", "table_or_desk", "chair_or_seat", "bench", "sofa",
    "shelf", "bathtub", "gun", "commode", "roaster", "other_machine", "refrigerator",
    "washing_machine", "Microwave_oven", "fan", "curtain", "textiles", "clothes",
    "painting_or_poster", "mirror", "flower_pot_or_vase", "clock", "book", "tool", "blackboard",
    "tissue", "screen_or_television", "computer", "printer", "Mobile_phone", "keyboard",
    "other_electronic_product", "fruit", "food", "instrument", "train",
)

_PALETTE_ROWS: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0),
)
# fmt: on

PALETTE: np.ndarray = np.array(_PALETTE_ROWS, dtype=np.uint8)
"""(124, 3) uint8 RGB colour of each train id (first 124 ADE20K colours; ids 6 and 48 share one)."""


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
    if raw.ndim != 2:
        raise DataError(
            f"{source}: expected a single-channel label map (H, W), got shape {raw.shape}"
        )
    if not 1 <= num_classes <= 256 - offset:
        raise ValueError(
            f"num_classes must be in 1..{256 - offset} to fit the uint8 encoding, got {num_classes}"
        )
    ignored = ", ".join(str(v) for v in ignore_values) or "none"
    expected = f"classes {offset}..{offset + num_classes - 1} or ignored values ({ignored})"
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise DataError(
                f"{source}: stored values must be {expected}, "
                f"found range {int(raw.min())}..{int(raw.max())}"
            )
        raw = raw.astype(np.uint8)
    table = np.full(256, -1, dtype=np.int16)  # stored value -> train id, -1: not allowed
    table[list(ignore_values)] = ignore_index
    table[offset : offset + num_classes] = np.arange(num_classes, dtype=np.int16)
    mapped = table[raw]
    if (mapped < 0).any():
        bad = np.unique(raw[mapped < 0])
        shown = ", ".join(str(int(v)) for v in bad[:10])
        raise DataError(
            f"{source}: stored values must be {expected}, found {shown}"
            + (" ..." if bad.size > 10 else "")
        )
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


def read_label(
    path: PathLike,
    *,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
    offset: int = 1,
    ignore_values: tuple[int, ...] = (0, 255),
) -> np.ndarray:
    """Read a mask PNG -> (H, W) uint8 train ids (``ignore_index`` = ignore); VSPW encoding by
    default (``DatasetDescription.read_label`` passes a dataset's own)."""
    return map_raw_labels(
        read_raw_label(path),
        num_classes=num_classes,
        ignore_index=ignore_index,
        offset=offset,
        ignore_values=ignore_values,
        source=str(path),
    )


def check_mask_size(
    mask_path: Path, mask_hw: tuple[int, ...], frame_path: Path, frame_hw: tuple[int, ...]
) -> None:
    """``DataError`` naming the mask when its size (H, W) differs from its frame's."""
    if tuple(mask_hw) != tuple(frame_hw):
        raise DataError(
            f"{mask_path}: mask size {mask_hw[1]}x{mask_hw[0]} (WxH) differs from frame "
            f"{frame_path.name} size {frame_hw[1]}x{frame_hw[0]}"
        )


def read_split(path: PathLike) -> list[str]:
    """Video names listed in the split file ``path`` (CRLF and blank lines tolerated)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split file not found (expected one video folder name per line)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name]
    if not names:
        raise DataError(f"{path}: split file is empty (expected one video folder name per line)")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"{path}: videos listed more than once: {', '.join(duplicates[:10])}")
    return names


def list_frames(folder: PathLike) -> list[Path]:
    """Image files of ``folder`` sorted by name (hidden files such as macOS ``._*`` skipped)."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


@dataclass(frozen=True)
class Video:
    """One video: frames sorted by name; ``mask_paths`` is ``None`` for an unlabelled split,
    and holds ``None`` for each frame without a mask in a sparse dataset."""

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
    """One video's files and the problems found (``None`` when the folder is unusable);
    ``masks=False``: no mask paths; a missing mask is a problem when ``require_masks`` and
    the dataset is not sparse."""
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
    """Videos of one split of a dataset described by ``description`` (default: the root's
    ``dataset.yaml``, else the VSPW layout).

    Every listed video must exist with at least one frame and, when ``labelled`` and the
    dataset is not sparse, a mask for every frame; otherwise ``DataError`` names every
    offending path (first 20) and the count.
    """

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
            raise DataError(
                f"{self.root} split '{split}': {len(problems)} problem(s):\n  {shown}{more}"
            )
        counts = f"{len(self.videos)} videos, {self.num_frames} frames"
        logger.info("%s split '%s': %s", self.root, split, counts)

    @property
    def num_frames(self) -> int:
        return sum(len(v) for v in self.videos)

    def __getitem__(self, index: int) -> Video:
        return self.videos[index]
