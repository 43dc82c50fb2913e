"""Hierarchical THE-Mask loss over all prediction sets (DESIGN.md §5, §8).

Per prediction set (each matched separately, two rounds):
- class: cross-entropy over K+1 for all N queries; primary and secondary queries get their GT
  class, the others "no object" (class weight ``no_object_weight``);
- hard mask loss (primary queries): sigmoid BCE + dice on uncertainty-sampled points;
- secondary queries: soft mask loss (target = GT ∧ σ(prediction) > 0.5, dense at GT resolution,
  prediction upsampled with nearest interpolation) or, with ``second_round_loss="hard"``, the
  hard mask loss on the full GT masks.
Mask terms are summed over (mask, frame) pairs and divided by the number of GT masks (averaged
over processes under DDP, at least 1) times T. The TAD frame head is supervised with the frame
targets and the same assignments, scaled by ``frame_head_weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from themask.loss.config import LossConfig
from themask.loss.matcher import HungarianMatcher, MatchIndices
from themask.loss.point_sample import point_sample, uncertain_point_coords
from themask.loss.targets import ClipTargets, build_targets
from themask.modeling.outputs import Predictions, PredictionSet


@dataclass
class LossOutput:
    """total: scalar loss to call ``backward()`` on.

    terms: floats for logging. Weighted loss terms summed over prediction sets (their sum is
    ``total``): ``loss_class``, ``loss_mask``, ``loss_dice`` and, with two rounds,
    ``loss_mask_secondary``, ``loss_dice_secondary``; the same with a ``frame_`` prefix for the
    TAD frame head. Also ``matched_fraction_round1/2`` (fraction of the N queries with mask
    supervision in each round, mean over the clips of the final set) and ``num_masks``.
    """

    total: Tensor
    terms: dict[str, float]


def sigmoid_bce_per_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE per row. logits, targets: (R, L). Returns (R,)."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)


def dice_per_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss 1 − (2·Σσ(x)·y + 1) / (Σσ(x) + Σy + 1) per row. logits, targets: (R, L)."""
    probs = logits.sigmoid()
    numerator = 2.0 * (probs * targets).sum(1)
    denominator = probs.sum(1) + targets.sum(1)
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def soft_targets(logits: Tensor, gt_masks: Tensor) -> tuple[Tensor, Tensor]:
    """Soft (round-2) target: the GT mask where the prediction already fires.

    logits: (R, h, w) mask logits; gt_masks: (R, H, W) in {0, 1}.
    Returns (upsampled logits (R, H, W), target (R, H, W)); the logits are upsampled with
    nearest interpolation, the target carries no gradient.
    """
    upsampled = F.interpolate(logits.unsqueeze(1), size=gt_masks.shape[-2:], mode="nearest")
    upsampled = upsampled.squeeze(1)
    target = gt_masks * (upsampled.detach().sigmoid() > 0.5).to(gt_masks.dtype)
    return upsampled, target


@dataclass
class MatchedRows:
    """Matched pairs of one round over the batch, as index tensors (R,) on the loss device.

    clip, query: where the prediction is, ``mask_logits[clip, query]``;
    gt: the row of the GT mask in the batch's concatenated masks (ΣM, T, H, W).
    """

    clip: Tensor
    query: Tensor
    gt: Tensor


@dataclass
class SetAssignment:
    """Everything the losses need from the matching of one prediction set.

    class_target: (B, N) int64; the GT class of primary and secondary queries, K elsewhere.
    """

    class_target: Tensor
    primary: MatchedRows
    secondary: MatchedRows


def assign(
    matches: Sequence[Sequence[MatchIndices]],
    targets: Sequence[ClipTargets],
    *,
    queries: int,
    num_classes: int,
    device: torch.device,
) -> list[SetAssignment]:
    """Turn the matches of S prediction sets (``matches[set][clip]``) into index tensors.

    Built on CPU and moved to ``device`` in one transfer.
    """
    classes = [clip.classes.cpu() for clip in targets]
    offsets = [0]
    for clip in targets:
        offsets.append(offsets[-1] + clip.num_masks)
    pieces: list[Tensor] = []
    for set_matches in matches:
        class_target = torch.full((len(targets), queries), num_classes, dtype=torch.long)
        for b, match in enumerate(set_matches):
            for query, index in (match.primary, match.secondary):
                class_target[b, query] = classes[b][index]
        pieces.append(class_target.flatten())
        for round_name in ("primary", "secondary"):
            pairs = [getattr(match, round_name) for match in set_matches]
            pieces.append(torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(pairs)]))
            pieces.append(torch.cat([q for q, _ in pairs]))
            pieces.append(torch.cat([t + offsets[b] for b, (_, t) in enumerate(pairs)]))
    sizes = [piece.numel() for piece in pieces]
    moved = iter(torch.cat(pieces).to(device).split(sizes))
    result = []
    for _ in matches:
        class_target = next(moved).view(len(targets), queries)
        primary = MatchedRows(next(moved), next(moved), next(moved))
        secondary = MatchedRows(next(moved), next(moved), next(moved))
        result.append(SetAssignment(class_target, primary, secondary))
    return result


def gather(mask_logits: Tensor, gt_masks: Tensor, rows: MatchedRows) -> tuple[Tensor, Tensor]:
    """Matched predictions and GT masks, flattened over (mask, frame).

    mask_logits: (B, N, T, h, w); gt_masks: (ΣM, T, H, W).
    Returns (R·T, h, w) logits and (R·T, H, W) GT masks.
    """
    predicted = mask_logits[rows.clip, rows.query]  # (R, T, h, w)
    return predicted.flatten(0, 1), gt_masks[rows.gt].flatten(0, 1)


def class_loss(class_logits: Tensor, class_target: Tensor, *, no_object_weight: float) -> Tensor:
    """Weighted-mean cross-entropy over K+1 for all queries.

    class_logits: (B, N, K+1), or (B, T, N, K+1) for the frame head (every frame gets the
    clip's targets); class_target: (B, N) with K = no object (class weight
    ``no_object_weight``).
    """
    logits = class_logits.float()
    if logits.dim() == 3:
        logits = logits.unsqueeze(1)  # (B, 1, N, K+1)
    columns = logits.shape[-1]
    target = class_target.unsqueeze(1).expand(-1, logits.shape[1], -1)  # (B, T, N)
    weight = torch.ones(columns, device=logits.device)
    weight[-1] = no_object_weight
    return F.cross_entropy(logits.reshape(-1, columns), target.reshape(-1), weight=weight)


def hard_mask_loss(
    predicted: Tensor,
    gt: Tensor,
    *,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> tuple[Tensor, Tensor]:
    """Point-sampled sigmoid BCE and dice, summed over rows (not normalised).

    predicted: (R, h, w) logits; gt: (R, H, W) in {0, 1}. Points per row come from
    uncertainty sampling on the prediction. Returns (bce_sum, dice_sum).
    """
    if predicted.shape[0] == 0:
        zero = predicted.sum() * 0.0  # keeps the graph connected
        return zero, zero
    with torch.no_grad():
        coords = uncertain_point_coords(
            predicted.detach(),
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
        )  # (R, P, 2)
        gt_points = point_sample(gt.unsqueeze(1), coords)[:, 0]  # (R, P)
    logit_points = point_sample(predicted.unsqueeze(1), coords)[:, 0]  # (R, P)
    bce = sigmoid_bce_per_mask(logit_points, gt_points).sum()
    return bce, dice_per_mask(logit_points, gt_points).sum()


def soft_mask_loss(predicted: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Dense sigmoid BCE and dice against the soft target, summed over rows (not normalised).

    predicted: (R, h, w) logits; gt: (R, H, W). Returns (bce_sum, dice_sum).
    """
    if predicted.shape[0] == 0:
        zero = predicted.sum() * 0.0
        return zero, zero
    upsampled, target = soft_targets(predicted, gt)  # (R, H, W) each
    upsampled, target = upsampled.flatten(1), target.flatten(1)
    return sigmoid_bce_per_mask(upsampled, target).sum(), dice_per_mask(upsampled, target).sum()


class SetCriterion:
    """THE-Mask training objective (``LossConfig`` holds every switch and weight).

    ``criterion(predictions, labels, *, step=0) -> LossOutput`` with labels (B, T, H, W)
    matching the clip layout of ``predictions`` (B clips of T frames).
    """

    def __init__(self, loss_config: LossConfig, num_classes: int) -> None:
        if loss_config.num_rounds not in (1, 2):
            raise ValueError(f"LossConfig.num_rounds must be 1 or 2, got {loss_config.num_rounds}")
        if loss_config.second_round_loss not in ("soft", "hard"):
            raise ValueError(
                "LossConfig.second_round_loss must be 'soft' or 'hard', "
                f"got {loss_config.second_round_loss!r}"
            )
        if len(loss_config.round_weights) != 2:
            raise ValueError(
                f"LossConfig.round_weights must hold 2 weights, got {loss_config.round_weights}"
            )
        self.config = loss_config
        self.num_classes = num_classes
        self.matcher = HungarianMatcher(
            cost_class=loss_config.cost_class,
            cost_mask=loss_config.cost_mask,
            cost_dice=loss_config.cost_dice,
            num_points=loss_config.num_points,
            second_round_cost=loss_config.second_round_cost,
        )

    def rounds_at(self, step: int) -> int:
        """Number of matching rounds used at ``step`` (one round during the warm-up)."""
        return 1 if step < self.config.warmup_steps else self.config.num_rounds

    def __call__(self, predictions: Predictions, labels: Tensor, *, step: int = 0) -> LossOutput:
        final = predictions.clip[-1]
        device = final.mask_logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            return self._compute(predictions, labels, step)

    def _compute(self, predictions: Predictions, labels: Tensor, step: int) -> LossOutput:
        cfg = self.config
        clip_sets = list(predictions.clip)
        frame_sets = list(predictions.frame) if predictions.frame is not None else None
        if frame_sets is not None and len(frame_sets) != len(clip_sets):
            raise ValueError(
                f"predictions.frame has {len(frame_sets)} sets, predictions.clip {len(clip_sets)}"
            )
        if not cfg.deep_supervision:
            clip_sets = clip_sets[-1:]
            frame_sets = frame_sets[-1:] if frame_sets is not None else None
        for prediction_set in clip_sets + (frame_sets or []):
            self._check_shapes(prediction_set, labels)

        targets = build_targets(labels, self.num_classes)
        rounds = self.rounds_at(step)
        # TAD: clip-head classes with frame-head masks; one matching reused by both heads.
        mask_source = frame_sets if frame_sets is not None else clip_sets
        matches = self.matcher.match_sets(
            [(c.class_logits, m.mask_logits) for c, m in zip(clip_sets, mask_source)],
            targets,
            num_rounds=rounds,
        )
        device = clip_sets[-1].mask_logits.device
        queries = clip_sets[-1].mask_logits.shape[1]
        num_masks = average_num_masks(sum(t.num_masks for t in targets), device)
        assignments = assign(
            matches, targets, queries=queries, num_classes=self.num_classes, device=device
        )
        gt_masks = torch.cat([t.masks for t in targets]).to(device)  # (ΣM, T, H, W)

        sums: dict[str, Tensor] = {}
        heads: list[tuple[str, list[PredictionSet], float]] = [("", clip_sets, 1.0)]
        if frame_sets is not None:
            heads.append(("frame_", frame_sets, cfg.frame_head_weight))
        for prefix, sets, head_weight in heads:
            for prediction_set, assignment in zip(sets, assignments):
                terms = self._set_terms(prediction_set, gt_masks, assignment, num_masks, rounds)
                for name, value in terms.items():
                    key = prefix + name
                    weighted = head_weight * value
                    sums[key] = sums[key] + weighted if key in sums else weighted

        total = torch.stack(list(sums.values())).sum()
        names = list(sums)
        values = torch.stack([sums[n].detach() for n in names]).tolist()
        log = dict(zip(names, values))
        final_matches = matches[-1]
        log["matched_fraction_round1"] = _matched_fraction(final_matches, queries, "primary")
        log["matched_fraction_round2"] = _matched_fraction(final_matches, queries, "secondary")
        log["num_masks"] = num_masks
        return LossOutput(total=total, terms=log)

    def _check_shapes(self, prediction_set: PredictionSet, labels: Tensor) -> None:
        masks, classes = prediction_set.mask_logits, prediction_set.class_logits
        if labels.dim() != 4:
            raise ValueError(f"labels must have shape (B, T, H, W), got {tuple(labels.shape)}")
        if (
            masks.dim() != 5
            or masks.shape[0] != labels.shape[0]
            or masks.shape[2] != labels.shape[1]
        ):
            raise ValueError(
                f"mask_logits {tuple(masks.shape)} must be (B, N, T, h, w) with B, T of the "
                f"labels {tuple(labels.shape)}"
            )
        if classes.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"class_logits have {classes.shape[-1]} columns, expected num_classes + 1 = "
                f"{self.num_classes + 1}"
            )

    def _set_terms(
        self,
        prediction_set: PredictionSet,
        gt_masks: Tensor,
        assignment: SetAssignment,
        num_masks: float,
        rounds: int,
    ) -> dict[str, Tensor]:
        """Weighted loss terms of one prediction set of one head.

        gt_masks: (ΣM, T, H, W), the batch's GT masks concatenated over clips.
        """
        cfg = self.config
        mask_logits = prediction_set.mask_logits.float()  # (B, N, T, h, w)
        normaliser = num_masks * mask_logits.shape[2]  # GT masks × T
        class_term = class_loss(
            prediction_set.class_logits,
            assignment.class_target,
            no_object_weight=cfg.no_object_weight,
        )
        terms = {"loss_class": cfg.class_weight * class_term}
        bce, dice = self._hard(*gather(mask_logits, gt_masks, assignment.primary))
        terms["loss_mask"] = cfg.round_weights[0] * cfg.mask_weight * bce / normaliser
        terms["loss_dice"] = cfg.round_weights[0] * cfg.dice_weight * dice / normaliser
        if rounds == 2:
            predicted, gt = gather(mask_logits, gt_masks, assignment.secondary)
            if cfg.second_round_loss == "soft":
                bce, dice = soft_mask_loss(predicted, gt)
                mask_weight, dice_weight = cfg.soft_mask_weight, cfg.soft_dice_weight
            else:
                bce, dice = self._hard(predicted, gt)
                mask_weight, dice_weight = cfg.mask_weight, cfg.dice_weight
            terms["loss_mask_secondary"] = cfg.round_weights[1] * mask_weight * bce / normaliser
            terms["loss_dice_secondary"] = cfg.round_weights[1] * dice_weight * dice / normaliser
        return terms

    def _hard(self, predicted: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        return hard_mask_loss(
            predicted,
            gt,
            num_points=cfg.num_points,
            oversample_ratio=cfg.oversample_ratio,
            importance_sample_ratio=cfg.importance_sample_ratio,
        )


def average_num_masks(count: int, device: torch.device) -> float:
    """Number of GT masks, averaged over processes under DDP, clamped to >= 1."""
    if dist.is_available() and dist.is_initialized():
        total = torch.tensor(float(count), device=device)
        dist.all_reduce(total)
        return max(total.item() / dist.get_world_size(), 1.0)
    return max(float(count), 1.0)


def _matched_fraction(matches: Sequence[MatchIndices], queries: int, which: str) -> float:
    if not matches:
        return 0.0
    counts = [getattr(m, which)[0].numel() for m in matches]
    return sum(counts) / (queries * len(matches))
