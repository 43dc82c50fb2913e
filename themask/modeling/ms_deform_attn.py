"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch: each query reads P points
per head and level (reference point + learned pixel offsets), weighted by a softmax over L·P."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from themask.modeling.linear import Linear

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
    work = torch.promote_types(sampling_locations.dtype, torch.float32)
    size = offset_normaliser(spatial_shapes, device=value.device, dtype=work)
    positions = sampling_locations * size[:, None] + 0.5  # pixels + 0.5, at least float32
    if _needs_grad(value, positions, attention_weights):
        return _BagRead.apply(value, positions, attention_weights, spatial_shapes)
    return _sample_with_bags(value, spatial_shapes, positions.unbind(-1), attention_weights, size)


class _BagRead(torch.autograd.Function):
    """Training: the bag reader at positions (B, Q, M, L, P, 2) in pixels + 0.5, keeping only
    its inputs; the backward recomputes the corner layout and differentiates the bags directly
    (no (B·M, D, P, Q) samples anywhere): per-corner dot products ⟨grad, value row⟩ give the
    weight and position gradients, and the value gradient is the transposed read."""

    @staticmethod
    def forward(ctx, value, positions, weights, spatial_shapes):
        ctx.save_for_backward(value, positions, weights)
        ctx.spatial_shapes = spatial_shapes
        size = offset_normaliser(spatial_shapes, device=value.device, dtype=positions.dtype)
        return _sample_with_bags(value, spatial_shapes, positions.unbind(-1), weights, size)

    @staticmethod
    def backward(ctx, grad_output):
        value, positions, weights = ctx.saved_tensors
        num_levels, num_points = weights.shape[3:]
        size = offset_normaliser(ctx.spatial_shapes, device=value.device, dtype=positions.dtype)
        positions = positions.detach().unbind(-1)
        inside = [pos >= 0 for pos in positions]  # left of / above the border: no gradient
        with torch.enable_grad():  # autograd for two pieces: bordered table → value, and
            value = value.detach().requires_grad_()  # ⟨grad, row⟩ per corner (embedding_bag's)
            layout = _bag_layout(value, ctx.spatial_shapes, positions, weights.detach(), size)
            table, index, corner_w, (fx, fy) = layout
            leaf = corner_w.detach().requires_grad_()
            read = F.embedding_bag(index, table.detach(), per_sample_weights=leaf, mode="sum")
            grad_rows = grad_output.reshape(read.shape).to(read.dtype)  # (B·Q·M, D)
            (dots,) = torch.autograd.grad(read, leaf, grad_rows)
        dots = dots.view(*weights.shape[:3], 2, 2, num_levels, num_points).to(fx.dtype)
        along_x = dots[..., 1, :, :] - dots[..., 0, :, :]  # (B, Q, M, dy, L, P)
        rows = dots[..., 0, :, :] + fx.unsqueeze(3) * along_x
        grad_fx = weights * torch.lerp(along_x[:, :, :, 0], along_x[:, :, :, 1], fy)
        grad_fy = weights * (rows[:, :, :, 1] - rows[:, :, :, 0])
        grad_weights = torch.lerp(rows[:, :, :, 0], rows[:, :, :, 1], fy).to(weights.dtype)
        grad_xy = torch.stack((grad_fx * inside[0], grad_fy * inside[1]), -1)  # (B, Q, M, L, P, 2)
        grad_table = _spread_rows(grad_rows, index, corner_w, ctx.spatial_shapes, value.shape)
        (grad_value,) = torch.autograd.grad(table, value, grad_table.view(table.shape))
        return grad_value, grad_xy.to(positions[0].dtype), grad_weights, None


def _spread_rows(
    grad_rows: Tensor,
    index: Tensor,
    corner_w: Tensor,
    spatial_shapes: SpatialShapes,
    value_shape: torch.Size,
) -> Tensor:
    """The transposed bag read: table row r sums corner weight × grad of every bag that reads
    it; grad_rows (B·Q·M, D), index and corner_w (B·Q·M, 4·L·P) of ``_bag_layout``, value_shape
    (B, S, M, D) → (B, S', M, D). The points are sorted once, by their top-left row: corner
    (dy, dx) reads that row shifted within its level, so each corner is one bag sum, shifted."""
    batch, _, num_heads, head_dim = value_shape
    padded = [(h + 3, w + 3) for h, w in spatial_shapes]
    sizes = [h * w for h, w in padded]
    points = index.shape[1] // 4
    touched, order = index[:, :points].flatten().sort()  # corner (0, 0) of each point
    rows = torch.arange(batch * sum(sizes) * num_heads, device=index.device, dtype=touched.dtype)
    starts = torch.searchsorted(touched, rows)
    bags = order.div(points, rounding_mode="floor")
    weights = corner_w.view(-1, 4, points).transpose(0, 1).reshape(4, -1).index_select(1, order)
    grad_table = grad_rows.new_zeros(batch, sum(sizes), num_heads, head_dim)
    for corner in range(4):
        part = F.embedding_bag(
            bags, grad_rows, starts, per_sample_weights=weights[corner], mode="sum"
        ).view(grad_table.shape)
        start = 0
        for size, (_, width) in zip(sizes, padded):
            shift = (corner // 2) * width + corner % 2  # rows stay inside the zero border
            grad_table[:, start + shift : start + size] += part[:, start : start + size - shift]
            start += size
    return grad_table


def _needs_grad(*tensors: Tensor) -> bool:
    """Autograd records this call (then ``_BagRead``, which saves only its inputs)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sample_with_grid(
    value: Tensor, spatial_shapes: SpatialShapes, locations: Tensor, weights: Tensor
) -> Tensor:
    """One ``grid_sample`` per level, Q innermost (the CPU kernel vectorises along it); the
    export path (ONNX ``GridSample``)."""
    batch, num_tokens, num_heads, head_dim = value.shape
    _, num_queries, _, _, num_points, _ = locations.shape
    bm = batch * num_heads
    value = value.permute(0, 2, 3, 1).reshape(bm, head_dim, num_tokens)
    grids = (2 * locations - 1).permute(0, 2, 3, 4, 1, 5).contiguous()  # (B, M, L, P, Q, 2)
    weights = weights.permute(0, 2, 3, 4, 1).contiguous()  # (B, M, L, P, Q)
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
            zip(spatial_shapes, value.split([h * w for h, w in spatial_shapes], dim=2))
        )
    )
    assert isinstance(output, Tensor)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2)  # (B, Q, M·D)


def _sample_with_bags(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    positions: Sequence[Tensor],
    weights: Tensor,
    normaliser: Tensor,
) -> Tensor:
    """One ``embedding_bag`` over the rows of the zero-bordered value maps (``_bag_layout``)."""
    table, index, corner_w, _ = _bag_layout(value, spatial_shapes, positions, weights, normaliser)
    output = F.embedding_bag(index, table, per_sample_weights=corner_w, mode="sum")
    return output.view(value.shape[0], -1, value.shape[2] * value.shape[3])  # (B, Q, M·D)


def _bag_layout(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    positions: Sequence[Tensor],
    weights: Tensor,
    normaliser: Tensor,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """``positions``: x and y (B, Q, M, L, P) of the points in pixels + 0.5;
    ``normaliser``: ``offset_normaliser(spatial_shapes)``. The rows (batch, token, head) of the
    value maps, each map given a zero border (1 before, 2 after) so that clamped corners read 0:
    table (B·S'·M, D); bag (b, q, m) reads its 4·L·P corners, index and corner weights (bilinear ×
    attention) (B·Q·M, 4·L·P), corner order (dy, dx, level, point); and the fractional parts x, y
    (B, Q, M, L, P). No (B·M, D, P, Q) buffer."""
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
        pos = pos.to(work).clamp(min=0)
        torch.minimum(pos, size[axis] + 1, out=pos)
        low.append(pos.int())  # floor, as pos >= 0
        high_w.append(pos.sub_(low[-1]))
        low_w.append(1 - pos)
    padded_size = (size + 3).int()
    area = padded_size[0] * padded_size[1]
    heads = torch.arange(num_heads, dtype=torch.int32, device=device)[:, None, None]
    batches = torch.arange(batch, dtype=torch.int32, device=device).view(-1, 1, 1, 1, 1)
    offset = (area.cumsum(0) - area) * num_heads + heads  # (M, L, P): level start, head
    offset = offset + batches * (table.shape[1] * num_heads)  # (B, 1, M, L, P)
    row_step = padded_size[0] * num_heads
    first = low[1].mul_(row_step).add_(low[0], alpha=num_heads).add_(offset)  # (B, Q, M, L, P)
    corner_w = torch.empty(*first.shape[:3], 4, num_levels, num_points, dtype=work, device=device)
    index = torch.empty(corner_w.shape, dtype=torch.int32, device=device)
    weights = weights.to(work)
    for dy, row in enumerate((low_w[1] * weights, high_w[1] * weights)):
        for dx, column in enumerate((low_w[0], high_w[0])):
            torch.mul(row, column, out=corner_w[:, :, :, 2 * dy + dx])
            torch.add(first, row_step * dy + dx * num_heads, out=index[:, :, :, 2 * dy + dx])
    index, corner_w = index.flatten(3).flatten(0, 2), corner_w.flatten(3).flatten(0, 2).to(dtype)
    return table.view(-1, head_dim), index, corner_w, high_w


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention, learned offsets (C → M·L·P·2) and weights (C → M·L·P)."""

    def __init__(
        self, *, dim: int = 256, num_heads: int = 8, num_levels: int = 3, num_points: int = 4
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MSDeformAttn: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.sampling_offsets = Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = Linear(dim, dim)
        self.output_proj = Linear(dim, dim)
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
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        projected = self.value_proj(value).view(batch, value.shape[1], heads, self.dim // heads)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        logits = self.attention_weights(query).view(batch, num_queries, heads, levels, points)
        if normaliser is None:
            normaliser = offset_normaliser(spatial_shapes, device=query.device, dtype=query.dtype)
        reference = reference_points[:, :, None, None, None, :]
        if torch.compiler.is_compiling():  # export: normalised locations for ONNX GridSample
            weights = logits.flatten(3).softmax(dim=-1).view_as(logits)
            locations = reference + offsets / normaliser[:, None, :]  # (B, Q, M, L, P, 2)
            output = ms_deform_attn_pytorch(projected, spatial_shapes, locations, weights)
            return self.output_proj(output)
        anchor = (reference * normaliser[:, None, :] + 0.5).expand(-1, -1, heads, -1, points, -1)
        anchor = anchor.contiguous()  # pixels + 0.5 (B or 1, Q, M, L, P, 2): plain adds below
        if _needs_grad(projected, offsets, logits):
            weights = logits.flatten(3).softmax(dim=-1).view_as(logits)
            output = _BagRead.apply(projected, offsets + anchor, weights, spatial_shapes)
        else:  # softmax over L·P in at least float32
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            weights = (logits - logits.amax((3, 4), keepdim=True)).exp_()
            weights /= weights.sum((3, 4), keepdim=True)
            positions = [offsets[..., a] + anchor[..., a] for a in (0, 1)]
            output = _sample_with_bags(projected, spatial_shapes, positions, weights, normaliser)
        return self.output_proj(output)
