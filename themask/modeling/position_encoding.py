"""DETR-style sine position encodings of 2-D maps and 3-D clips, in float32 cast to ``dtype``:
position p = 1..L → p / (L + 1e-6) · 2π / 10000^(2·⌊i/2⌋/F) for feature i; [sin, cos, …]."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SCALE = 2 * math.pi
_EPS = 1e-6
_TEMPERATURE = 10000

__all__ = ["sine_position_encoding_2d", "sine_position_encoding_3d"]


def _check_sizes(num_feats: int, **sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"sine position encoding: {name} must be >= 1, got {value}")
    if num_feats < 2 or num_feats % 2:
        raise ValueError(
            f"sine position encoding: num_feats must be a positive even number, got {num_feats}"
        )


def _normalised_positions(length: int, device: torch.device | None) -> Tensor:
    """(L,) positions 1..L scaled to (0, 2π], float32."""
    positions = torch.arange(1, length + 1, dtype=torch.float32, device=device)
    return positions / (positions[-1:] + _EPS) * _SCALE


def _sine_features(positions: Tensor, num_feats: int) -> Tensor:
    """(L,) normalised positions -> (L, F) interleaved [sin, cos, sin, cos, ...] features."""
    index = torch.arange(num_feats, dtype=torch.float32, device=positions.device)
    divisors = _TEMPERATURE ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)
    angles = positions[:, None] / divisors  # (L, F)
    return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)


def sine_position_encoding_2d(
    batch: int,
    height: int,
    width: int,
    *,
    num_feats: int = 128,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(B, 2·num_feats, H, W): channels 0..F-1 encode the row (y), F..2F-1 the column (x)."""
    _check_sizes(num_feats, batch=batch, height=height, width=width)
    pos_y = _sine_features(_normalised_positions(height, device), num_feats).t()  # (F, H)
    pos_x = _sine_features(_normalised_positions(width, device), num_feats).t()  # (F, W)
    size = (num_feats, height, width)
    pos = torch.cat((pos_y[:, :, None].expand(size), pos_x[:, None, :].expand(size)))
    return pos.to(dtype).unsqueeze(0).repeat(batch, 1, 1, 1)


def sine_position_encoding_3d(
    batch: int,
    frames: int,
    height: int,
    width: int,
    *,
    num_feats: int = 128,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(B, T, 2·num_feats, H, W): the 2-D encoding plus an encoding of t = 1..T (2·num_feats
    features, normalised by T) added to every channel."""
    _check_sizes(num_feats, batch=batch, frames=frames)
    spatial = sine_position_encoding_2d(1, height, width, num_feats=num_feats, device=device)[0]
    pos_t = _sine_features(_normalised_positions(frames, device), 2 * num_feats)  # (T, 2F)
    pos = spatial[None] + pos_t[:, :, None, None]  # (T, 2F, H, W)
    return pos.to(dtype).unsqueeze(0).repeat(batch, 1, 1, 1, 1)
