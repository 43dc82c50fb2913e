"""Uniform draws for the training step's large random tensors (point samples, dropout masks)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOW_24_BITS = (1 << 24) - 1


def uniform(
    *shape: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> Tensor:
    """float32 (*shape) uniform in [0, 1): the values ``torch.rand`` takes (multiples of 2^-24).
    On CPU two per 64-bit draw, bits 0-23 and 32-55 (``torch.rand`` spends one 32-bit draw of
    the serial generator per number); elsewhere ``torch.rand``."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.rand(*shape, device=device, generator=generator)
    count = math.prod(shape)
    bits = torch.empty((count + 1) // 2, dtype=torch.int64, device=device)
    bits.random_(generator=generator)
    halves = bits.view(torch.int32)[:count].bitwise_and_(LOW_24_BITS)
    return halves.float().mul_(2.0**-24).view(shape)
