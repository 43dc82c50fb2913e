"""``training_loss``: forward a network in train mode and apply a criterion to its predictions."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from themask.loss.criterion import SetCriterion
from themask.loss.targets import IGNORE_INDEX
from themask.modeling.outputs import Predictions


def training_loss(
    model: nn.Module,
    frames: Tensor,
    labels: Tensor,
    criterion: SetCriterion,
    *,
    size_divisor: int = 32,
    step: int = 0,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """``criterion(model(frames), labels)`` for ``model`` in train mode (plain or DDP-wrapped).

    frames: (B, T, 3, H, W) normalised; labels: (B, T, H, W) long, 255 = ignore, padded here
    with ignore to the network's input padding (``size_divisor``, ``ModelConfig.size_divisor``).
    ``step`` is the optimiser step (for the one-round warm-up). Returns (total loss, logged
    terms: 0-d tensors for the loss terms, read with ``float()`` only when logging; see
    ``LossOutput``). Frames whose labels are all ignore are unlabelled: they supervise nothing.
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
    height, width = labels.shape[-2:]
    padding = (0, (-width) % size_divisor, 0, (-height) % size_divisor)
    output = criterion(predictions, F.pad(labels, padding, value=IGNORE_INDEX), step=step)
    return output.total, output.terms
