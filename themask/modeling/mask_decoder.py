"""Single-frame masked-attention decoder (Mask2Former, DESIGN.md §4.1).

Every frame is decoded as its own one-frame clip: B·T clips, T = 1. The parts this decoder
shares with the temporal decoder (``query_feat``, ``query_pos``, ``level_embed``, ``layers``,
``clip_head``) carry the same names there, so a stage-1 state dict loads into a TAD model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from themask.modeling.outputs import Predictions, PredictionSet
from themask.modeling.transformer import (
    DecoderLayer,
    PredictionHead,
    allowed_positions,
    decoder_memory,
    resize_features,
)


class MaskDecoder(nn.Module):
    """Learned queries refined by ``num_layers`` masked-attention layers; layer i reads
    memory level ``i mod num_levels`` (levels ordered stride 32, 16, 8)."""

    def __init__(
        self,
        *,
        num_classes: int = 124,
        num_queries: int = 100,
        dim: int = 256,
        mask_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 9,
        num_levels: int = 3,
    ):
        super().__init__()
        self.num_levels = num_levels
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_pos = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(num_levels, dim)
        self.layers = nn.ModuleList(
            DecoderLayer(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim) for _ in range(num_layers)
        )
        self.clip_head = PredictionHead(dim=dim, num_classes=num_classes, mask_dim=mask_dim)

    def _level(self, index: int) -> int:
        return index % self.num_levels

    def _check_levels(self, multi_scale: Sequence[Tensor]) -> None:
        if len(multi_scale) != self.num_levels:
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_levels} memory levels, "
                f"got {len(multi_scale)}"
            )

    def forward(
        self,
        mask_features: Tensor,
        multi_scale: Sequence[Tensor],
        *,
        return_all: bool = True,
    ) -> Predictions:
        """mask_features (B·T, mask_dim, H/4, W/4) and multi_scale L × (B·T, C, h, w) →
        ``Predictions`` of B·T one-frame clips: class (B·T, N, K+1), masks (B·T, N, 1, H/4, W/4).

        ``return_all``: all ``num_layers + 1`` prediction sets (training); otherwise only the
        final one (inference skips the full-resolution masks of the intermediate sets).
        """
        self._check_levels(multi_scale)
        memory = decoder_memory(multi_scale, self.level_embed.weight, frames=1)
        resized = resize_features(mask_features, memory.sizes)
        queries = self.query_feat.weight.unsqueeze(0).expand(mask_features.shape[0], -1, -1)
        query_pos = self.query_pos.weight.unsqueeze(0)  # (1, N, C)

        sets: list[PredictionSet] = []
        allowed: Tensor | None = None
        for index in range(len(self.layers) + 1):
            if index > 0:
                level = self._level(index - 1)
                queries = self.layers[index - 1](
                    queries,
                    memory.keys[level],
                    memory.values[level],
                    query_pos=query_pos,
                    allowed=allowed,
                )  # (B·T, N, C)
            is_final = index == len(self.layers)
            class_logits, embeddings = self.clip_head(queries)
            if return_all or is_final:
                masks = torch.einsum("fnc,fchw->fnhw", embeddings, mask_features)
                sets.append(PredictionSet(class_logits, masks.unsqueeze(2)))
            if not is_final:
                with torch.no_grad():
                    low = torch.einsum("fnc,fchw->fnhw", embeddings, resized[self._level(index)])
                allowed = allowed_positions(low.flatten(2))  # (B·T, N, h·w)
        return Predictions(clip=sets)
