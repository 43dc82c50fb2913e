"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch: each query reads P points
per head and level (reference point + learned pixel offsets), weighted by a softmax over L·P."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SpatialShapes = Sequence[tuple[int, int]]


def offset_normaliser(
    spatial_shapes: SpatialShapes, *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """(L, 2) rows (W_l, H_l), filled on the device (no blocking host-to-device copy)."""
    normaliser = torch.empty(len(spatial_shapes), 2, device=device, dtype=dtype)
    for level, (height, width) in enumerate(spatial_shapes):
        normaliser[level, 0].fill_(width)
        normaliser[level, 1].fill_(height)
    return normaliser


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """value (B, S, M, D): the L levels of ``spatial_shapes`` ((H_l, W_l)) flattened row-major,
    concatenated; sampling_locations (B, Q, M, L, P, 2): (x, y) in [0, 1] over each map (zeros
    outside); attention_weights (B, Q, M, L, P) → weighted sum (B, Q, M·D), heads concatenated."""
    batch, num_tokens, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if len(spatial_shapes) != num_levels:
        raise ValueError(
            f"ms_deform_attn: {len(spatial_shapes)} spatial shapes for {num_levels} sampling levels"
        )
    level_sizes = [h * w for h, w in spatial_shapes]
    if sum(level_sizes) != num_tokens:
        raise ValueError(
            f"ms_deform_attn: value has {num_tokens} tokens but spatial_shapes "
            f"{list(spatial_shapes)} hold {sum(level_sizes)}"
        )
    bm = batch * num_heads
    # Q innermost in the grid_sample layouts: the CPU kernel vectorises along it
    value = value.permute(0, 2, 3, 1).reshape(bm, head_dim, num_tokens)
    grids = 2 * sampling_locations - 1  # grid_sample coordinates in [-1, 1]
    grids = grids.permute(0, 2, 3, 4, 1, 5).contiguous()  # (B, M, L, P, Q, 2)
    weights = attention_weights.permute(0, 2, 3, 4, 1).contiguous()  # (B, M, L, P, Q)
    output = None
    for level, ((height, width), value_l) in enumerate(
        zip(spatial_shapes, value.split(level_sizes, dim=2))
    ):
        sampled = F.grid_sample(
            value_l.view(bm, head_dim, height, width),
            grids[:, :, level].reshape(bm, num_points, num_queries, 2),
            align_corners=False,
        )  # (B·M, D, P, Q)
        weights_l = weights[:, :, level].reshape(bm, 1, num_points, num_queries)
        if sampled.requires_grad or weights_l.requires_grad:
            contribution = (sampled * weights_l).sum(dim=2)  # (B·M, D, Q)
        else:  # no autograd record: weight in place, saving a (B·M, D, P, Q) buffer
            contribution = sampled.mul_(weights_l).sum(dim=2)
        output = contribution if output is None else output + contribution
    assert output is not None
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2)  # (B, Q, M·D)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with learned offsets (C → M·L·P·2) and weights
    (C → M·L·P)."""

    def __init__(
        self, *, dim: int = 256, num_heads: int = 8, num_levels: int = 3, num_points: int = 4
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MSDeformAttn: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable-DETR initialisation: head m's point p starts at (p+1) times direction
        2π·m/M (larger coordinate 1); attention starts uniform."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack((angles.cos(), angles.sin()), dim=-1)  # (M, 2)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32)  # (P,)
        grid = directions[:, None, None, :] * steps[None, None, :, None]  # (M, 1, P, 2)
        grid = grid.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: SpatialShapes,
        normaliser: Tensor | None = None,
    ) -> Tensor:
        """query (B, Q, C) with positions added, reference_points (B or 1, Q, 2) (x, y) in
        [0, 1] on every level, value (B, S, C) of the levels ``spatial_shapes`` (L × (H_l, W_l)),
        normaliser ``offset_normaliser(spatial_shapes)`` or None → (B, Q, C)."""
        batch, num_queries, _ = query.shape
        num_tokens = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        projected = self.value_proj(value).view(batch, num_tokens, heads, self.dim // heads)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(dim=-1).view(batch, num_queries, heads, levels, points)
        if normaliser is None:
            normaliser = offset_normaliser(spatial_shapes, device=query.device, dtype=query.dtype)
        locations = (
            reference_points[:, :, None, None, None, :]
            + offsets / normaliser[None, None, None, :, None, :]
        )  # (B, Q, M, L, P, 2)
        output = ms_deform_attn_pytorch(projected, spatial_shapes, locations, weights)
        return self.output_proj(output)
