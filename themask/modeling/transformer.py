"""Building blocks shared by the two transformer decoders (DESIGN.md §4).

All layers are post-norm (``x = LN(x + Dropout(f(x)))``) and batch-first: queries (B, N, C),
memory (B, S, C). Attention parameters have the shapes of ``nn.MultiheadAttention``
(``in_proj_weight`` (3C, C), ``in_proj_bias`` (3C,), ``out_proj`` C→C), so checkpoints map one
to one; the forward pass calls ``F.scaled_dot_product_attention`` directly, which takes a
boolean mask shared by all heads without repeating it per head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from themask.modeling.position_encoding import sine_position_encoding_3d


class MultiHeadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (same parameters, so optimiser rules and checkpoints treat it
    alike) with a batch-first forward on ``F.scaled_dot_product_attention``.

    ``dropout`` is applied to the attention weights in train mode.
    """

    def __init__(self, *, dim: int = 256, num_heads: int = 8, dropout: float = 0.0):
        if dim % num_heads != 0:
            raise ValueError(f"MultiHeadAttention: dim {dim} is not divisible by {num_heads} heads")
        super().__init__(dim, num_heads, dropout=dropout, batch_first=True)
        nn.init.xavier_uniform_(self.out_proj.weight)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(  # type: ignore[override]
        self, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None = None
    ) -> Tensor:
        """query (B, N, C), key/value (B, S, C), allowed (B, N, S) bool (True = may attend)
        → (B, N, C)."""
        dim = query.shape[-1]
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if key is query:  # self-attention: one matmul for queries and keys
            qk = F.linear(query, self.in_proj_weight[: 2 * dim], self.in_proj_bias[: 2 * dim])
            q, k = qk.chunk(2, dim=-1)
        else:
            q = F.linear(query, w_q, b_q)
            k = F.linear(key, w_k, b_k)
        v = F.linear(value, w_v, b_v)
        mask = None if allowed is None else allowed.unsqueeze(1)  # (B, 1, N, S), all heads
        out = F.scaled_dot_product_attention(
            self._split_heads(q),
            self._split_heads(k),
            self._split_heads(v),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, heads, N, C/heads)
        out = out.transpose(1, 2).flatten(2)
        return self.out_proj(out)


class SelfAttentionLayer(nn.Module):
    """x = LN(x + Dropout(SelfAttn(q = k = x + pos, v = x)))."""

    def __init__(self, *, dim: int = 256, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.attn = MultiHeadAttention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """x (B, N, C), pos broadcastable to x → (B, N, C)."""
        qk = x + pos
        return self.norm(x + self.dropout(self.attn(qk, qk, x)))


class CrossAttentionLayer(nn.Module):
    """x = LN(x + Dropout(Attn(q = x + query_pos, k = keys, v = values))).

    ``keys`` are the memory with its positional encoding added, ``values`` the memory alone
    (see ``DecoderMemory``); they are built once per forward pass and shared by all layers.
    """

    def __init__(self, *, dim: int = 256, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.attn = MultiHeadAttention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        keys: Tensor,
        values: Tensor,
        *,
        query_pos: Tensor,
        allowed: Tensor | None = None,
    ) -> Tensor:
        """x (B, N, C), keys/values (B, S, C), query_pos broadcastable to x,
        allowed (B, N, S) bool or None → (B, N, C)."""
        out = self.attn(x + query_pos, keys, values, allowed)
        return self.norm(x + self.dropout(out))


class FFNLayer(nn.Module):
    """x = LN(x + Dropout(Linear(Dropout(ReLU(Linear(x))))))."""

    def __init__(self, *, dim: int = 256, ffn_dim: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., C) → (..., C)."""
        hidden = self.dropout(F.relu(self.linear1(x)))
        return self.norm(x + self.dropout(self.linear2(hidden)))


class DecoderLayer(nn.Module):
    """One Mask2Former decoder layer: masked cross-attention → self-attention → FFN (§4.1)."""

    def __init__(self, *, dim: int = 256, num_heads: int = 8, ffn_dim: int = 2048):
        super().__init__()
        self.cross_attn = CrossAttentionLayer(dim=dim, num_heads=num_heads)
        self.self_attn = SelfAttentionLayer(dim=dim, num_heads=num_heads)
        self.ffn = FFNLayer(dim=dim, ffn_dim=ffn_dim)

    def forward(
        self, x: Tensor, keys: Tensor, values: Tensor, *, query_pos: Tensor, allowed: Tensor
    ) -> Tensor:
        """x (B, N, C), keys/values (B, S, C), allowed (B, N, S) → (B, N, C)."""
        x = self.cross_attn(x, keys, values, query_pos=query_pos, allowed=allowed)
        x = self.self_attn(x, query_pos)
        return self.ffn(x)


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last)."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_dim) → (..., out_dim)."""
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class PredictionHead(nn.Module):
    """LayerNorm → class logits (K+1) and mask embeddings (mask_dim) per query."""

    def __init__(self, *, dim: int = 256, num_classes: int = 124, mask_dim: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = MLP(in_dim=dim, hidden_dim=dim, out_dim=mask_dim, num_layers=3)

    def forward(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """queries (..., N, C) → class logits (..., N, K+1), mask embeddings (..., N, mask_dim)."""
        x = self.norm(queries)
        return self.class_embed(x), self.mask_embed(x)


def allowed_positions(mask_logits: Tensor) -> Tensor:
    """Masked-attention mask from mask logits at the memory's resolution (§4.1).

    mask_logits (B, N, S) → allowed (B, N, S) bool, detached: a position is blocked where
    ``sigmoid(logit) < 0.5``; a query whose whole row would be blocked may attend everywhere.
    """
    allowed = mask_logits.detach().sigmoid() >= 0.5
    empty = ~allowed.any(dim=-1, keepdim=True)
    return allowed | empty


def resize_features(features: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """features (B, C, H, W) → [(B, C, h, w) for (h, w) in sizes], bilinear, align_corners False.

    Bilinear resizing is linear per channel, so resizing the mask features and then taking the
    einsum with the mask embeddings equals resizing the mask logits themselves (DESIGN §4.1
    resizes the predicted masks); it just avoids computing full-resolution masks for every layer.
    The source is converted to channels-last once (the CPU kernel is about twice as fast there);
    the results are contiguous.
    """
    source = features.contiguous(memory_format=torch.channels_last)
    return [
        features
        if tuple(features.shape[-2:]) == tuple(size)
        else F.interpolate(source, size=size, mode="bilinear", align_corners=False).contiguous()
        for size in sizes
    ]


@dataclass
class DecoderMemory:
    """The pixel decoder's levels flattened into attention memory, per frame.

    values: per level (B·T, h·w, C), features + level embedding (attention values);
    keys:   per level (B·T, h·w, C), values + the clip's 3-D sine position encoding;
    sizes:  per level (h, w).
    """

    values: list[Tensor]
    keys: list[Tensor]
    sizes: list[tuple[int, int]]


def decoder_memory(
    multi_scale: Sequence[Tensor], level_embed: Tensor, frames: int
) -> DecoderMemory:
    """multi_scale: L maps (B·T, C, h, w) (frames of a clip consecutive), level_embed (L, C).

    The position encoding is the 3-D sine encoding over (t, y, x) of a T-frame clip
    (normalised over T, DESIGN §8); it is computed once per level and broadcast over clips.
    """
    values, keys, sizes = [], [], []
    for level, features in enumerate(multi_scale):
        frames_total, channels, height, width = features.shape
        if frames_total % frames != 0:
            raise ValueError(
                f"decoder_memory: {frames_total} frames is not a multiple of T={frames}"
            )
        pos = sine_position_encoding_3d(
            1,
            frames,
            height,
            width,
            num_feats=channels // 2,
            device=features.device,
            dtype=features.dtype,
        )  # (1, T, C, h, w)
        pos = pos.flatten(3).transpose(2, 3)  # (1, T, h·w, C)
        value = features.flatten(2).transpose(1, 2) + level_embed[level]  # (B·T, h·w, C)
        key = (value.view(-1, frames, height * width, channels) + pos).flatten(0, 1)
        values.append(value)
        keys.append(key)
        sizes.append((height, width))
    return DecoderMemory(values=values, keys=keys, sizes=sizes)
