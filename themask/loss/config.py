"""Configuration of the training objective (docs/DESIGN.md §5). Defaults are the official values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class LossConfig:
    """Matching and hierarchical loss (Mask2Former: ``num_rounds=1, second_round_loss="hard"``)."""

    num_rounds: int = 2  # 1: one-to-one Hungarian only; 2: add the secondary round
    second_round_loss: Literal["soft", "hard"] = "soft"  # soft = hierarchical (paper)
    second_round_cost: Literal["full", "bce"] = "full"  # official single-frame: "bce"
    round_weights: tuple[float, float] = (1.0, 0.5)
    warmup_steps: int = 0  # one round while step < warmup_steps, then num_rounds
    class_weight: float = 2.0  # loss weights
    mask_weight: float = 5.0  # hard BCE
    dice_weight: float = 5.0  # hard dice
    soft_mask_weight: float = 0.5
    soft_dice_weight: float = 0.5
    no_object_weight: float = 0.1
    frame_head_weight: float = 0.25  # TAD frame head
    deep_supervision: bool = True
    cost_class: float = 2.0  # matching cost weights
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    num_points: int = 12544  # point-sampled mask losses and costs
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
