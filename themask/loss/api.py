"""``training_loss``: the one call the engine and users make to get the THE-Mask loss."""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor, nn

from themask.loss.config import LossConfig
from themask.loss.criterion import SetCriterion
from themask.loss.targets import IGNORE_INDEX
from themask.modeling.outputs import Predictions

_CRITERIA: dict[tuple, SetCriterion] = {}


def criterion_for(loss_config: LossConfig, num_classes: int) -> SetCriterion:
    """The ``SetCriterion`` of a config, built once per distinct config (it holds no state)."""
    key = (repr(loss_config), num_classes)  # repr: fields may be lists after YAML loading
    if key not in _CRITERIA:
        _CRITERIA[key] = SetCriterion(dataclasses.replace(loss_config), num_classes)
    return _CRITERIA[key]


def training_loss(
    model: nn.Module, frames: Tensor, labels: Tensor, *, step: int = 0
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """Forward ``model`` in train mode and compute its training objective.

    frames: (B, T, 3, H, W) normalised; labels: (B, T, H, W) long, 255 = ignore.
    The criterion follows ``model.config.loss`` and ``model.config.num_classes``; ``step`` is
    the optimiser step (for the one-round warm-up). Returns (total loss, logged terms: 0-d
    tensors for the loss terms, read with ``float()`` only when logging; see ``LossOutput``).
    Frames whose labels are all ignore are unlabelled: they supervise nothing.
    """
    if frames.dim() != 5 or labels.dim() != 4 or frames.shape[:2] != labels.shape[:2]:
        raise ValueError(
            f"expected frames (B, T, 3, H, W) and labels (B, T, H, W), got "
            f"{tuple(frames.shape)} and {tuple(labels.shape)}"
        )
    if frames.shape[-2:] != labels.shape[-2:]:
        raise ValueError(
            f"frames {tuple(frames.shape)} and labels {tuple(labels.shape)} differ in size"
        )
    predictions = model(frames)
    if not isinstance(predictions, Predictions):
        raise TypeError(
            "model(frames) did not return Predictions; call model.train() before training_loss"
        )
    labels = _pad_labels(labels, model.config.size_divisor)
    if not model.is_temporal:
        batch, frames_per_clip, height, width = labels.shape
        labels = labels.reshape(batch * frames_per_clip, 1, height, width)  # (B·T, 1, H, W)
    criterion = criterion_for(model.config.loss, model.config.num_classes)
    output = criterion(predictions, labels, step=step)
    return output.total, output.terms


def _pad_labels(labels: Tensor, size_divisor: int) -> Tensor:
    """Pad labels (B, T, H, W) with ignore at the bottom/right to the model's padded size."""
    height, width = labels.shape[-2:]
    pad_h = (-height) % size_divisor
    pad_w = (-width) % size_divisor
    if pad_h == 0 and pad_w == 0:
        return labels
    return F.pad(labels, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
