"""Sine position encodings against the closed-form formula, element by element."""

from __future__ import annotations

import math

import pytest
import torch

from themask.modeling.position_encoding import (
    sine_position_encoding_2d,
    sine_position_encoding_3d,
)


def closed_form(position: int, length: int, channel: int, num_feats: int) -> float:
    """Feature `channel` of position `position` (0-based) on an axis of `length` entries."""
    angle = (position + 1) / (length + 1e-6) * 2 * math.pi
    angle /= 10000 ** (2 * (channel // 2) / num_feats)
    return math.sin(angle) if channel % 2 == 0 else math.cos(angle)


def test_2d_matches_closed_form_for_every_channel():
    height, width, feats = 5, 7, 16
    pos = sine_position_encoding_2d(height, width, num_feats=feats)
    assert pos.shape == (2 * feats, height, width)
    assert pos.dtype == torch.float32
    for i, j in [(0, 0), (4, 6), (2, 3), (1, 5)]:
        expected = [closed_form(i, height, c, feats) for c in range(feats)]
        expected += [closed_form(j, width, c, feats) for c in range(feats)]
        torch.testing.assert_close(pos[:, i, j], torch.tensor(expected), rtol=0, atol=2e-6)


def test_2d_default_has_256_channels_and_hand_values():
    pos = sine_position_encoding_2d(3, 4)[None]
    assert pos.shape == (1, 256, 3, 4)
    # Last row, channel 0: sin(3 / (3 + 1e-6) · 2π) ≈ sin(2π) ≈ 0; channel 1: cos ≈ 1.
    assert abs(pos[0, 0, 2, 0].item()) < 1e-4 and abs(pos[0, 1, 2, 0].item() - 1) < 1e-6
    # Column 1 of 4, channel 128: sin(2/4 · 2π) = sin(π) ≈ 0; channel 129: cos(π) = -1.
    assert abs(pos[0, 128, 0, 1].item()) < 1e-5 and abs(pos[0, 129, 0, 1].item() + 1) < 1e-6
    # The x half does not vary along y and vice versa.
    assert torch.equal(pos[0, 128:, 0], pos[0, 128:, 2])
    assert torch.equal(pos[0, :128, :, 0], pos[0, :128, :, 3])


def test_3d_matches_closed_form_and_depends_on_clip_length():
    frames, height, width, feats = 3, 4, 6, 8
    pos = sine_position_encoding_3d(frames, height, width, num_feats=feats)[None]
    assert pos.shape == (1, frames, 2 * feats, height, width)
    for t, i, j in [(0, 0, 0), (2, 3, 5), (1, 2, 1)]:
        for c in range(2 * feats):
            spatial = (
                closed_form(i, height, c, feats)
                if c < feats
                else closed_form(j, width, c - feats, feats)
            )
            expected = spatial + closed_form(t, frames, c, 2 * feats)
            assert abs(pos[0, t, c, i, j].item() - expected) < 4e-6, (t, c, i, j)

    shorter = sine_position_encoding_3d(2, height, width, num_feats=feats)[None]
    assert not torch.allclose(shorter[0, 0], pos[0, 0])


def test_3d_single_frame_is_2d_plus_constant_time_term():
    pos3 = sine_position_encoding_3d(1, 3, 5, num_feats=4)[None, 0]
    pos2 = sine_position_encoding_2d(3, 5, num_feats=4)[None]
    time_term = torch.tensor([closed_form(0, 1, c, 8) for c in range(8)])
    torch.testing.assert_close(pos3 - pos2, time_term.view(1, 8, 1, 1).expand_as(pos2))


def test_dtype_and_validation():
    assert sine_position_encoding_2d(2, 2, dtype=torch.float64).dtype == torch.float64
    assert sine_position_encoding_3d(2, 2, 2, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="num_feats"):
        sine_position_encoding_2d(2, 2, num_feats=7)
    with pytest.raises(ValueError, match="frames"):
        sine_position_encoding_3d(0, 2, 2)


def test_2d_is_bit_exact_with_the_cumsum_formulation():
    """DETR computes positions as a cumulative sum over an all-valid mask, in float32."""
    batch, height, width, feats = 2, 6, 9, 128
    valid = torch.ones(batch, height, width, dtype=torch.bool)
    y = valid.cumsum(1, dtype=torch.float32)
    x = valid.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = x / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    divisor = 10000 ** (2 * (torch.arange(feats, dtype=torch.float32) // 2) / feats)
    channels = []
    for axis in (y, x):
        angles = axis[..., None] / divisor  # (B, H, W, F)
        channels.append(torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), -1))
    expected = torch.cat([c.flatten(3) for c in channels], dim=3).permute(0, 3, 1, 2)
    assert torch.equal(sine_position_encoding_2d(height, width).expand(batch, -1, -1, -1), expected)
