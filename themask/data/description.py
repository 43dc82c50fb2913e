"""``dataset.yaml``: a dataset's classes, label encoding, layout (README "Your own dataset")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from themask.data.vspw import CLASS_NAMES, PALETTE, DataError, map_raw_labels, read_raw_label
from themask.io import PathLike

DESCRIPTION_FILE = "dataset.yaml"
VSPW_FRAMES, VSPW_MASKS = "data/{video}/origin", "data/{video}/mask"


class DescriptionError(DataError):
    """A ``dataset.yaml`` is missing a field or holds a malformed one."""


def default_palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 distinct colours: the bit-interleaving colour map of PASCAL VOC."""
    ids, palette = np.arange(num_classes), np.zeros((num_classes, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


@dataclass(frozen=True)
class DatasetDescription:
    """Classes, label encoding and folder layout of one dataset; malformed: ``DescriptionError``."""

    classes: tuple[str, ...]  # train ids 0..K-1 in this order; the one required field
    palette: np.ndarray = field(default=None, compare=False)  # type: ignore[arg-type]
    ignore_values: tuple[int, ...] = (0, 255)  # stored mask values never scored
    label_offset: int = 1  # train id = stored value - label_offset
    frames: str = VSPW_FRAMES  # a video's frame folder, relative to the root
    masks: str = VSPW_MASKS  # its mask folder; masks match frames by file stem
    splits: dict[str, str] | None = None  # split -> split file; None: "<split>.txt" at the root
    sparse: bool = False  # True: masks may exist for only some frames
    source: str = "built-in VSPW description"  # names the description in errors

    def __post_init__(self) -> None:  # palette (K, 3) uint8 RGB; None: ``default_palette``
        if self.palette is None:
            object.__setattr__(self, "palette", default_palette(len(self.classes)))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_values(self) -> range:
        """Stored mask values of the classes 0..K-1."""
        return range(self.label_offset, self.label_offset + self.num_classes)

    @property
    def encoding(self) -> dict[str, Any]:
        """The label encoding as ``map_raw_labels`` keywords."""
        k, offset, ignore = self.num_classes, self.label_offset, self.ignore_values
        return {"num_classes": k, "offset": offset, "ignore_values": ignore}

    def read_label(self, path: PathLike, *, ignore_index: int = 255) -> np.ndarray:
        """A mask file -> (H, W) uint8 train ids; ``DataError`` names the file and a bad value."""
        raw = read_raw_label(path)
        return map_raw_labels(raw, ignore_index=ignore_index, source=str(path), **self.encoding)

    def split_file(self, root: PathLike, split: str) -> Path:
        if self.splits is None:
            return Path(root) / f"{split}.txt"
        if split not in self.splits:
            known = ", ".join(self.splits)
            raise DataError(f"{self.source}: splits has no '{split}' (it has: {known})")
        return Path(root) / self.splits[split]

    def frame_dir(self, root: PathLike, video: str) -> Path:
        return Path(root) / self.frames.format(video=video)

    def mask_dir(self, root: PathLike, video: str) -> Path:
        return Path(root) / self.masks.format(video=video)

    def to_yaml(self, *, palette: bool = True) -> str:
        """``dataset.yaml`` text: every field set but ``source`` (``palette`` optional)."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(classes=list(self.classes), ignore_values=list(self.ignore_values))
        values["palette"] = self.palette.tolist() if palette else None
        kept = {k: v for k, v in values.items() if v is not None and k != "source"}
        return yaml.safe_dump(kept, sort_keys=False, default_flow_style=None, width=100)


VSPW_DESCRIPTION = DatasetDescription(classes=CLASS_NAMES, palette=PALETTE)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_description(values: Any, source: str) -> DatasetDescription:
    """Validate the mapping read from a ``dataset.yaml``; ``source`` names it in errors."""
    if not isinstance(values, Mapping):
        raise DescriptionError(f"{source}: expected a mapping of fields, got {values!r}")
    known = {f.name for f in fields(DatasetDescription)} - {"source"}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise DescriptionError(f"{source}: unknown field(s) {unknown}; valid: {sorted(known)}")
    if "classes" not in values:
        raise DescriptionError(f"{source}: field 'classes' is missing (a list of class names)")
    defaults = DatasetDescription(classes=())
    given = {f: getattr(defaults, f) for f in known - {"palette"}} | {"palette": None, **values}

    def expect(ok: bool, key: str, expected: str) -> None:
        if not ok:
            got = given.get(key)
            raise DescriptionError(f"{source}: field '{key}': expected {expected}, got {got!r}")

    classes, ignore, offset = given["classes"], given["ignore_values"], given["label_offset"]
    names_ok = isinstance(classes, list) and 0 < len(classes) <= 255
    names_ok = names_ok and all(isinstance(c, str) and c.strip() for c in classes)
    expect(names_ok, "classes", "a list of 1..255 non-empty names")
    expect(len(set(classes)) == len(classes), "classes", "unique names")
    k, palette = len(classes), given.get("palette")
    if palette is not None:
        ok = isinstance(palette, list) and len(palette) == k
        ok = ok and all(
            isinstance(c, list) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c)
            for c in palette
        )
        expect(ok, "palette", f"{k} [R, G, B] triples of 0..255 (one per class)")
        given["palette"] = np.array(palette, dtype=np.uint8)
    ok = isinstance(ignore, (list, tuple)) and all(_is_int(v) and 0 <= v <= 255 for v in ignore)
    expect(ok, "ignore_values", "a list of stored values in 0..255")
    expect(_is_int(offset), "label_offset", "an integer")
    fits = f"0..{256 - k} so that the {k} class values fit in 0..255"
    expect(0 <= offset <= 256 - k, "label_offset", fits)
    clash = set(ignore) & set(range(offset, offset + k))
    expect(not clash, "ignore_values", f"no class value ({offset}..{offset + k - 1})")
    for key in ("frames", "masks"):
        ok = isinstance(given[key], str) and "{video}" in given[key]
        expect(ok, key, "a folder pattern containing {video}")
    splits = given["splits"]
    if splits is not None:
        ok = isinstance(splits, Mapping) and bool(splits)
        ok = ok and all(isinstance(s, str) and isinstance(p, str) for s, p in splits.items())
        expect(ok, "splits", "a mapping split name -> split file")
        given["splits"] = dict(splits)
    expect(isinstance(given["sparse"], bool), "sparse", "true or false")
    given.update(classes=tuple(classes), ignore_values=tuple(ignore), source=source)
    return DatasetDescription(**given)


_CACHE: dict[tuple[str, int], DatasetDescription] = {}


def load_description(root: PathLike) -> DatasetDescription:
    """``ROOT/dataset.yaml`` parsed and validated, or ``VSPW_DESCRIPTION`` when it is absent."""
    path = Path(root) / DESCRIPTION_FILE
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return VSPW_DESCRIPTION
    key = (str(path.resolve()), stamp)
    if key not in _CACHE:
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise DescriptionError(f"{path}: cannot read the YAML: {err}") from None
        _CACHE[key] = parse_description(values, str(path))
    return _CACHE[key]
