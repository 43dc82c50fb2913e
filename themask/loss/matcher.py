"""Two-round Hungarian matching of queries to GT classes (docs/DESIGN.md §5): cost
``w_cls·(−p_q(class)) + w_bce·BCE + w_dice·dice`` on random points; round 2: queries left free."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from themask.loss.point_sample import bilinear_taps, sample_queries
from themask.loss.targets import BatchTargets, check_invalid
from themask.rng import uniform

IndexPair = tuple[Tensor, Tensor]


def _empty_pair() -> IndexPair:
    return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)


@dataclass
class MatchIndices:
    """One clip's matches per round: (query_idx, target_idx) int64 CPU tensors sorted by query;
    target_idx indexes the clip's classes (ascending). ``secondary`` is empty with one round."""

    primary: IndexPair = field(default_factory=_empty_pair)
    secondary: IndexPair = field(default_factory=_empty_pair)


def _assign(cost: np.ndarray, rows: np.ndarray) -> IndexPair:
    """Hungarian assignment restricted to ``rows`` of ``cost`` (N, M); returns global row ids."""
    if rows.size == 0 or cost.shape[1] == 0:
        return _empty_pair()
    sub_rows, cols = linear_sum_assignment(cost[rows])
    return torch.as_tensor(rows[sub_rows]).long(), torch.as_tensor(cols).long()


def match_two_rounds(
    cost: Tensor | np.ndarray,
    *,
    second_round_cost: Tensor | np.ndarray | None = None,
    num_rounds: int = 2,
) -> MatchIndices:
    """Round 1 on ``cost`` (N, M); round 2 on the rows left free, with ``second_round_cost``
    (N, M) (default ``cost``), matching as many targets as there are free rows."""
    cost_np = np.asarray(cost, dtype=np.float64)
    all_rows = np.arange(cost_np.shape[0])
    primary = _assign(cost_np, all_rows)
    if num_rounds == 1:
        return MatchIndices(primary=primary)
    second_np = cost_np if second_round_cost is None else np.asarray(second_round_cost, np.float64)
    free_rows = np.setdiff1d(all_rows, primary[0].numpy())
    return MatchIndices(primary=primary, secondary=_assign(second_np, free_rows))


def dice_loss(intersection: Tensor, predicted: Tensor, target: Tensor) -> Tensor:
    """1 − (2·Σσ(x)·y + 1) / (Σσ(x) + Σy + 1) from the three sums."""
    return 1.0 - (2.0 * intersection + 1.0) / (predicted + target + 1.0)


def pairwise_bce_dice(
    logits: Tensor, targets: Tensor, weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Mean sigmoid BCE and dice cost of every pair → (B, N, M) each. logits (B, L, N) of N queries
    at L points, targets (B, L, M) in [0, 1], weight (B, L) in {0, 1} (0: left out, target 0)."""
    weight = torch.ones_like(logits[..., 0]) if weight is None else weight
    columns = torch.cat([targets, weight.unsqueeze(-1)], -1).transpose(1, 2)  # (B, M+1, L)
    # BCE(x, y) = softplus(x) − x·y
    bce = columns[:, -1:] @ F.softplus(logits) - columns[:, :-1] @ logits  # (B, M, N)
    bce = bce / weight.sum(-1).clamp(min=1.0)[:, None, None]
    products = columns @ logits.sigmoid()  # (B, M+1, N): Σσ·y, Σσ
    dice = dice_loss(products[:, :-1], products[:, -1:], targets.sum(1)[:, :, None])
    return bce.transpose(1, 2), dice.transpose(1, 2)


@dataclass
class SetCosts:
    """full (S, B, N, C) class + BCE + dice cost, bce (S, B, N, C) its BCE part; columns (B, C)
    the class of each column, valid (B, C) whether it is in the clip."""

    full: Tensor
    bce: Tensor
    columns: Tensor
    valid: Tensor


@dataclass
class BatchMatch:
    """Host-side ``matches[set][clip]``; classes: per clip its class ids (M_b,) ascending;
    labelled (B, T) bool."""

    matches: list[list[MatchIndices]]
    classes: list[np.ndarray]
    labelled: np.ndarray


@dataclass
class HungarianMatcher:
    """Two-round matcher with the point-sampled Mask2Former cost; ``all_class_columns``: cost
    all K classes, not the present ones (default: not on CPU)."""

    cost_class: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    num_points: int = 12544
    second_round_cost: Literal["full", "bce"] = "full"
    all_class_columns: bool | None = None

    def _columns(self, present: Tensor) -> tuple[Tensor, Tensor]:
        """Cost columns (B, C) class ids and their validity (B, C) from ``present`` (B, K)."""
        batch, num_classes = present.shape
        all_classes = self.all_class_columns
        if all_classes or (all_classes is None and present.device.type != "cpu"):
            return torch.arange(num_classes, device=present.device).expand(batch, -1), present
        width = int(present.sum(1).max()) if batch else 0  # on CPU nothing waits here
        # present classes first, ascending (stable sort), then absent ones as padding
        order = present.byte().sort(dim=1, descending=True, stable=True).indices[:, :width]
        return order, present.gather(1, order)

    @torch.no_grad()
    def costs(self, sets: Sequence[tuple[Tensor, Tensor]], targets: BatchTargets) -> SetCosts:
        """Float32 costs of S sets (class_logits (B, N, K+1), mask_logits (B, N, T, h, w)) on
        P uniform points per set and clip, shared by its masks and labelled frames."""
        labels = targets.labels.long()
        batch, frames, height, width = labels.shape
        num_classes = targets.present.shape[1]
        device = labels.device
        columns, valid = self._columns(targets.present)
        num_columns = columns.shape[1]
        # label map → column of its class; ignore, invalid and absent classes → column C (dropped)
        lookup = torch.full((batch, num_classes + 1), num_columns, device=device)
        lookup.scatter_(1, columns, torch.arange(num_columns, device=device).expand(batch, -1))
        known = (labels >= 0) & (labels < num_classes)
        known_labels = torch.where(known, labels, num_classes).flatten(1)
        label_columns = lookup.gather(1, known_labels).view(batch, frames, height * width)
        point_weight = targets.labelled.float().repeat_interleave(self.num_points, 1)  # (B, T·P)
        coords = uniform(len(sets), batch, self.num_points, 2, device=device)  # (S, B, P, 2)
        full, bce_only = [], []
        with torch.autocast(device_type=device.type, enabled=False):
            for (class_logits, mask_logits), set_coords in zip(sets, coords):
                queries = mask_logits.shape[1]
                pred_points = sample_queries(mask_logits.detach().float(), set_coords)
                index, weight = bilinear_taps(set_coords, height, width)  # (B, P, 4)
                taps = label_columns.gather(2, index.view(batch, 1, -1).expand(-1, frames, -1))
                shape = (batch, frames, self.num_points, 4)  # target_points: (B, T, P, C+1)
                target_points = torch.zeros(*shape[:3], num_columns + 1, device=device)
                target_points.scatter_add_(3, taps.view(shape), weight.unsqueeze(1).expand(shape))
                target_points = target_points[..., :num_columns].flatten(1, 2)  # (B, T·P, C)
                bce, dice = pairwise_bce_dice(pred_points, target_points, point_weight)
                probs = class_logits.detach().float().softmax(-1)  # (B, N, K+1)
                class_cost = -probs.gather(2, columns.unsqueeze(1).expand(-1, queries, -1))
                bce_only.append(self.cost_mask * bce)
                full.append(self.cost_class * class_cost + bce_only[-1] + self.cost_dice * dice)
        return SetCosts(torch.stack(full), torch.stack(bce_only), columns, valid)

    def match_sets(
        self, sets: Sequence[tuple[Tensor, Tensor]], targets: BatchTargets, *, num_rounds: int = 2
    ) -> BatchMatch:
        """Match S sets (class_logits (B, N, K+1), mask_logits (B, N, T, h, w)) with one
        device-to-host transfer."""
        costs = self.costs(sets, targets)
        second_is_bce = self.second_round_cost == "bce" and num_rounds == 2
        parts = [costs.full] + ([costs.bce] if second_is_bce else [])
        parts += [costs.columns, costs.valid, targets.labelled, targets.invalid]
        host = torch.cat([part.flatten().float() for part in parts]).cpu().numpy()
        pieces = np.split(host, np.cumsum([part.numel() for part in parts])[:-1])
        full = pieces[0].reshape(costs.full.shape)
        bce = pieces[1].reshape(costs.full.shape) if second_is_bce else None
        columns, valid, labelled, invalid = pieces[-4:]
        check_invalid(int(invalid[0]), int(invalid[1]), targets.present.shape[1])
        valid = valid.reshape(costs.valid.shape) > 0.5
        columns = columns.reshape(costs.columns.shape).astype(np.int64)
        classes = [columns[b][valid[b]] for b in range(valid.shape[0])]

        def match(s: int, b: int) -> MatchIndices:  # set s, clip b: the clip's valid columns
            second = None if bce is None else bce[s, b][:, valid[b]]
            cost = full[s, b][:, valid[b]]
            return match_two_rounds(cost, second_round_cost=second, num_rounds=num_rounds)

        matches = [[match(s, b) for b in range(valid.shape[0])] for s in range(full.shape[0])]
        labelled = labelled.reshape(targets.labelled.shape) > 0.5
        return BatchMatch(matches=matches, classes=classes, labelled=labelled)
