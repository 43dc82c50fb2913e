"""Hierarchical THE-Mask loss over all prediction sets (docs/DESIGN.md §5, §8): class CE, the
hard mask loss for primary queries, the soft or hard one for secondary queries."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from themask.distributed import all_reduce, is_initialized
from themask.loss.config import LossConfig
from themask.loss.matcher import BatchMatch, HungarianMatcher, dice_loss
from themask.loss.point_sample import point_sample, uncertain_point_coords
from themask.loss.targets import IGNORE_INDEX, BatchTargets, build_targets
from themask.modeling.outputs import Predictions, PredictionSet

CHUNK_VALUES = 1 << 21  # hard loss: candidate coordinates per chunk of rows (8 MiB)
GT_CHUNK_PIXELS = 1 << 22  # GT mask pixels built at once for the point losses (16 MiB)


@dataclass
class LossOutput:
    """total: the scalar loss; terms: the weighted terms summing to it (detached 0-d device
    tensors, ``frame_``-prefixed for the frame head), ``matched_fraction_round1/2`` (final set)
    and ``num_masks`` (mean over processes, >= 1) as floats (``num_masks`` a tensor under DDP)."""

    total: Tensor
    terms: dict[str, Tensor | float]


@dataclass
class MatchedRows:
    """Matched (mask, labelled frame) pairs of one round, index tensors (R,): the prediction
    ``mask_logits[clip, query, frame]`` of the ``set``-th kept set and GT class ``cls``; sorted
    by clip·T + frame, ``groups`` the rows of each (host list of B·T counts)."""

    groups: list[int]
    set: Tensor
    clip: Tensor
    query: Tensor
    frame: Tensor
    cls: Tensor


@dataclass
class Assignment:
    """class_target (S, B, N): GT class of matched queries, K elsewhere; counts (2,): the
    (mask, labelled frame) pairs and GT masks of the batch."""

    class_target: Tensor
    primary: MatchedRows
    secondary: MatchedRows
    counts: Tensor


def assign(
    result: BatchMatch, *, queries: int, num_classes: int, device: torch.device
) -> Assignment:
    """The host-side matches of S sets as index tensors on ``device``, in one upload."""
    sets, clip_frames = len(result.matches), len(result.labelled[0])
    frames = [np.flatnonzero(row) for row in result.labelled]  # labelled frames per clip
    class_target = np.full((sets, len(result.classes), queries), num_classes, dtype=np.int64)
    # per round, its rows' columns: set, clip, query, frame, class
    rows: dict[str, list[list]] = {name: [[], [], [], [], []] for name in ("primary", "secondary")}
    for s, set_matches in enumerate(result.matches):
        for round_name, columns in rows.items():
            for b, match in enumerate(set_matches):
                query, target = (x.numpy() for x in getattr(match, round_name))
                classes = result.classes[b][target]
                class_target[s, b, query] = classes
                repeat = len(frames[b])
                columns[0].append(np.full(len(query) * repeat, s))
                columns[1].append(np.full(len(query) * repeat, b))
                columns[2].append(np.repeat(query, repeat))
                columns[3].append(np.tile(frames[b], len(query)))
                columns[4].append(np.repeat(classes, repeat))
    pairs = sum(len(c) * len(f) for c, f in zip(result.classes, frames))
    masks = sum(len(c) for c in result.classes)
    pieces = [class_target.ravel(), np.array([pairs, masks], dtype=np.int64)]
    groups = {}
    for name, columns in rows.items():
        columns_all = [np.concatenate(c).astype(np.int64) for c in columns]
        clip_frame = columns_all[1] * clip_frames + columns_all[3]  # the row of a frame's maps
        order = np.argsort(clip_frame, kind="stable")
        groups[name] = np.bincount(clip_frame, minlength=len(frames) * clip_frames).tolist()
        pieces += [column[order] for column in columns_all]
    upload = torch.from_numpy(np.concatenate(pieces))
    if device.type == "cuda":
        upload = upload.pin_memory()
    moved = iter(upload.to(device, non_blocking=True).split([len(p) for p in pieces]))
    class_target_t = next(moved).view(class_target.shape)
    counts = next(moved).float()
    matched = {name: MatchedRows(groups[name], *(next(moved) for _ in range(5))) for name in rows}
    return Assignment(class_target_t, matched["primary"], matched["secondary"], counts)


def gather(sets: Sequence[PredictionSet], rows: MatchedRows) -> Tensor:
    """Matched predictions (R, h, w) float32 of S sets' mask_logits (B, N, T, h, w), consecutive
    read-outs of one head: from its ``MaskSource`` (a backward over these rows), else indexed."""
    masks, source = sets[0].mask_logits, sets[0].source
    if source is None:
        stacked = torch.stack([s.mask_logits for s in sets])  # (S, B, N, T, h, w)
        return stacked[rows.set, rows.clip, rows.query, rows.frame].float()
    queries, frames = masks.shape[1:3]
    g, j = rows.clip * frames + rows.frame, rows.set * queries + rows.query + source.first_query
    picked = _RowProduct.apply(source.embeddings, source.features, source.logits, g, j, rows.groups)
    return picked.view(-1, *masks.shape[-2:]).float()


class _RowProduct(torch.autograd.Function):
    """Rows (R, X) = logits[g, j] of logits (G, M, X) = embeddings (G, M, D) @ features (G, D, X)
    (given, without gradient), (g, j) distinct; the backward multiplies the R rows alone, group
    by group of equal g (rows sorted by g, ``groups`` the host counts): no dense (G, M, X)."""

    @staticmethod
    def forward(ctx, embeddings, features, logits, g, j, groups):
        ctx.save_for_backward(embeddings, features, g, j)
        ctx.groups = groups
        return logits[g, j]

    @staticmethod
    def backward(ctx, grad):
        embeddings, features, g, j = ctx.saved_tensors
        grad, rows = grad.to(embeddings.dtype), embeddings[g, j]  # (R, X), (R, D)
        grad_features, grad_rows = torch.empty_like(features), []
        parts = zip(grad.split(ctx.groups), rows.split(ctx.groups))  # the rows of frame 0, 1, ...
        for frame, (part, part_rows) in enumerate(parts):
            grad_rows.append(part @ features[frame].t())
            # zero for a frame without rows; written (X, D) row by row: channels-last features
            torch.mm(part.t(), part_rows, out=grad_features[frame].t())
        grad_embeddings = torch.zeros_like(embeddings).index_put_((g, j), torch.cat(grad_rows))
        return grad_embeddings, grad_features, None, None, None, None


def class_loss(
    class_logits: Sequence[Tensor],
    class_target: Tensor,
    *,
    no_object_weight: float,
    labelled: Tensor | None = None,
) -> Tensor:
    """Weighted-mean CE over K+1 per set, summed: class_logits S × (B, N, K+1) or, frame head,
    S × (B, T, N, K+1); class_target (S, B, N), K = no object; labelled (B, T) bool."""
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
    return ((losses.view(sets, -1) * weight).sum(1) / weight.sum(1).clamp(min=1e-12)).sum()


def hard_mask_loss(
    predicted: Tensor,
    gt_at: Callable[[Tensor, slice], Tensor],
    *,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> tuple[Tensor, Tensor]:
    """Sigmoid BCE and dice at uncertainty-sampled points, summed over the rows of
    ``predicted`` (R, h, w); ``gt_at(coords (r, P, 2), rows)`` reads the GT (``mask_reader``)."""
    # row chunks of bounded size (faster on CPU), the same on every device
    chunk = max(1, CHUNK_VALUES // int(2 * oversample_ratio * num_points))
    if predicted.shape[0] == 0:  # zero, the graph still connected
        return predicted.sum() * 0.0, predicted.sum() * 0.0
    bce = dice = predicted.new_zeros(())
    for index, part in enumerate(predicted.split(chunk)):  # one backward (split, not slicing)
        rows = slice(index * chunk, index * chunk + part.shape[0])
        with torch.no_grad():
            coords = uncertain_point_coords(
                part.detach(),
                num_points=num_points,
                oversample_ratio=oversample_ratio,
                importance_sample_ratio=importance_sample_ratio,
            )  # (r, P, 2)
            gt_points = gt_at(coords, rows)  # (r, P)
        logit_points = point_sample(part.unsqueeze(1), coords)[:, 0]  # (r, P)
        losses = F.binary_cross_entropy_with_logits(logit_points, gt_points, reduction="none")
        bce = bce + losses.mean(1).sum()
        probs = logit_points.sigmoid()
        dice = dice + dice_loss((probs * gt_points).sum(1), probs.sum(1), gt_points.sum(1)).sum()
    return bce, dice


def mask_reader(targets: BatchTargets, rows: MatchedRows) -> Callable[[Tensor, slice], Tensor]:
    """``gt_at`` for ``hard_mask_loss``: the GT masks of a slice of ``rows`` read at points."""
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
    """Soft loss: dense BCE and dice at GT resolution (nearest upsampling) against GT ∧ σ > 0.5,
    summed over rows, computed per cell. predicted (R, h, w) logits, gt_cells (R, h, w) GT
    pixels per cell (``cell_counts``), cell_sizes (h, w) pixels per cell."""
    fires = (predicted.detach().sigmoid() > 0.5).to(gt_cells.dtype)
    target = (gt_cells * fires).flatten(1)  # soft-target pixels per cell, no gradient
    logits = predicted.flatten(1)  # (R, h·w)
    sizes = cell_sizes.flatten()
    # BCE(x, y) = softplus(x) − x·y, summed over the pixels of each cell
    bce = (sizes * F.softplus(logits) - logits * target).sum(1) / sizes.sum()
    probs = logits.sigmoid()
    dice = dice_loss((probs * target).sum(1), (probs * sizes).sum(1), target.sum(1))
    return bce.sum(), dice.sum()


class SetCriterion:
    """``criterion(predictions, labels (B, T, H, W), *, step) -> LossOutput``; labels of a
    single-frame decoder's B·T one-frame clips are regrouped here."""

    def __init__(self, loss_config: LossConfig, num_classes: int) -> None:
        cfg = loss_config
        if cfg.num_rounds not in (1, 2) or not (
            cfg.oversample_ratio >= 1 and 0 <= cfg.importance_sample_ratio <= 1
        ):
            raise ValueError(
                "LossConfig: expected num_rounds 1 or 2, oversample_ratio >= 1 and "
                f"importance_sample_ratio in [0, 1], got {cfg.num_rounds}, "
                f"{cfg.oversample_ratio}, {cfg.importance_sample_ratio}"
            )
        self.config, self.num_classes = loss_config, num_classes
        costs = ("cost_class", "cost_mask", "cost_dice", "num_points", "second_round_cost")
        self.matcher = HungarianMatcher(**{name: getattr(cfg, name) for name in costs})
        self._hard = partial(
            hard_mask_loss,
            num_points=cfg.num_points,
            oversample_ratio=cfg.oversample_ratio,
            importance_sample_ratio=cfg.importance_sample_ratio,
        )

    def rounds_at(self, step: int) -> int:
        """Number of matching rounds used at ``step`` (one round during the warm-up)."""
        return 1 if step < self.config.warmup_steps else self.config.num_rounds

    def __call__(self, predictions: Predictions, labels: Tensor, *, step: int = 0) -> LossOutput:
        masks = predictions.clip[-1].mask_logits
        if masks.shape[2] == 1 < predictions.frames_per_clip and labels.dim() == 4:
            labels = labels.flatten(0, 1).unsqueeze(1)  # single-frame decoder: (B·T, 1, H, W)
        with torch.autocast(device_type=masks.device.type, enabled=False):
            return self._compute(predictions, labels, step)

    def _compute(self, predictions: Predictions, labels: Tensor, step: int) -> LossOutput:
        cfg = self.config
        kept = slice(None) if cfg.deep_supervision else slice(-1, None)
        clip_sets = predictions.clip[kept]
        frame_sets = None if predictions.frame is None else predictions.frame[kept]
        for prediction_set in clip_sets + (frame_sets or []):
            masks, classes = prediction_set.mask_logits, prediction_set.class_logits
            fits = masks.dim() == 5 and masks.shape[:3:2] == labels.shape[:2]
            if not fits or classes.shape[-1] != self.num_classes + 1:
                raise ValueError(
                    f"expected mask_logits (B, N, T, h, w) with B, T of the labels "
                    f"{tuple(labels.shape)} and class_logits of num_classes + 1 = "
                    f"{self.num_classes + 1} columns, got {tuple(masks.shape)}, "
                    f"{tuple(classes.shape)}"
                )

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
        shared = (assignment, rows, readers, soft_gt, normaliser, targets.labelled)
        for prefix, sets, head_weight in heads:
            for name, value in self._head_terms(sets, *shared).items():
                sums[prefix + name] = head_weight * value

        log: dict[str, Tensor | float] = {name: value.detach() for name, value in sums.items()}
        for index, which in enumerate(("primary", "secondary"), 1):
            matched = sum(getattr(m, which)[0].numel() for m in result.matches[-1])
            log[f"matched_fraction_round{index}"] = matched / (queries * len(result.classes))
        num_masks = float(sum(len(c) for c in result.classes))
        log["num_masks"] = counts[1].clamp(min=1.0) if is_initialized() else max(num_masks, 1.0)
        return LossOutput(total=torch.stack(list(sums.values())).sum(), terms=log)

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
        """Weighted loss terms of one head summed over its sets (per round: rows, readers)."""
        cfg = self.config
        class_term = class_loss(
            [s.class_logits for s in sets],
            assignment.class_target,
            no_object_weight=cfg.no_object_weight,
            labelled=labelled,
        )
        terms = {"loss_class": cfg.class_weight * class_term}
        bce, dice = self._hard(gather(sets, rows[0]), readers[0])
        terms["loss_mask"] = cfg.round_weights[0] * cfg.mask_weight * bce / normaliser
        terms["loss_dice"] = cfg.round_weights[0] * cfg.dice_weight * dice / normaliser
        if len(rows) == 2:
            predicted = gather(sets, rows[1])
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


def training_loss(
    model: nn.Module,
    frames: Tensor,
    labels: Tensor,
    criterion: SetCriterion,
    *,
    size_divisor: int = 32,
    step: int = 0,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """``criterion(model(frames), labels)`` for ``model`` in train mode (plain or DDP-wrapped)
    → (total, ``LossOutput.terms``). frames (B, T, 3, H, W) normalised; labels (B, T, H, W)
    long, 255 = ignore, padded here to a multiple of ``size_divisor``."""
    if frames.dim() != 5 or frames.shape[:2] + frames.shape[-2:] != labels.shape:
        raise ValueError(
            f"expected frames (B, T, 3, H, W) and labels (B, T, H, W) of the same B, T, H, W, "
            f"got {tuple(frames.shape)} and {tuple(labels.shape)}"
        )
    predictions = model(frames)
    if not isinstance(predictions, Predictions):
        raise TypeError(
            "model(frames) did not return Predictions; call model.train() before training_loss"
        )
    height, width = labels.shape[-2:]
    padding = (0, (-width) % size_divisor, 0, (-height) % size_divisor)
    output = criterion(predictions, F.pad(labels, padding, value=IGNORE_INDEX), step=step)
    return output.total, output.terms
