"""Named outputs of the network (no string-keyed dicts)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class PredictionSet:
    """One prediction set of one head.

    class_logits: (B, N, K+1) for the clip head; (B, T, N, K+1) for the frame head.
    mask_logits:  (B, N, T, H/4, W/4) for both heads (frame-head masks stacked over time).
    """

    class_logits: Tensor
    mask_logits: Tensor


@dataclass
class Predictions:
    """All prediction sets of a forward pass in train mode.

    clip:  L+1 sets (10 for 9 decoder layers), before layer 1 and after each layer;
           ``clip[-1]`` is the final output, the others are for deep supervision.
    frame: the TAD frame head, same length, or ``None`` for the single-frame decoder.

    For the single-frame decoder every frame is its own clip: B here is B·T of the input
    and T = 1 (``THEMask.is_temporal`` tells which layout a model uses).
    frames_per_clip: T of the input clips, so the single-frame layout (B·T one-frame clips)
    can be regrouped into (B, T) by ``THEMask.semantic_scores``.
    """

    clip: list[PredictionSet]
    frame: list[PredictionSet] | None = None
    frames_per_clip: int = 1

    @property
    def final(self) -> PredictionSet:
        return self.clip[-1]
