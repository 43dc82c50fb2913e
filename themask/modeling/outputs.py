"""Named outputs of the network (no string-keyed dicts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class MaskSource:
    """In training, a head's mask logits as the product they are, for the loss to read a few
    rows with gradient: embeddings (B·T, M, D) @ features (B·T, D, h·w) = logits (B·T, M, h·w)
    (without gradient), M = S·N of all read-outs; the set's queries start at ``first_query``."""

    embeddings: Tensor
    features: Tensor
    logits: Tensor
    first_query: int


@dataclass
class PredictionSet:
    """One head's prediction set: class_logits (B, N, K+1) (clip head) or (B, T, N, K+1)
    (frame head); mask_logits (B, N, T, H/4, W/4) for both; ``source`` in training."""

    class_logits: Tensor
    mask_logits: Tensor
    source: MaskSource | None = None


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


@dataclass
class FrameFeatures:
    """Per-frame backbone + pixel-decoder outputs: mask_features (B·T, mask_dim, H'/4, W'/4)
    (H', W' padded), multi_scale 3 × (B·T, C, h, w) of strides 32, 16, 8."""

    mask_features: Tensor
    multi_scale: list[Tensor]

    def __len__(self) -> int:
        return self.mask_features.shape[0]

    def select(self, indices: Sequence[int] | Tensor) -> FrameFeatures:
        """The features of the frames at ``indices`` (positions on the B·T axis), in order."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.mask_features.device)
        return FrameFeatures(
            mask_features=self.mask_features.index_select(0, index),
            multi_scale=[level.index_select(0, index) for level in self.multi_scale],
        )

    @classmethod
    def cat(cls, items: Sequence[FrameFeatures]) -> FrameFeatures:
        """Concatenate along the B·T axis (all items must share the padded size)."""
        return cls(
            mask_features=torch.cat([item.mask_features for item in items]),
            multi_scale=[torch.cat(level) for level in zip(*(item.multi_scale for item in items))],
        )
