"""``DataConfig``: data, clips, augmentation; defaults: VSPW 480p, stage 2 (stage 1: dilation 0)."""

from __future__ import annotations

from dataclasses import dataclass

from themask.data.clips import clip_offsets
from themask.data.description import DatasetDescription, load_description
from themask.data.vspw import IGNORE_INDEX, TEST_SCALE


@dataclass
class AugmentConfig:
    """Training augmentation settings (docs/DESIGN.md §6), applied by ``TrainTransform``."""

    scale: tuple[int, int] = TEST_SCALE  # (long, short) side of the base size
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: tuple[int, int] = (480, 480)  # (H, W)
    cat_max_ratio: float = 0.75
    crop_retries: int = 10
    flip_prob: float = 0.5
    photometric: bool = True
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:  # tuples from YAML's lists: configs compare and hash
        self.scale = (int(self.scale[0]), int(self.scale[1]))
        self.ratio_range = (float(self.ratio_range[0]), float(self.ratio_range[1]))
        self.crop_size = (int(self.crop_size[0]), int(self.crop_size[1]))
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"data.ratio_range must be 0 < low <= high, got {self.ratio_range}")
        if min(self.crop_size) < 1 or min(self.scale) < 1:
            raise ValueError(
                f"data.crop_size, data.scale must be positive, got {self.crop_size}, {self.scale}"
            )
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"data.flip_prob must be in [0, 1], got {self.flip_prob}")


@dataclass
class DataConfig(AugmentConfig):
    """Data settings: the dataset, the clips, the augmentation (``AugmentConfig``), loading."""

    root: str = "data/vspw/VSPW_480p"
    train_split: str = "train"
    val_split: str = "val"
    dilation: tuple[int, ...] = (-3,)  # training clip = target + these offsets (target last)
    test_clip_len: int | None = None  # None = the training clip length
    reverse_prob: float = 0.5
    size_divisor: int = 32
    num_workers: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.dilation = tuple(int(d) for d in self.dilation)
        clip_offsets(self.dilation)  # validates
        if self.test_clip_len is not None and self.test_clip_len < 1:
            raise ValueError(f"data.test_clip_len must be >= 1 or None, got {self.test_clip_len}")
        if not 0.0 <= self.reverse_prob <= 1.0:
            raise ValueError(f"data.reverse_prob must be in [0, 1], got {self.reverse_prob}")

    @property
    def num_frames(self) -> int:
        """Training clip length T (the offsets and the target)."""
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
