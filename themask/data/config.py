"""``DataConfig``: where the data lives and how clips are built and augmented.

Defaults are the official VSPW 480p recipe for the THE-Mask second stage (T = 2, dilation
[-3]); the first stage uses ``dilation=(0,)``. The clip length is derived from ``dilation``
(``num_frames``), so the two can never disagree. Classes, label encoding and folder layout
come from the dataset's own description (``<root>/dataset.yaml``; VSPW when absent).
"""

from __future__ import annotations

from dataclasses import dataclass

from themask.data.clips import clip_offsets
from themask.data.description import DatasetDescription, load_description
from themask.data.vspw import TEST_SCALE


@dataclass
class DataConfig:
    """Data settings; sizes are (long, short) for ``scale`` and (H, W) for ``crop_size``."""

    root: str = "data/vspw/VSPW_480p"
    train_split: str = "train"
    val_split: str = "val"
    dilation: tuple[int, ...] = (-3,)  # training clip = target + these offsets (target last)
    test_clip_len: int | None = None  # None = the training clip length
    scale: tuple[int, int] = TEST_SCALE
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (480, 480)
    cat_max_ratio: float = 0.75
    crop_retries: int = 10
    flip_prob: float = 0.5
    photometric: bool = True
    reverse_prob: float = 0.5
    size_divisor: int = 32
    ignore_index: int = 255
    num_workers: int = 4

    def __post_init__(self) -> None:
        # YAML gives lists; keep tuples so configs compare and hash predictably.
        self.dilation = tuple(int(d) for d in self.dilation)
        self.scale = (int(self.scale[0]), int(self.scale[1]))
        self.ratio_range = (float(self.ratio_range[0]), float(self.ratio_range[1]))
        self.crop_size = (int(self.crop_size[0]), int(self.crop_size[1]))
        clip_offsets(self.dilation)  # validates
        if self.test_clip_len is not None and self.test_clip_len < 1:
            raise ValueError(f"data.test_clip_len must be >= 1 or None, got {self.test_clip_len}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"data.ratio_range must be 0 < low <= high, got {self.ratio_range}")
        if min(self.crop_size) < 1 or min(self.scale) < 1:
            raise ValueError(
                f"data.crop_size and data.scale must be positive, "
                f"got {self.crop_size} and {self.scale}"
            )
        for name in ("flip_prob", "reverse_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def num_frames(self) -> int:
        """Training clip length T = number of offsets including the target."""
        return len(clip_offsets(self.dilation))

    @property
    def eval_clip_len(self) -> int:
        return self.num_frames if self.test_clip_len is None else self.test_clip_len

    @property
    def description(self) -> DatasetDescription:
        """The dataset's description: ``<root>/dataset.yaml``, else the VSPW one."""
        return load_description(self.root)

    @property
    def num_classes(self) -> int:
        return self.description.num_classes
