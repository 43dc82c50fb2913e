"""Hierarchical THE-Mask loss over all prediction sets (docs/DESIGN.md §5, §8).

Per prediction set (each matched separately, two rounds):
- class: cross-entropy over K+1 for all N queries; primary and secondary queries get their GT
  class, the others "no object" (class weight ``no_object_weight``);
- hard mask loss (primary queries): sigmoid BCE + dice on uncertainty-sampled points;
- secondary queries: soft mask loss (target = GT ∧ σ(prediction) > 0.5, dense at GT resolution,
  prediction upsampled with nearest interpolation) or, with ``second_round_loss="hard"``, the
  hard mask loss on the full GT masks.
Mask terms are summed over (mask, frame) pairs of labelled frames (a frame whose labels are all
ignore is left out) and divided by the number of such pairs (averaged over processes under DDP,
at least T): GT masks × T for densely labelled clips. The TAD frame head is supervised with the
frame targets and the same assignments, scaled by ``frame_head_weight``.

The prediction sets are handled together: one matching call for all of them (one transfer to
the host), one upload of all assignments, and each loss computed once over the matched rows of
every set; nothing in between waits for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from themask.distributed import all_reduce, is_initialized
from themask.loss.config import LossConfig
from themask.loss.matcher import BatchMatch, HungarianMatcher, MatchIndices
from themask.loss.point_sample import point_sample, uncertain_point_coords
from themask.loss.targets import BatchTargets, build_targets
from themask.modeling.outputs import Predictions, PredictionSet

CHUNK_VALUES = 1 << 21  # hard loss: candidate coordinates per chunk of rows (8 MiB)
GT_CHUNK_PIXELS = 1 << 22  # GT mask pixels built at once for the point losses (16 MiB)


@dataclass
class LossOutput:
    """total: scalar loss to call ``backward()`` on.

    terms: for logging. Weighted loss terms summed over prediction sets (their sum is
    ``total``), detached 0-d tensors on the loss device (``float()`` waits for the device: read
    them at log intervals only): ``loss_class``, ``loss_mask``, ``loss_dice`` and, with two
    rounds, ``loss_mask_secondary``, ``loss_dice_secondary``; the same with a ``frame_`` prefix
    for the TAD frame head. Also, as floats (0-d tensors under DDP for ``num_masks``),
    ``matched_fraction_round1/2`` (fraction of the N queries with mask supervision in each
    round, mean over the clips of the final set) and ``num_masks`` (GT masks of the batch,
    averaged over processes, at least 1).
    """

    total: Tensor
    terms: dict[str, Tensor | float]


def sigmoid_bce_per_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE per row. logits, targets: (R, L). Returns (R,)."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)


def dice_per_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss 1 − (2·Σσ(x)·y + 1) / (Σσ(x) + Σy + 1) per row. logits, targets: (R, L)."""
    probs = logits.sigmoid()
    numerator = 2.0 * (probs * targets).sum(1)
    denominator = probs.sum(1) + targets.sum(1)
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


@dataclass
class MatchedRows:
    """Matched (mask, labelled frame) pairs of one round over all sets, index tensors (R,).

    query: the prediction ``mask_logits[clip, query, frame]`` of its set; cls: the GT class.
    Rows are grouped by set (``sizes`` rows each, host ints), then by clip, query and frame.
    """

    sizes: list[int]
    clip: Tensor
    query: Tensor
    frame: Tensor
    cls: Tensor

    def split(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """(clip, query, frame) index tensors per set."""
        parts = [index.split(self.sizes) for index in (self.clip, self.query, self.frame)]
        return list(zip(*parts))


@dataclass
class Assignment:
    """Everything the losses need from the matching of S prediction sets.

    class_target: (S, B, N) int64; the GT class of primary and secondary queries, K elsewhere.
    counts: (2,) float32, the (mask, labelled frame) pairs and the GT masks of the batch.
    """

    class_target: Tensor
    primary: MatchedRows
    secondary: MatchedRows
    counts: Tensor


def assign(
    result: BatchMatch, *, queries: int, num_classes: int, device: torch.device
) -> Assignment:
    """Turn the host-side matches of S sets into index tensors on ``device``: one upload
    (from pinned memory, not waited for, on CUDA)."""
    sets = len(result.matches)
    frames = [np.flatnonzero(row) for row in result.labelled]  # labelled frames per clip
    class_target = np.full((sets, len(result.classes), queries), num_classes, dtype=np.int64)
    rows: dict[str, list[list[np.ndarray]]] = {"primary": [], "secondary": []}
    for s, set_matches in enumerate(result.matches):
        for round_name, round_rows in rows.items():
            columns: list[list[np.ndarray]] = [[], [], [], []]  # clip, query, frame, class
            for b, match in enumerate(set_matches):
                query, target = (x.numpy() for x in getattr(match, round_name))
                classes = result.classes[b][target]
                class_target[s, b, query] = classes
                repeat = len(frames[b])
                columns[0].append(np.full(len(query) * repeat, b))
                columns[1].append(np.repeat(query, repeat))
                columns[2].append(np.tile(frames[b], len(query)))
                columns[3].append(np.repeat(classes, repeat))
            round_rows.append([np.concatenate(c).astype(np.int64) for c in columns])
    pairs = sum(len(c) * len(f) for c, f in zip(result.classes, frames))
    masks = sum(len(c) for c in result.classes)
    pieces = [class_target.ravel(), np.array([pairs, masks], dtype=np.int64)]
    for round_rows in rows.values():
        pieces += [np.concatenate([r[i] for r in round_rows]) for i in range(4)]
    upload = torch.from_numpy(np.concatenate(pieces))
    if device.type == "cuda":
        upload = upload.pin_memory()
    moved = iter(upload.to(device, non_blocking=True).split([len(p) for p in pieces]))
    class_target_t = next(moved).view(class_target.shape)
    counts = next(moved).float()
    matched = {}
    for name, round_rows in rows.items():
        sizes = [len(r[0]) for r in round_rows]
        matched[name] = MatchedRows(sizes, next(moved), next(moved), next(moved), next(moved))
    return Assignment(class_target_t, matched["primary"], matched["secondary"], counts)


def gather(mask_logits: Sequence[Tensor], rows: MatchedRows) -> Tensor:
    """Matched predictions of S sets' mask_logits (B, N, T, h, w): (R, h, w) float32."""
    picked = [
        logits[clip, query, frame]
        for logits, (clip, query, frame) in zip(mask_logits, rows.split())
    ]
    return torch.cat(picked).float()


def class_loss(
    class_logits: Sequence[Tensor],
    class_target: Tensor,
    *,
    no_object_weight: float,
    labelled: Tensor | None = None,
) -> Tensor:
    """Weighted-mean cross-entropy over K+1 for all queries of each set, summed over S sets.

    class_logits: S × (B, N, K+1), or S × (B, T, N, K+1) for the frame head (every frame gets
    the clip's targets); class_target: (S, B, N) with K = no object (class weight
    ``no_object_weight``); labelled: (B, T) bool, frames without labels are left out (of the
    frame head; the clip head leaves out clips without any labelled frame).
    """
    logits = torch.stack([c.float() for c in class_logits])  # (S, B, [T,] N, K+1)
    if logits.dim() == 4:
        logits = logits.unsqueeze(2)  # (S, B, 1, N, K+1)
        if labelled is not None:
            labelled = labelled.any(1, keepdim=True)  # (B, 1)
    sets, columns = logits.shape[0], logits.shape[-1]
    target = class_target.unsqueeze(2).expand(-1, -1, logits.shape[2], -1)  # (S, B, T, N)
    class_weight = torch.ones(columns, device=logits.device)
    class_weight[-1] = no_object_weight
    weight = class_weight[target]  # (S, B, T, N)
    if labelled is not None:
        weight = weight * labelled[None, :, :, None]
    losses = F.cross_entropy(logits.reshape(-1, columns), target.reshape(-1), reduction="none")
    weight = weight.view(sets, -1)
    per_set = (losses.view(sets, -1) * weight).sum(1) / weight.sum(1).clamp(min=1e-12)
    return per_set.sum()


def hard_mask_loss(
    predicted: Tensor,
    gt_at: Callable[[Tensor, slice], Tensor],
    *,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> tuple[Tensor, Tensor]:
    """Point-sampled sigmoid BCE and dice, summed over rows (not normalised).

    predicted: (R, h, w) logits; ``gt_at(coords (r, P, 2), rows)`` reads the GT masks of
    ``rows`` (a slice of the R rows) at points: (r, P) in [0, 1] (``mask_reader``). Points per
    row come from uncertainty sampling on the prediction. Returns (bce_sum, dice_sum).
    """
    if predicted.shape[0] == 0:
        zero = predicted.sum() * 0.0  # keeps the graph connected
        return zero, zero
    # rows in chunks of bounded temporaries (on CPU over twice as fast as one for all rows),
    # the same on every device so that equal random draws give equal points
    chunk = max(1, CHUNK_VALUES // int(2 * oversample_ratio * num_points))
    bce = dice = predicted.new_zeros(())
    start = 0
    for part in predicted.split(chunk):  # one backward for all parts (split, not slicing)
        rows = slice(start, start + part.shape[0])
        start = rows.stop
        with torch.no_grad():
            coords = uncertain_point_coords(
                part.detach(),
                num_points=num_points,
                oversample_ratio=oversample_ratio,
                importance_sample_ratio=importance_sample_ratio,
            )  # (r, P, 2)
            gt_points = gt_at(coords, rows)  # (r, P)
        logit_points = point_sample(part.unsqueeze(1), coords)[:, 0]  # (r, P)
        bce = bce + sigmoid_bce_per_mask(logit_points, gt_points).sum()
        dice = dice + dice_per_mask(logit_points, gt_points).sum()
    return bce, dice


def mask_reader(targets: BatchTargets, rows: MatchedRows) -> Callable[[Tensor, slice], Tensor]:
    """``gt_at`` for ``hard_mask_loss``: reads the GT masks of a slice of ``rows`` bilinearly
    at points (r, P, 2), building at most ``GT_CHUNK_PIXELS`` mask pixels at once."""
    height, width = targets.labels.shape[-2:]
    chunk = max(1, GT_CHUNK_PIXELS // (height * width))

    def gt_at(coords: Tensor, part: slice) -> Tensor:
        indices = [index[part].split(chunk) for index in (rows.clip, rows.frame, rows.cls)]
        sampled = [
            point_sample(targets.masks(clip, frame, cls).unsqueeze(1), chunk_coords)[:, 0]
            for clip, frame, cls, chunk_coords in zip(*indices, coords.split(chunk))
        ]
        return torch.cat(sampled)  # (r, P)

    return gt_at


def soft_mask_loss(
    predicted: Tensor, gt_cells: Tensor, cell_sizes: Tensor
) -> tuple[Tensor, Tensor]:
    """Soft (round-2) loss: dense sigmoid BCE and dice at the GT resolution against the GT
    mask where the prediction already fires (σ > 0.5), summed over rows (not normalised).

    The prediction is upsampled to the GT size by nearest interpolation, so every GT pixel
    of a cell sees the same logit: the dense sums are computed per cell from the count of
    GT pixels in it, exactly, without building (R, H, W) maps.
    predicted: (R, h, w) logits; gt_cells: (R, h, w) GT pixels per cell (``cell_counts``);
    cell_sizes: (h, w) pixels per cell. Returns (bce_sum, dice_sum).
    """
    if predicted.shape[0] == 0:
        zero = predicted.sum() * 0.0
        return zero, zero
    fires = (predicted.detach().sigmoid() > 0.5).to(gt_cells.dtype)
    target = (gt_cells * fires).flatten(1)  # soft-target pixels per cell, no gradient
    logits = predicted.flatten(1)  # (R, h·w)
    sizes = cell_sizes.flatten()
    # BCE(x, y) = softplus(x) − x·y, summed over the pixels of each cell
    bce = (sizes * F.softplus(logits) - logits * target).sum(1) / sizes.sum()
    probs = logits.sigmoid()
    numerator = 2.0 * (probs * target).sum(1) + 1.0
    dice = 1.0 - numerator / ((probs * sizes).sum(1) + target.sum(1) + 1.0)
    return bce.sum(), dice.sum()


class SetCriterion:
    """THE-Mask training objective (``LossConfig`` holds every switch and weight).

    ``criterion(predictions, labels, *, step=0) -> LossOutput`` with labels (B, T, H, W) of B
    clips of T frames; for a single-frame decoder's B·T one-frame clips
    (``predictions.frames_per_clip`` = T) they are regrouped to (B·T, 1, H, W) here.
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
        frames = predictions.frames_per_clip
        if final.mask_logits.shape[2] == 1 < frames and labels.dim() == 4:
            labels = labels.flatten(0, 1).unsqueeze(1)  # single-frame decoder: (B·T, 1, H, W)
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

        device = clip_sets[-1].mask_logits.device
        targets = build_targets(labels.to(device), self.num_classes)
        rounds = self.rounds_at(step)
        # TAD: clip-head classes with frame-head masks; one matching reused by both heads.
        mask_source = frame_sets if frame_sets is not None else clip_sets
        result = self.matcher.match_sets(
            [(c.class_logits, m.mask_logits) for c, m in zip(clip_sets, mask_source)],
            targets,
            num_rounds=rounds,
        )
        queries = clip_sets[-1].mask_logits.shape[1]
        assignment = assign(result, queries=queries, num_classes=self.num_classes, device=device)
        counts = all_reduce(assignment.counts, mean=True)  # (pairs, masks)
        normaliser = counts[0].clamp(min=labels.shape[1])  # (mask, labelled frame) pairs, >= T
        rows = [assignment.primary] + ([assignment.secondary] if rounds == 2 else [])
        readers = [mask_reader(targets, r) for r in rows]
        soft_gt = None
        if rounds == 2 and cfg.second_round_loss == "soft":
            cells, cell_sizes = targets.cell_counts(*clip_sets[-1].mask_logits.shape[-2:])
            soft_gt = cells[rows[1].clip, rows[1].frame, rows[1].cls], cell_sizes  # (R, h, w)

        sums: dict[str, Tensor] = {}
        heads: list[tuple[str, list[PredictionSet], float]] = [("", clip_sets, 1.0)]
        if frame_sets is not None:
            heads.append(("frame_", frame_sets, cfg.frame_head_weight))
        for prefix, sets, head_weight in heads:
            terms = self._head_terms(
                sets, assignment, rows, readers, soft_gt, normaliser, targets.labelled
            )
            for name, value in terms.items():
                sums[prefix + name] = head_weight * value

        total = torch.stack(list(sums.values())).sum()
        log: dict[str, Tensor | float] = {name: value.detach() for name, value in sums.items()}
        final_matches = result.matches[-1]
        log["matched_fraction_round1"] = _matched_fraction(final_matches, queries, "primary")
        log["matched_fraction_round2"] = _matched_fraction(final_matches, queries, "secondary")
        masks = sum(len(c) for c in result.classes)
        log["num_masks"] = counts[1].clamp(min=1.0) if is_initialized() else max(float(masks), 1.0)
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

    def _head_terms(
        self,
        sets: list[PredictionSet],
        assignment: Assignment,
        rows: list[MatchedRows],
        readers: list[Callable[[Tensor, slice], Tensor]],
        soft_gt: tuple[Tensor, Tensor] | None,
        normaliser: Tensor,
        labelled: Tensor,
    ) -> dict[str, Tensor]:
        """Weighted loss terms of one head summed over its S sets.

        rows, readers: matched rows and their GT readers per round; soft_gt: GT pixels per
        cell of the round-2 rows and the cell sizes, for the soft loss; normaliser: () divides
        the mask terms; labelled: (B, T) bool, frames with labels.
        """
        cfg = self.config
        class_term = class_loss(
            [s.class_logits for s in sets],
            assignment.class_target,
            no_object_weight=cfg.no_object_weight,
            labelled=labelled,
        )
        terms = {"loss_class": cfg.class_weight * class_term}
        mask_logits = [s.mask_logits for s in sets]
        bce, dice = self._hard(gather(mask_logits, rows[0]), readers[0])
        terms["loss_mask"] = cfg.round_weights[0] * cfg.mask_weight * bce / normaliser
        terms["loss_dice"] = cfg.round_weights[0] * cfg.dice_weight * dice / normaliser
        if len(rows) == 2:
            predicted = gather(mask_logits, rows[1])
            if soft_gt is not None:
                bce, dice = soft_mask_loss(predicted, *soft_gt)
                mask_weight, dice_weight = cfg.soft_mask_weight, cfg.soft_dice_weight
            else:
                bce, dice = self._hard(predicted, readers[1])
                mask_weight, dice_weight = cfg.mask_weight, cfg.dice_weight
            second_weight = cfg.round_weights[1] / normaliser
            terms["loss_mask_secondary"] = second_weight * mask_weight * bce
            terms["loss_dice_secondary"] = second_weight * dice_weight * dice
        return terms

    def _hard(
        self, predicted: Tensor, gt_at: Callable[[Tensor, slice], Tensor]
    ) -> tuple[Tensor, Tensor]:
        cfg = self.config
        return hard_mask_loss(
            predicted,
            gt_at,
            num_points=cfg.num_points,
            oversample_ratio=cfg.oversample_ratio,
            importance_sample_ratio=cfg.importance_sample_ratio,
        )


def _matched_fraction(matches: Sequence[MatchIndices], queries: int, which: str) -> float:
    if not matches:
        return 0.0
    counts = [getattr(m, which)[0].numel() for m in matches]
    return sum(counts) / (queries * len(matches))
