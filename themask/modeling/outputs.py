"""Named outputs of the network (no string-keyed dicts)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class PredictionSet:
    """One head's prediction set: class_logits (B, N, K+1) (clip head) or (B, T, N, K+1)
    (frame head); mask_logits (B, N, T, H/4, W/4) for both."""

    class_logits: Tensor
    mask_logits: Tensor


@dataclass
class Predictions:
    """The prediction sets of a forward pass: ``clip`` before layer 1 and after each layer
    (``clip[-1]`` final), ``frame`` the TAD frame head's or None. The single-frame decoder
    gives B·T one-frame clips; ``frames_per_clip`` = T of the input clips regroups them."""

    clip: list[PredictionSet]
    frame: list[PredictionSet] | None = None
    frames_per_clip: int = 1

    @property
    def final(self) -> PredictionSet:
        return self.clip[-1]
