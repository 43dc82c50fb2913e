"""Temporal Aggregation Decoder (TAD, docs/DESIGN.md §4.2): frame queries run the §4.1 layers
per frame, masked by the clip head, and are folded into the clip queries after every layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from themask.modeling.linear import Linear
from themask.modeling.transformer import (
    CrossAttentionLayer,
    DecodingState,
    Dropout,
    FFNLayer,
    PredictionHead,
    QueryDecoder,
    SelfAttentionLayer,
    run_layer,
)


class TemporalAggregation(nn.Module):
    """``start``: both query sets; ``forward``: frame queries aggregated into clip queries."""

    def __init__(
        self, *, dim: int = 256, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1
    ):
        super().__init__()
        self.clip_self_attn = SelfAttentionLayer(dim=dim, num_heads=num_heads, dropout=dropout)
        self.frame_self_attn = SelfAttentionLayer(dim=dim, num_heads=num_heads, dropout=dropout)
        self.frame_cross_attn = CrossAttentionLayer(dim=dim, num_heads=num_heads, dropout=dropout)
        self.frame_ffn = FFNLayer(dim=dim, ffn_dim=ffn_dim, dropout=dropout)
        self.time_score = Linear(dim, 1)
        self.time_value = Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)
        self.ffn = FFNLayer(dim=dim, ffn_dim=ffn_dim, dropout=dropout)
        nn.init.xavier_uniform_(self.time_score.weight)
        nn.init.xavier_uniform_(self.time_value.weight)

    def start(
        self, queries: Tensor, query_pos: Tensor, keys: Tensor, values: Tensor, frames: int
    ) -> tuple[Tensor, Tensor]:
        """queries (B, N, C), query_pos (1, N, C), keys/values (B·T, S, C) (all levels of each
        frame) → clip queries (B, N, C), frame queries (B·T, N, C)."""
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
        return self.ffn(self.norm(clip + self.dropout(aggregated)))


class TemporalDecoder(QueryDecoder):
    """Clip and frame queries refined together over a T-frame clip → ``Predictions``: class
    (B, N, K+1) (clip head) and (B, T, N, K+1) (frame head), masks (B, N, T, H/4, W/4) both."""

    is_temporal = True

    def __init__(self, *, tad_ffn_dim: int = 2048, tad_dropout: float = 0.1, **decoder_args: Any):
        super().__init__(**decoder_args)
        self.frame_head = PredictionHead(**self.head_sizes)
        self.temporal = TemporalAggregation(
            dim=self.head_sizes["dim"],
            num_heads=self.num_heads,
            ffn_dim=tad_ffn_dim,
            dropout=tad_dropout,
        )

    def _start(
        self, queries: Tensor, pos: Tensor, keys: list[Tensor], values: list[Tensor], frames: int
    ) -> tuple[Tensor, Tensor]:
        every_level = torch.cat(keys, dim=1), torch.cat(values, dim=1)  # (B·T, S, C)
        clip, frame = run_layer(
            self.temporal.start, self.checkpoint_layers, queries, pos, *every_level, frames
        )  # (B, N, C), (B·T, N, C)
        return frame, clip

    def _after_layer(self, state: DecodingState) -> None:
        frame = state.queries.view(state.clip.shape[0], state.frames, *state.queries.shape[1:])
        state.clip = run_layer(self.temporal, self.checkpoint_layers, state.clip, frame)

    def _heads(
        self, state: DecodingState, *, full: bool
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        heads, embeddings = super()._heads(state, full=full)
        if not full:
            return heads, embeddings
        batch, frames = state.clip.shape[0], state.frames
        frame_head = self.frame_head(state.queries.view(batch, frames, *state.queries.shape[1:]))
        return heads + [frame_head], embeddings  # frame head: (B, T, N, K+1), (B, T, N, D)
