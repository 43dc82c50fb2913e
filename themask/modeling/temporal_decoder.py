"""Temporal Aggregation Decoder (TAD, DESIGN.md §4.2).

Clip queries Qc (B, N, C) and frame queries Qf (B, T, N, C). The frame queries run the
Mask2Former layers of §4.1 per frame (frames folded into the batch: B·T rows, frame t of clip b
at row b·T + t), masked by the *clip* head's mask for that frame; after every layer the shared
``TemporalAggregation`` module folds them into the clip queries. Two heads: ``clip_head``
(masks for every frame from one embedding per clip query) and ``frame_head`` (per frame).

Names shared with ``MaskDecoder`` (``query_feat``, ``query_pos``, ``level_embed``, ``layers``,
``clip_head``) are identical, so a single-frame (stage-1) state dict loads by name; the
TAD-only parts are ``temporal`` and ``frame_head``.

Official parameter names → ours (after ``decode_head.predictor.``):
``deformabel_transformer_cross_attention_layers`` (= D) → ``temporal``:
D.self_attn / D.norm2 → clip_self_attn.attn / .norm; D.self_attn_box / D.norm2_box →
frame_self_attn.attn / .norm; D.cross_attn / D.norm1_box → frame_cross_attn.attn / .norm;
D.linear1_box, D.linear2_box, D.norm3_box → frame_ffn.linear1, .linear2, .norm;
D.time_attention_weights → time_score; D.time_attention → time_value; D.norm1 → norm;
D.linear1, D.linear2, D.norm3 → ffn.linear1, .linear2, .norm (D.reference_points is unused).
decoder_norm1 / class_embed / mask_embed → clip_head.norm / .class_embed / .mask_embed;
decoder_norm2 / class_embed_aux / mask_embed_aux → frame_head.norm / .class_embed / .mask_embed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from themask.modeling.mask_decoder import MaskDecoder
from themask.modeling.outputs import Predictions, PredictionSet
from themask.modeling.transformer import (
    CrossAttentionLayer,
    FFNLayer,
    PredictionHead,
    SelfAttentionLayer,
    allowed_positions,
    decoder_memory,
    resize_features,
)


class TemporalAggregation(nn.Module):
    """The TAD's one shared module: starts both query sets (``start``) and, after every decoder
    layer, aggregates the frame queries into the clip queries (``forward``).

    Dropout ``dropout`` on attention weights and residual branches, FFN width ``ffn_dim``.
    """

    def __init__(
        self, *, dim: int = 256, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1
    ):
        super().__init__()
        self.clip_self_attn = SelfAttentionLayer(dim=dim, num_heads=num_heads, dropout=dropout)
        self.frame_self_attn = SelfAttentionLayer(dim=dim, num_heads=num_heads, dropout=dropout)
        self.frame_cross_attn = CrossAttentionLayer(dim=dim, num_heads=num_heads, dropout=dropout)
        self.frame_ffn = FFNLayer(dim=dim, ffn_dim=ffn_dim, dropout=dropout)
        self.time_score = nn.Linear(dim, 1)
        self.time_value = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn = FFNLayer(dim=dim, ffn_dim=ffn_dim, dropout=dropout)
        nn.init.xavier_uniform_(self.time_score.weight)
        nn.init.xavier_uniform_(self.time_value.weight)

    def start(
        self, queries: Tensor, query_pos: Tensor, keys: Tensor, values: Tensor, frames: int
    ) -> tuple[Tensor, Tensor]:
        """Initial clip and frame queries.

        queries (B, N, C) learned query features, query_pos (1, N, C), keys/values
        (B·T, S, C): all tokens of all levels of each frame → clip queries (B, N, C),
        frame queries (B·T, N, C).
        """
        clip = self.clip_self_attn(queries, query_pos)
        frame = self.frame_self_attn(queries, query_pos)
        frame = frame.repeat_interleave(frames, dim=0)  # (B·T, N, C), one copy per frame
        frame = self.frame_cross_attn(frame, keys, values, query_pos=query_pos)
        return clip, self.frame_ffn(frame)

    def forward(self, clip: Tensor, frame: Tensor) -> Tensor:
        """clip (B, N, C), frame (B, T, N, C) →
        Qc = FFN(LN(Qc + Σ_t softmax_t(w·Qf_t + b) · (V·Qf_t + c)))  (B, N, C)."""
        weights = F.softmax(self.time_score(frame), dim=1)  # (B, T, N, 1)
        aggregated = (weights * self.time_value(frame)).sum(dim=1)  # (B, N, C)
        clip = self.norm(clip + self.dropout(aggregated))
        return self.ffn(clip)


class TemporalDecoder(MaskDecoder):
    """Clip and frame queries refined together over a T-frame clip (§4.2)."""

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
        tad_ffn_dim: int = 2048,
        tad_dropout: float = 0.1,
    ):
        super().__init__(
            num_classes=num_classes,
            num_queries=num_queries,
            dim=dim,
            mask_dim=mask_dim,
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            num_levels=num_levels,
        )
        self.frame_head = PredictionHead(dim=dim, num_classes=num_classes, mask_dim=mask_dim)
        self.temporal = TemporalAggregation(
            dim=dim, num_heads=num_heads, ffn_dim=tad_ffn_dim, dropout=tad_dropout
        )

    def forward(  # type: ignore[override]
        self,
        mask_features: Tensor,
        multi_scale: Sequence[Tensor],
        *,
        frames: int,
        return_all: bool = True,
    ) -> Predictions:
        """mask_features (B·T, mask_dim, H/4, W/4), multi_scale L × (B·T, C, h, w), the T frames
        of each clip consecutive → ``Predictions`` with
        clip head: class (B, N, K+1), masks (B, N, T, H/4, W/4);
        frame head: class (B, T, N, K+1), masks (B, N, T, H/4, W/4).

        ``return_all``: all ``num_layers + 1`` sets per head; otherwise only the final ones.
        """
        self._check_levels(multi_scale)
        total, mask_dim, height, width = mask_features.shape
        if total % frames != 0:
            raise ValueError(f"TemporalDecoder: {total} frames is not a multiple of T={frames}")
        batch = total // frames
        memory = decoder_memory(multi_scale, self.level_embed.weight, frames=frames)
        clip_features = mask_features.view(batch, frames, mask_dim, height, width)
        # (B, D, T·H·W) once, so each clip-head mask prediction is one bmm without a copy
        clip_features_flat = clip_features.transpose(1, 2).reshape(batch, mask_dim, -1)
        resized = [
            level.view(batch, frames, mask_dim, *level.shape[-2:])
            for level in resize_features(mask_features, memory.sizes)
        ]
        query_pos = self.query_pos.weight.unsqueeze(0)  # (1, N, C)
        queries = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        clip, frame = self.temporal.start(
            queries,
            query_pos,
            torch.cat(memory.keys, dim=1),
            torch.cat(memory.values, dim=1),
            frames,
        )  # (B, N, C), (B·T, N, C)

        clip_sets: list[PredictionSet] = []
        frame_sets: list[PredictionSet] = []
        allowed: Tensor | None = None
        for index in range(len(self.layers) + 1):
            if index > 0:
                level = self._level(index - 1)
                frame = self.layers[index - 1](
                    frame,
                    memory.keys[level],
                    memory.values[level],
                    query_pos=query_pos,
                    allowed=allowed,
                )  # (B·T, N, C)
                clip = self.temporal(clip, frame.view(batch, frames, *frame.shape[1:]))
            is_final = index == len(self.layers)
            class_logits, embeddings = self.clip_head(clip)  # (B, N, K+1), (B, N, D)
            if return_all or is_final:
                masks = torch.bmm(embeddings, clip_features_flat).view(
                    batch, -1, frames, height, width
                )  # (B, N, T, H/4, W/4)
                clip_sets.append(PredictionSet(class_logits, masks))
                frame_class, frame_embeddings = self.frame_head(
                    frame.view(batch, frames, *frame.shape[1:])
                )  # (B, T, N, K+1), (B, T, N, D)
                frame_masks = torch.einsum("btnd,btdhw->bnthw", frame_embeddings, clip_features)
                frame_sets.append(PredictionSet(frame_class, frame_masks))
            if not is_final:
                with torch.no_grad():
                    low = torch.einsum("bnd,btdhw->btnhw", embeddings, resized[self._level(index)])
                allowed = allowed_positions(low.flatten(3).flatten(0, 1))  # (B·T, N, h·w)
        return Predictions(clip=clip_sets, frame=frame_sets)
