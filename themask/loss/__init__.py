"""Training objective: targets, two-round matching, hierarchical loss (docs/DESIGN.md §5)."""

from __future__ import annotations

from themask.loss.config import LossConfig
from themask.loss.criterion import LossOutput, SetCriterion, training_loss
from themask.loss.matcher import HungarianMatcher, MatchIndices, match_two_rounds
from themask.loss.targets import BatchTargets, build_targets

__all__ = [
    "BatchTargets",
    "HungarianMatcher",
    "LossConfig",
    "LossOutput",
    "MatchIndices",
    "SetCriterion",
    "build_targets",
    "match_two_rounds",
    "training_loss",
]
