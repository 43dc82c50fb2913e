"""Two-round Hungarian matching of queries to ground-truth classes (DESIGN.md §5).

Cost per clip: ``C = w_cls·C_cls + w_bce·C_bce + w_dice·C_dice`` with C_cls = −p_q(class),
and BCE / dice on ``num_points`` uniform random points shared by every mask and every frame of
the clip. Round 1 is a Hungarian assignment (one primary query per class); round 2 solves the
assignment again over the queries round 1 left free (one secondary query per class, as many as
there are free queries). Costs are computed in float32 without gradients; the assignment runs
on CPU with ``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from themask.loss.point_sample import point_sample
from themask.loss.targets import ClipTargets

logger = logging.getLogger(__name__)

IndexPair = tuple[Tensor, Tensor]


def _empty_pair() -> IndexPair:
    return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)


@dataclass
class MatchIndices:
    """Assignment of one clip: each round is (query_idx, target_idx), int64 CPU tensors of
    equal length, sorted by query index. ``secondary`` is empty for one-round matching."""

    primary: IndexPair = field(default_factory=_empty_pair)
    secondary: IndexPair = field(default_factory=_empty_pair)


def _assign(cost: np.ndarray, rows: np.ndarray) -> IndexPair:
    """Hungarian assignment restricted to ``rows`` of ``cost`` (N, M); returns global row ids."""
    if rows.size == 0 or cost.shape[1] == 0:
        return _empty_pair()
    sub_rows, cols = linear_sum_assignment(cost[rows])
    return torch.as_tensor(rows[sub_rows], dtype=torch.long), torch.as_tensor(
        cols, dtype=torch.long
    )


def match_two_rounds(
    cost: Tensor | np.ndarray,
    *,
    second_round_cost: Tensor | np.ndarray | None = None,
    num_rounds: int = 2,
) -> MatchIndices:
    """Round 1 on ``cost`` (N, M); round 2 on the rows round 1 left free.

    second_round_cost: (N, M) cost used by round 2 (default: ``cost``).
    With fewer free queries than targets, round 2 matches as many targets as it can.
    """
    if num_rounds not in (1, 2):
        raise ValueError(f"num_rounds must be 1 or 2, got {num_rounds}")
    cost_np = _as_numpy(cost)
    if cost_np.ndim != 2:
        raise ValueError(f"cost must be a (N, M) matrix, got shape {cost_np.shape}")
    all_rows = np.arange(cost_np.shape[0])
    primary = _assign(cost_np, all_rows)
    if num_rounds == 1:
        return MatchIndices(primary=primary)
    second_np = cost_np if second_round_cost is None else _as_numpy(second_round_cost)
    if second_np.shape != cost_np.shape:
        raise ValueError(f"second_round_cost has shape {second_np.shape}, expected {cost_np.shape}")
    free_rows = np.setdiff1d(all_rows, primary[0].numpy())
    if free_rows.size < cost_np.shape[1]:
        logger.debug(
            "round 2: %d classes but only %d free queries; %d classes get no secondary query",
            cost_np.shape[1],
            free_rows.size,
            cost_np.shape[1] - free_rows.size,
        )
    return MatchIndices(primary=primary, secondary=_assign(second_np, free_rows))


def _as_numpy(cost: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(cost, Tensor):
        return cost.detach().float().cpu().numpy()
    return np.asarray(cost, dtype=np.float64)


def pairwise_sigmoid_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE between every prediction and every target.

    logits: (N, L), targets: (M, L) in [0, 1]. Returns (N, M).
    """
    length = logits.shape[1]
    positive = F.softplus(-logits)  # −log σ(x)
    negative = F.softplus(logits)  # −log(1 − σ(x))
    return (positive @ targets.T + negative @ (1.0 - targets).T) / length


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice cost 1 − (2·Σσ(x)·y + 1) / (Σσ(x) + Σy + 1) for every pair.

    logits: (N, L), targets: (M, L). Returns (N, M).
    """
    probs = logits.sigmoid()
    numerator = 2.0 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


@dataclass
class ClipCost:
    """Cost matrices (N, M) of one clip: ``full`` (class + BCE + dice) and ``bce`` (BCE only)."""

    full: Tensor
    bce: Tensor


class HungarianMatcher:
    """Two-round matcher with the point-sampled Mask2Former cost.

    ``second_round_cost``: "full" (video variant) or "bce" (official single-frame variant).
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
        second_round_cost: Literal["full", "bce"] = "full",
    ) -> None:
        if second_round_cost not in ("full", "bce"):
            raise ValueError(
                f"second_round_cost must be 'full' or 'bce', got {second_round_cost!r}"
            )
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.second_round_cost = second_round_cost

    @torch.no_grad()
    def costs(
        self, class_logits: Tensor, mask_logits: Tensor, targets: Sequence[ClipTargets]
    ) -> list[ClipCost]:
        """Cost matrices of one prediction set, float32, on the predictions' device.

        class_logits: (B, N, K+1); mask_logits: (B, N, T, h, w); targets: B clips with masks
        (M_b, T, H, W). One uniform point set (P points) per clip, shared by all its masks
        and frames, so each mask is compared on T·P points.
        """
        batch, queries, frames = mask_logits.shape[:3]
        device = mask_logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            probs = class_logits.detach().float().softmax(-1)  # (B, N, K+1)
            coords = torch.rand(batch, self.num_points, 2, device=device)  # (B, P, 2)
            maps = mask_logits.detach().float().flatten(1, 2)  # (B, N·T, h, w)
            pred_points = point_sample(maps, coords).reshape(batch, queries, -1)  # (B, N, T·P)
            result = []
            for b, clip in enumerate(targets):
                masks = clip.masks.to(device=device, dtype=torch.float32)
                num_masks = masks.shape[0]
                if masks.shape[1] != frames:
                    raise ValueError(
                        f"targets of clip {b} have {masks.shape[1]} frames, predictions {frames}"
                    )
                target_points = point_sample(
                    masks.flatten(0, 1).unsqueeze(0), coords[b : b + 1]
                ).reshape(num_masks, frames * self.num_points)  # (M, T·P)
                class_cost = -probs[b][:, clip.classes.to(device)]  # (N, M)
                bce = pairwise_sigmoid_bce(pred_points[b], target_points)
                dice = pairwise_dice(pred_points[b], target_points)
                full = self.cost_class * class_cost + self.cost_mask * bce + self.cost_dice * dice
                result.append(ClipCost(full=full, bce=self.cost_mask * bce))
        return result

    def match_sets(
        self,
        sets: Sequence[tuple[Tensor, Tensor]],
        targets: Sequence[ClipTargets],
        *,
        num_rounds: int = 2,
    ) -> list[list[MatchIndices]]:
        """Match several prediction sets, each separately.

        sets: (class_logits (B, N, K+1), mask_logits (B, N, T, h, w)) per prediction set.
        Returns ``result[set][clip]``. All cost matrices go to the CPU in one transfer.
        """
        per_set = [self.costs(class_logits, masks, targets) for class_logits, masks in sets]
        second_is_bce = self.second_round_cost == "bce" and num_rounds == 2
        flat: list[Tensor] = []
        for clip_costs in per_set:
            for cost in clip_costs:
                flat.append(cost.full.reshape(-1))
                if second_is_bce:
                    flat.append(cost.bce.reshape(-1))
        if not flat:
            return [[] for _ in per_set]
        values = torch.cat(flat).cpu().numpy()
        offset = 0
        matches: list[list[MatchIndices]] = []
        for clip_costs in per_set:
            set_matches = []
            for cost in clip_costs:
                shape = tuple(cost.full.shape)
                size = cost.full.numel()
                full = values[offset : offset + size].reshape(shape)
                offset += size
                second: np.ndarray | None = None
                if second_is_bce:
                    second = values[offset : offset + size].reshape(shape)
                    offset += size
                set_matches.append(
                    match_two_rounds(full, second_round_cost=second, num_rounds=num_rounds)
                )
            matches.append(set_matches)
        return matches

    def __call__(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        targets: Sequence[ClipTargets],
        *,
        num_rounds: int = 2,
    ) -> list[MatchIndices]:
        """Match one prediction set; returns one ``MatchIndices`` per clip."""
        return self.match_sets([(class_logits, mask_logits)], targets, num_rounds=num_rounds)[0]
