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
    num_tokens, num_levels = value.shape[1], sampling_locations.shape[3]
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
    if torch.compiler.is_compiling():  # export: ONNX GridSample
        return _sample_with_grid(value, spatial_shapes, sampling_locations, attention_weights)
    if _needs_grad(value, sampling_locations, attention_weights):
        return _RecomputedRead.apply(value, sampling_locations, attention_weights, spatial_shapes)
    work = torch.promote_types(sampling_locations.dtype, torch.float32)
    size = offset_normaliser(spatial_shapes, device=value.device, dtype=work)
    positions = [sampling_locations[..., a] * size[:, None, a] + 0.5 for a in (0, 1)]
    return _sample_with_bags(value, spatial_shapes, positions, attention_weights, size)


class _RecomputedRead(torch.autograd.Function):
    """Training: the bag reader forward, keeping only its inputs; the backward recomputes the
    ``grid_sample`` reader and differentiates it, so the (B·M, D, P, Q) samples of every level
    live only during one layer's backward (≈ half of a deformable layer's saved activations)."""

    @staticmethod
    def forward(ctx, value, locations, weights, spatial_shapes):
        ctx.save_for_backward(value, locations, weights)
        ctx.spatial_shapes = spatial_shapes
        with torch.no_grad():
            return ms_deform_attn_pytorch(value, spatial_shapes, locations, weights)

    @staticmethod
    def backward(ctx, grad_output):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():  # value in float32 under a bf16 autocast, as its forward had
            value = inputs[0].to(torch.promote_types(inputs[0].dtype, inputs[1].dtype))
            output = _sample_with_grid(value, ctx.spatial_shapes, *inputs[1:])
        needed = [t for t in inputs if t.requires_grad]
        grad_output = grad_output.transpose(1, 2).contiguous().transpose(1, 2)  # output's layout
        grads = iter(torch.autograd.grad(output, needed, grad_output))
        return *(next(grads) if t.requires_grad else None for t in inputs), None


def _needs_grad(*tensors: Tensor) -> bool:
    """Autograd records this call (then ``_RecomputedRead``: grid_sample's backward is faster
    than embedding_bag's)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sample_with_grid(
    value: Tensor, spatial_shapes: SpatialShapes, locations: Tensor, weights: Tensor
) -> Tensor:
    """One ``grid_sample`` per level, Q innermost (the CPU kernel vectorises along it)."""
    batch, num_tokens, num_heads, head_dim = value.shape
    _, num_queries, _, _, num_points, _ = locations.shape
    bm = batch * num_heads
    value = value.permute(0, 2, 3, 1).reshape(bm, head_dim, num_tokens)
    grids = (2 * locations - 1).permute(0, 2, 3, 4, 1, 5).contiguous()  # (B, M, L, P, Q, 2)
    weights = weights.permute(0, 2, 3, 4, 1).contiguous()  # (B, M, L, P, Q)
    level_sizes = [h * w for h, w in spatial_shapes]
    output = sum(
        (
            F.grid_sample(
                value_l.view(bm, head_dim, height, width),
                grids[:, :, level].reshape(bm, num_points, num_queries, 2),
                align_corners=False,
            )  # (B·M, D, P, Q)
            * weights[:, :, level].reshape(bm, 1, num_points, num_queries)
        ).sum(dim=2)  # (B·M, D, Q)
        for level, ((height, width), value_l) in enumerate(
            zip(spatial_shapes, value.split(level_sizes, dim=2))
        )
    )
    assert isinstance(output, Tensor)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2)  # (B, Q, M·D)


def _sample_with_bags(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    positions: list[Tensor],
    weights: Tensor,
    normaliser: Tensor,
) -> Tensor:
    """``positions``: x and y (B, Q, M, L, P) of the points in pixels + 0.5 (overwritten);
    ``normaliser``: ``offset_normaliser(spatial_shapes)``. One
    ``embedding_bag`` over the rows (batch, token, head) of the value maps, each map given a zero
    border (1 before, 2 after) so that clamped corners read 0: bag (b, q, m) sums its 4·L·P
    corners weighted by bilinear × attention weight. No (B·M, D, P, Q) buffer."""
    batch, _, num_heads, head_dim = value.shape
    num_levels, num_points = weights.shape[3:5]
    dtype = torch.promote_types(value.dtype, positions[0].dtype)
    work, device = torch.promote_types(dtype, torch.float32), value.device
    padded = [
        F.pad(v.unflatten(1, (h, w)), (0, 0, 0, 0, 1, 2, 1, 2)).flatten(1, 2)
        for (h, w), v in zip(spatial_shapes, value.split([h * w for h, w in spatial_shapes], 1))
    ]
    table = torch.cat(padded, 1).to(dtype)  # (B, S', M, D)
    # per-level constants as (L, P) rows, so that broadcasts run over L·P contiguous values
    size = normaliser.to(work).t()[..., None].repeat(1, 1, num_points)  # (2, L, P): W, H
    low, high_w, low_w = [], [], []
    for axis, pos in enumerate(positions):  # clamped to the zero border
        pos = pos.to(work).clamp_(min=0)
        torch.minimum(pos, size[axis] + 1, out=pos)
        low.append(pos.int())  # floor, as pos >= 0
        high_w.append(pos.sub_(low[-1]))
        low_w.append(1 - pos)
    padded_size = (size + 3).int()
    area = padded_size[0] * padded_size[1]
    offset = (area.cumsum(0) - area) * num_heads + torch.arange(
        num_heads, dtype=torch.int32, device=device
    )[:, None, None]  # (M, L, P): level start, head
    offset = offset + torch.arange(batch, dtype=torch.int32, device=device).view(-1, 1, 1, 1, 1) * (
        table.shape[1] * num_heads
    )  # (B, 1, M, L, P)
    row_step = padded_size[0] * num_heads
    first = low[1].mul_(row_step).add_(low[0], alpha=num_heads).add_(offset)  # (B, Q, M, L, P)
    corner_w = torch.empty(*first.shape[:3], 4, num_levels, num_points, dtype=work, device=device)
    index = torch.empty(corner_w.shape, dtype=torch.int32, device=device)
    weights = weights.to(work)
    for dy, row in enumerate((low_w[1] * weights, high_w[1] * weights)):
        for dx, column in enumerate((low_w[0], high_w[0])):
            torch.mul(row, column, out=corner_w[:, :, :, 2 * dy + dx])
            torch.add(first, row_step * dy + dx * num_heads, out=index[:, :, :, 2 * dy + dx])
    output = F.embedding_bag(
        index.flatten(3).flatten(0, 2),
        table.view(-1, head_dim),
        per_sample_weights=corner_w.flatten(3).flatten(0, 2).to(dtype),
        mode="sum",
    )  # (B·Q·M, D)
    return output.view(batch, -1, num_heads * head_dim)


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
        logits = self.attention_weights(query).view(batch, num_queries, heads, levels, points)
        if normaliser is None:
            normaliser = offset_normaliser(spatial_shapes, device=query.device, dtype=query.dtype)
        if torch.compiler.is_compiling() or _needs_grad(projected, offsets, logits):
            weights = logits.flatten(3).softmax(dim=-1).view_as(logits)
            locations = (
                reference_points[:, :, None, None, None, :]
                + offsets / normaliser[None, None, None, :, None, :]
            )  # (B, Q, M, L, P, 2)
            output = ms_deform_attn_pytorch(projected, spatial_shapes, locations, weights)
        else:  # softmax over L·P, and pixel positions without dividing the offsets
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            weights = (logits - logits.amax((3, 4), keepdim=True)).exp_()
            weights /= weights.sum((3, 4), keepdim=True)
            anchor = reference_points[:, :, None, None, None, :] * normaliser[:, None, :] + 0.5
            positions = [offsets[..., a] + anchor[..., a] for a in (0, 1)]
            output = _sample_with_bags(projected, spatial_shapes, positions, weights, normaliser)
        return self.output_proj(output)
