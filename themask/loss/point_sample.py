"""Point sampling of mask maps (docs/DESIGN.md §5): points (x, y) in [0, 1]² over the map
(``align_corners=False``), read bilinearly with zero padding; uncertainty-based selection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from themask.rng import uniform


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """maps (R, C, H, W) read at coords (R, P, 2) → (R, C, P)."""
    grid = (coords * 2.0).sub_(1.0).unsqueeze(2)  # (R, P, 1, 2) in [-1, 1]; one temporary
    return F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", align_corners=False).squeeze(3)


def bilinear_taps(coords: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Flat indices (..., P, 4) and weights (0 outside) of the pixels a bilinear read of an (H, W)
    map at coords (..., P, 2) touches: ``(map.flatten()[index] * weight).sum(-1)``."""
    grid = coords.float() * 2.0 - 1.0
    x = ((grid[..., 0] + 1.0) * width - 1.0) / 2.0  # (..., P) pixel coordinates
    y = ((grid[..., 1] + 1.0) * height - 1.0) / 2.0
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], -1)  # (..., P, 4): nw, ne, sw, se
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], -1)
    weight = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    index = ys.clamp(0, height - 1).long() * width + xs.clamp(0, width - 1).long()
    return index, weight * ((xs >= 0) & (xs <= width - 1) & (ys >= 0) & (ys <= height - 1))


def sample_queries(maps: Tensor, coords: Tensor) -> Tensor:
    """maps (B, N, T, h, w) read bilinearly at the same coords (B, P, 2) in every frame →
    (B, T·P, N) (``point_sample`` transposed); one ``embedding_bag`` whose rows are pixels of N
    values (``grid_sample`` would redo each point's taps for each of the N channels)."""
    batch, queries, frames, height, width = maps.shape
    index, weight = bilinear_taps(coords, height, width)  # (B, P, 4)
    first = torch.arange(batch * frames, device=maps.device).view(batch, frames, 1, 1)
    rows = F.embedding_bag(
        (index.unsqueeze(1) + first * (height * width)).flatten(0, 2),
        maps.permute(0, 2, 3, 4, 1).reshape(-1, queries).contiguous(),  # (B·T·h·w, N)
        per_sample_weights=weight.unsqueeze(1).expand(-1, frames, -1, -1).flatten(0, 2),
        mode="sum",
    )  # (B·T·P, N)
    return rows.view(batch, -1, queries)


def most_uncertain(candidates: Tensor, logits: Tensor, count: int) -> Tensor:
    """The ``count`` candidates (R, S, 2) whose logits (R, S) are nearest 0 → (R, count, 2)."""
    # the smallest |logit|, unsorted: the same set (the loss averages over points), faster
    index = logits.abs().topk(count, dim=1, largest=False, sorted=False).indices  # (R, count)
    points = torch.view_as_complex(candidates.contiguous())  # (R, S): (x, y) as one value
    return torch.view_as_real(points.gather(1, index))


def uncertain_point_coords(
    logits: Tensor,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Points (R, num_points, 2) for logits (R, H, W): the ``importance_sample_ratio`` most
    uncertain of ``oversample_ratio · num_points`` uniform draws, filled up with fresh ones."""
    rows, device = logits.shape[0], logits.device
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    candidates = uniform(rows, num_candidates, 2, device=device, generator=generator)
    values = point_sample(logits.unsqueeze(1).float(), candidates)[:, 0]  # (R, S)
    chosen = most_uncertain(candidates, values, num_uncertain)
    if num_random == 0:
        return chosen
    fill = uniform(rows, num_random, 2, device=device, generator=generator)
    return torch.cat([chosen, fill], dim=1)
