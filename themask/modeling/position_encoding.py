"""Sine positional encodings (DETR style, normalised to (0, 2π]) for 2-D maps and 3-D clips.

Both encodings are pure functions of the sizes: nothing is cached in modules. They are computed
in float32 (the arithmetic order follows the published formulas, so values match the reference
implementation bit for bit) and cast to ``dtype`` at the end.

Position p along an axis of length L (p = 1..L) is normalised as p / (L + 1e-6) · 2π. For F
features, feature i uses the divisor 10000^(2·⌊i/2⌋/F); even features hold the sine, odd features
the cosine, so channels read [sin, cos, sin, cos, …].
"""

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


def _spatial_encoding(
    height: int, width: int, num_feats: int, device: torch.device | None
) -> Tensor:
    """(2F, H, W) float32: channels [y features (F), x features (F)]."""
    pos_y = _sine_features(_normalised_positions(height, device), num_feats).t()  # (F, H)
    pos_x = _sine_features(_normalised_positions(width, device), num_feats).t()  # (F, W)
    return torch.cat(
        (
            pos_y[:, :, None].expand(num_feats, height, width),
            pos_x[:, None, :].expand(num_feats, height, width),
        ),
        dim=0,
    )


def sine_position_encoding_2d(
    batch: int,
    height: int,
    width: int,
    *,
    num_feats: int = 128,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """2-D sine encoding of an H×W map (no padding mask).

    Returns (B, 2·num_feats, H, W): channels 0..F-1 encode the row (y), F..2F-1 the column (x).
    """
    _check_sizes(num_feats, batch=batch, height=height, width=width)
    pos = _spatial_encoding(height, width, num_feats, device).to(dtype)
    return pos.unsqueeze(0).repeat(batch, 1, 1, 1)


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
    """3-D sine encoding of a clip of T frames of H×W (no padding mask).

    The spatial part is the 2-D encoding; the temporal part encodes t = 1..T, normalised by T,
    with 2·num_feats features, and is added to every channel. Outputs therefore depend on T.

    Returns (B, T, 2·num_feats, H, W).
    """
    _check_sizes(num_feats, batch=batch, frames=frames, height=height, width=width)
    spatial = _spatial_encoding(height, width, num_feats, device)  # (2F, H, W)
    pos_t = _sine_features(_normalised_positions(frames, device), 2 * num_feats)  # (T, 2F)
    pos = spatial[None] + pos_t[:, :, None, None]  # (T, 2F, H, W)
    return pos.to(dtype).unsqueeze(0).repeat(batch, 1, 1, 1, 1)
