"""Torch-free parts of the test-time input pipeline: normalisation constants and the resize.

Shared by ``themask.data.transforms`` and the ONNX Runtime predictor (``themask.deploy``).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# ImageNet mean/std of RGB values 0..255 (normalised = (x - MEAN) / STD).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def keep_ratio_size(size_hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """Size (h, w) after rescaling ``size_hw`` to fit ``scale`` = (long, short) keeping the ratio.

    factor = min(long / long_side, short / short_side); sides are rounded to nearest.
    """
    h, w = size_hw
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_frame(frame: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W, 3) uint8 frame to ``size_hw``."""
    if frame.shape[:2] == tuple(size_hw):
        return frame
    resized = Image.fromarray(frame).resize((size_hw[1], size_hw[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized)


def aligned_size(
    size_hw: tuple[int, int], scale: tuple[int, int], size_divisor: int
) -> tuple[int, int]:
    """Network input size of the test transform: keep-ratio fit, each side up to a multiple."""
    h, w = keep_ratio_size(size_hw, scale)
    return (
        int(math.ceil(h / size_divisor)) * size_divisor,
        int(math.ceil(w / size_divisor)) * size_divisor,
    )
