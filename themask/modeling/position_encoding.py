"""DETR-style sine position encodings of 2-D maps and 3-D clips, in float32 cast to ``dtype``:
position p = 1..L → p / (L + 1e-6) · 2π / 10000^(2·⌊i/2⌋/F) for feature i; [sin, cos, …]."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _sine_features(length: int, num_feats: int, device: torch.device | None) -> Tensor:
    """Positions 1..L of an axis → (L, F) interleaved [sin, cos, sin, cos, ...] features."""
    if length < 1 or num_feats < 2 or num_feats % 2:
        raise ValueError(
            f"sine position encoding: expected sizes (frames, height, width) >= 1 and an even "
            f"num_feats >= 2, got length {length}, num_feats {num_feats}"
        )
    positions = torch.arange(1, length + 1, dtype=torch.float32, device=device)
    positions = positions / (positions[-1:] + 1e-6) * (2 * math.pi)
    index = torch.arange(num_feats, dtype=torch.float32, device=device)
    divisors = 10000 ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)
    angles = positions[:, None] / divisors  # (L, F)
    return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)


def sine_position_encoding_2d(
    height: int,
    width: int,
    *,
    num_feats: int = 128,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(2·num_feats, H, W): channels 0..F-1 encode the row (y), F..2F-1 the column (x)."""
    pos_y = _sine_features(height, num_feats, device).t()  # (F, H)
    pos_x = _sine_features(width, num_feats, device).t()  # (F, W)
    size = (num_feats, height, width)
    return torch.cat((pos_y[:, :, None].expand(size), pos_x[:, None, :].expand(size))).to(dtype)


def sine_position_encoding_3d(
    frames: int,
    height: int,
    width: int,
    *,
    num_feats: int = 128,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(T, 2·num_feats, H, W): the 2-D encoding plus an encoding of t = 1..T (2·num_feats
    features, normalised by T) added to every channel."""
    spatial = sine_position_encoding_2d(height, width, num_feats=num_feats, device=device)
    pos_t = _sine_features(frames, 2 * num_feats, device)  # (T, 2F)
    return (spatial[None] + pos_t[:, :, None, None]).to(dtype)
