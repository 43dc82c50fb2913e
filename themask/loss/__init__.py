"""Training objective: targets, two-round matching, hierarchical loss (docs/DESIGN.md §5)."""

from __future__ import annotations

from themask.loss.config import LossConfig
from themask.loss.criterion import LossOutput, SetCriterion, training_loss

__all__ = ["LossConfig", "LossOutput", "SetCriterion", "training_loss"]
