"""Point sampling of mask maps and uncertainty-based point selection (docs/DESIGN.md §5).

Point coordinates are (x, y) in [0, 1]² over the whole map: x runs along W, y along H, and
(0, 0) is the top-left corner of the top-left pixel (``align_corners=False`` convention: pixel
centres sit at (i + 0.5) / W). Maps are read with bilinear interpolation and zero padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample maps at points.

    maps:   (R, C, H, W)
    coords: (R, P, 2) points (x, y) in [0, 1]; one point set per map batch entry
            (expand a shared set to R rows).
    Returns (R, C, P).
    """
    grid = coords.unsqueeze(2) * 2.0 - 1.0  # (R, P, 1, 2) in grid_sample's [-1, 1]
    sampled = F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", align_corners=False)
    return sampled.squeeze(3)


def bilinear_taps(coords: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The four pixels a bilinear read of an (H, W) map at ``coords`` touches.

    coords: (..., P, 2) points (x, y) in [0, 1]. Returns flat pixel indices ``y·W + x``
    (..., P, 4) int64 and weights (..., P, 4) float32, zero for pixels outside the map (their
    index is clamped into it), so ``(map.flatten()[index] * weight).sum(-1)`` equals
    ``point_sample`` (same formulas as ``grid_sample``, up to rounding).
    """
    grid = coords.float() * 2.0 - 1.0
    x = ((grid[..., 0] + 1.0) * width - 1.0) / 2.0  # (..., P) pixel coordinates
    y = ((grid[..., 1] + 1.0) * height - 1.0) / 2.0
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], -1)  # (..., P, 4): nw, ne, sw, se
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], -1)
    weight = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1)
    inside = (xs >= 0) & (xs <= width - 1) & (ys >= 0) & (ys <= height - 1)
    index = ys.clamp(0, height - 1).long() * width + xs.clamp(0, width - 1).long()
    return index, weight * inside


def most_uncertain(candidates: Tensor, logits: Tensor, count: int) -> Tensor:
    """Keep the ``count`` candidate points whose logit is closest to 0 (|logit| smallest).

    candidates: (R, S, 2) points; logits: (R, S) mask logits at those points.
    Returns (R, count, 2).
    """
    uncertainty = -logits.abs()  # (R, S): larger = more uncertain
    # The loss averages over the points, so their order is irrelevant: unsorted top-k is the
    # same set (≈2.4× faster on CPU for 9,408 of 37,632 candidates).
    index = uncertainty.topk(count, dim=1, sorted=False).indices  # (R, count)
    return torch.gather(candidates, 1, index.unsqueeze(-1).expand(-1, -1, 2))


def uncertain_point_coords(
    logits: Tensor,
    *,
    num_points: int = 12544,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose points per mask for the hard mask loss (uncertainty sampling).

    Draws ``oversample_ratio · num_points`` uniform points, keeps the
    ``importance_sample_ratio · num_points`` most uncertain ones and fills up with fresh
    uniform points.
    logits: (R, H, W) mask logits (no gradient is needed). Returns (R, num_points, 2).
    """
    if oversample_ratio < 1.0:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0.0 <= importance_sample_ratio <= 1.0:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}"
        )
    rows = logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    device = logits.device
    candidates = torch.rand(rows, num_candidates, 2, device=device, generator=generator)
    values = point_sample(logits.unsqueeze(1).float(), candidates)[:, 0]  # (R, S)
    chosen = most_uncertain(candidates, values, num_uncertain)
    if num_random == 0:
        return chosen
    fill = torch.rand(rows, num_random, 2, device=device, generator=generator)
    return torch.cat([chosen, fill], dim=1)
