"""Single-frame masked-attention decoder (Mask2Former, docs/DESIGN.md §4.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from themask.modeling.outputs import PredictionSet
from themask.modeling.transformer import DecoderMemory, DecodingState, QueryDecoder


class MaskDecoder(QueryDecoder):
    """Every frame decoded as its own clip → ``Predictions`` of B·T one-frame clips:
    class (B·T, N, K+1), masks (B·T, N, 1, H/4, W/4)."""

    is_temporal = False

    def _start(
        self, mask_features: Tensor, memory: DecoderMemory, query_pos: Tensor, frames: int
    ) -> DecodingState:
        queries = self.query_feat.weight.unsqueeze(0).expand(mask_features.shape[0], -1, -1)
        return DecodingState(queries=queries, mask_features=mask_features, frames=frames)

    def _heads(self, state: DecodingState, *, full: bool) -> tuple[list[PredictionSet], Tensor]:
        class_logits, embeddings = self.clip_head(state.queries)  # (B·T, N, K+1), (B·T, N, D)
        if not full:
            return [], embeddings
        masks = torch.einsum("fnc,fchw->fnhw", embeddings, state.mask_features)
        return [PredictionSet(class_logits, masks.unsqueeze(2))], embeddings

    def _attention_logits(
        self, embeddings: Tensor, features: Tensor, state: DecodingState
    ) -> Tensor:
        return torch.einsum("fnc,fchw->fnhw", embeddings, features).flatten(2)
