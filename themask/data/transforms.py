"""Clip transforms of T frames (H, W, 3) uint8 RGB and label maps (H, W) uint8 of one size:
training augmentation (docs/DESIGN.md §6, docs/VSPW.md §2.1), test resize (docs/VSPW.md §2.3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from themask.data.config import AugmentConfig
from themask.data.resize import MEAN, STD, aligned_size, keep_ratio_size, resize_frame
from themask.data.vspw import IGNORE_INDEX, TEST_SCALE

# PhotoMetricDistortion parameters (mmseg defaults used by the official configs).
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18  # in OpenCV's 0..180 hue units

_STATS: dict[torch.device, tuple[torch.Tensor, ...]] = {}


def to_chw(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 RGB -> (T, 3, H, W) uint8 (a contiguous copy)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()


def normalize_frames(frames: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB 0..255 -> float32 normalised with ``MEAN``/``STD`` on their device."""
    if frames.device not in _STATS:
        stats = torch.tensor([MEAN, STD], dtype=torch.float32, device=frames.device)
        _STATS[frames.device] = stats.view(2, 3, 1, 1).unbind(0)
    mean, std = _STATS[frames.device]
    return (frames.float() - mean) / std


def crop_is_acceptable(
    label: np.ndarray, *, cat_max_ratio: float, ignore_index: int = IGNORE_INDEX
) -> bool:
    """True if ``label`` holds >= 2 non-ignored classes and none covers >= ``cat_max_ratio``."""
    values, counts = np.unique(label, return_counts=True)
    counts = counts[values != ignore_index]
    return counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio


def choose_crop(
    label: np.ndarray,
    crop_hw: tuple[int, int],
    rng: np.random.Generator,
    *,
    cat_max_ratio: float = 0.75,
    retries: int = 10,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[int, int]:
    """Top-left (y, x) of a uniform crop box of ``label`` (H, W), redrawn at most ``retries``
    times while not ``crop_is_acceptable`` (``cat_max_ratio >= 1``: no check)."""
    h, w = label.shape
    ch, cw = min(crop_hw[0], h), min(crop_hw[1], w)

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(retries):
            crop = label[y : y + ch, x : x + cw]
            if crop_is_acceptable(crop, cat_max_ratio=cat_max_ratio, ignore_index=ignore_index):
                break
            y, x = draw()
    return y, x


def pad_clip(
    frames: torch.Tensor,
    labels: torch.Tensor,
    size_hw: tuple[int, int],
    *,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad frames (T, 3, h, w) with 0, labels (T, h, w) with ``ignore_index``, bottom/right."""
    h, w = frames.shape[-2:]
    ph, pw = size_hw[0] - h, size_hw[1] - w
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {h}x{w} to the smaller size {size_hw[0]}x{size_hw[1]}")
    if ph == 0 and pw == 0:
        return frames, labels
    pad = (0, pw, 0, ph)
    return F.pad(frames, pad, value=0.0), F.pad(labels, pad, value=ignore_index)


def _adjust_hsv(frame: np.ndarray, saturation: float, hue_shift: int) -> np.ndarray:
    """Scale saturation and rotate hue of an (H, W, 3) uint8 RGB frame (hue in 0..180 units)."""
    hsv = np.asarray(Image.fromarray(frame).convert("HSV")).astype(np.int32)
    if hue_shift:  # PIL hue is 0..255 for a full turn; OpenCV's is 0..180.
        hsv[..., 0] = (hsv[..., 0] + round(hue_shift * 256 / 180)) % 256
    if saturation != 1.0:
        hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
    h, w = frame.shape[:2]
    return np.asarray(Image.frombytes("HSV", (w, h), hsv.astype(np.uint8).tobytes()).convert("RGB"))


def photometric_distortion(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast, saturation and hue of one (H, W, 3) uint8 frame (each
    p=0.5); contrast before or after the colour changes at random, as in mmseg."""
    out = frame.astype(np.float32)
    if rng.random() < 0.5:
        out = np.clip(out + rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA), 0, 255)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(*CONTRAST_RANGE) if rng.random() < 0.5 else 1.0
    if contrast_first and contrast != 1.0:
        out = np.clip(out * contrast, 0, 255)
    saturation = rng.uniform(*SATURATION_RANGE) if rng.random() < 0.5 else 1.0
    hue_shift = int(rng.integers(-HUE_DELTA, HUE_DELTA + 1)) if rng.random() < 0.5 else 0
    result = out.astype(np.uint8)
    if saturation != 1.0 or hue_shift:
        result = _adjust_hsv(result, saturation, hue_shift)
    if not contrast_first and contrast != 1.0:
        result = np.clip(result.astype(np.float32) * contrast, 0, 255).astype(np.uint8)
    return result


@dataclass
class TrainTransform(AugmentConfig):
    """Clip augmentation → frames (T, 3, H, W) float32 normalised, labels (T, H, W) int64 padded
    to ``crop_size``; ``normalize=False``: uint8 frames, unpadded (the loader pads)."""

    normalize: bool = True

    @classmethod
    def from_config(cls, data_cfg: AugmentConfig, *, normalize: bool = True) -> TrainTransform:
        values = {f.name: getattr(data_cfg, f.name) for f in fields(AugmentConfig)}
        return cls(**values, normalize=normalize)

    def __call__(
        self, frames: Sequence[np.ndarray], labels: Sequence[np.ndarray], rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = rng.uniform(*self.ratio_range)
        target_scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = keep_ratio_size(frames[0].shape[:2], target_scale)
        imgs = np.stack([resize_frame(f, size) for f in frames])
        segs = np.stack([resize_frame(s, size, Image.Resampling.NEAREST) for s in labels])
        check: dict[str, Any] = {"cat_max_ratio": self.cat_max_ratio, "retries": self.crop_retries}
        y, x = choose_crop(segs[-1], self.crop_size, rng, ignore_index=self.ignore_index, **check)
        ch, cw = min(self.crop_size[0], size[0]), min(self.crop_size[1], size[1])
        imgs, segs = imgs[:, y : y + ch, x : x + cw], segs[:, y : y + ch, x : x + cw]
        if rng.random() < self.flip_prob:
            imgs, segs = imgs[:, :, ::-1], segs[:, :, ::-1]
        if self.photometric:
            imgs = np.stack([photometric_distortion(np.ascontiguousarray(f), rng) for f in imgs])
        frame_t, label_t = to_chw(imgs), torch.from_numpy(np.ascontiguousarray(segs)).long()
        if not self.normalize:
            return frame_t, label_t
        return pad_clip(
            normalize_frames(frame_t), label_t, self.crop_size, ignore_index=self.ignore_index
        )


@dataclass
class TestTransform:
    """Test resize: fit ``scale`` (long, short) keeping the ratio, stretch each side up to a
    multiple of ``size_divisor`` (853x480 -> 864x480); T frames -> (T, 3, h, w) normalised."""

    __test__ = False  # not a pytest class

    scale: tuple[int, int] = TEST_SCALE
    size_divisor: int = 32

    def input_size(self, original_hw: tuple[int, int]) -> tuple[int, int]:
        return aligned_size(original_hw, self.scale, self.size_divisor)

    def __call__(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        return normalize_frames(self.resize(frames))

    def resize(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """T frames (H, W, 3) uint8 of one size -> (T, 3, h, w) uint8, not yet normalised."""
        sizes = {f.shape[:2] for f in frames}
        if len(sizes) > 1:
            raise ValueError(f"all frames of a clip must share one size, got {sorted(sizes)}")
        size = self.input_size(frames[0].shape[:2])
        return to_chw(np.stack([resize_frame(f, size) for f in frames]))
