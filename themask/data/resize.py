"""Torch-free test input pipeline (``transforms`` and the ONNX Runtime predictor): norm, resize."""

from __future__ import annotations

import numpy as np
from PIL import Image

# ImageNet mean/std of RGB values 0..255 (normalised = (x - MEAN) / STD).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def keep_ratio_size(size_hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of ``size_hw`` scaled by min(long / long side, short / short side), rounded."""
    h, w = size_hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_frame(
    image: np.ndarray,
    size_hw: tuple[int, int],
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> np.ndarray:
    """Resize an (H, W, 3) or (H, W) uint8 image to ``size_hw`` (nearest for label maps)."""
    if image.shape[:2] == tuple(size_hw):
        return image
    return np.asarray(Image.fromarray(image).resize((size_hw[1], size_hw[0]), resample))


def aligned_size(
    size_hw: tuple[int, int], scale: tuple[int, int] | None, size_divisor: int
) -> tuple[int, int]:
    """Network input size: keep-ratio fit to ``scale`` (None: as is), each side up to a multiple."""
    h, w = size_hw if scale is None else keep_ratio_size(size_hw, scale)
    return -(-h // size_divisor) * size_divisor, -(-w // size_divisor) * size_divisor
