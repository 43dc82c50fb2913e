"""Post-norm, batch-first decoder layers; ``QueryDecoder``, the one masked-attention layer
loop of both decoders (docs/DESIGN.md §4); ``MaskDecoder``, the single-frame decoder (§4.1)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from themask.data.vspw import NUM_CLASSES
from themask.modeling.linear import Linear, bmm, linear
from themask.modeling.outputs import MaskSource, Predictions, PredictionSet
from themask.modeling.position_encoding import sine_position_encoding_3d
from themask.rng import uniform


def dropout(x: Tensor, p: float) -> Tensor:
    """Train-mode dropout, any shape: on CPU x · [u ≥ p] / (1 − p) with u from
    ``themask.rng.uniform`` (torch's CPU ``bernoulli_`` fills serially); ``F.dropout`` elsewhere."""
    if x.device.type != "cpu" or not 0 < p < 1:
        return F.dropout(x, p)  # p = 0: x itself
    return x * uniform(*x.shape).ge_(p).mul_(1 / (1 - p)).to(x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same repr, no state) through ``dropout``; the identity in eval mode."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p) if self.training else x


class MultiHeadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` parameters with a batch-first forward on
    ``F.scaled_dot_product_attention``; with ``dropout`` on the attention weights in train mode,
    on CPU the same attention computed explicitly, its weights through ``dropout``."""

    def __init__(self, *, dim: int = 256, num_heads: int = 8, dropout: float = 0.0):
        if dim % num_heads != 0:
            raise ValueError(f"MultiHeadAttention: dim {dim} is not divisible by {num_heads} heads")
        super().__init__(dim, num_heads, dropout=dropout, batch_first=True)
        nn.init.xavier_uniform_(self.out_proj.weight)

    def forward(  # type: ignore[override]
        self, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None = None
    ) -> Tensor:
        """query (B, N, C), key/value (B, S, C), allowed (B, N, S) bool → (B, N, C)."""
        weight, bias, dim = self.in_proj_weight, self.in_proj_bias, query.shape[-1]
        if key is query:  # self-attention: one matmul for queries and keys
            q, k = linear(query, weight[: 2 * dim], bias[: 2 * dim]).chunk(2, dim=-1)
        else:
            q = linear(query, weight[:dim], bias[:dim])
            k = linear(key, weight[dim : 2 * dim], bias[dim : 2 * dim])
        v = linear(value, weight[2 * dim :], bias[2 * dim :])
        mask = None if allowed is None else allowed.unsqueeze(1)  # (B, 1, N, S), all heads
        q, k, v = (x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for x in (q, k, v))
        p = self.dropout if self.training else 0.0
        if p > 0 and q.device.type == "cpu":  # SDPA would draw with bernoulli_
            scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, S)
            if mask is not None:  # as SDPA: -inf where not allowed, 0 for rows blocked everywhere
                blocked = ~mask.any(-1, keepdim=True)
                scores.masked_fill_(~(mask | blocked), float("-inf"))
            out = dropout(scores.softmax(-1), p) @ v
            out = out if mask is None else out.masked_fill(blocked, 0.0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.transpose(1, 2).flatten(2)  # (B, heads, N, C/heads) → (B, N, C)
        return linear(out, self.out_proj.weight, self.out_proj.bias)


class _AttentionLayer(nn.Module):
    def __init__(self, *, dim: int = 256, num_heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.attn = MultiHeadAttention(dim=dim, num_heads=num_heads, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)


class SelfAttentionLayer(_AttentionLayer):
    """x = LN(x + Dropout(SelfAttn(q = k = x + pos, v = x))); x (B, N, C) → (B, N, C)."""

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        qk = x + pos
        return self.norm(x + self.dropout(self.attn(qk, qk, x)))


class CrossAttentionLayer(_AttentionLayer):
    """x = LN(x + Dropout(Attn(q = x + query_pos, k = keys, v = values))); x (B, N, C),
    keys/values (B, S, C), allowed (B, N, S) bool or None → (B, N, C)."""

    def forward(
        self,
        x: Tensor,
        keys: Tensor,
        values: Tensor,
        *,
        query_pos: Tensor,
        allowed: Tensor | None = None,
    ) -> Tensor:
        return self.norm(x + self.dropout(self.attn(x + query_pos, keys, values, allowed)))


class FFNLayer(nn.Module):
    """x = LN(x + Dropout(Linear(Dropout(ReLU(Linear(x)))))); (..., C) → (..., C)."""

    def __init__(self, *, dim: int = 256, ffn_dim: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.linear1 = Linear(dim, ffn_dim)
        self.linear2 = Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(self.linear1(x, relu=True)))))


class DecoderLayer(nn.Module):
    """Masked cross-attention → self-attention → FFN (§4.1): x (B, N, C), keys/values
    (B, S, C), allowed (B, N, S) → (B, N, C)."""

    def __init__(self, *, dim: int = 256, num_heads: int = 8, ffn_dim: int = 2048):
        super().__init__()
        self.cross_attn = CrossAttentionLayer(dim=dim, num_heads=num_heads)
        self.self_attn = SelfAttentionLayer(dim=dim, num_heads=num_heads)
        self.ffn = FFNLayer(dim=dim, ffn_dim=ffn_dim)

    def forward(
        self, x: Tensor, keys: Tensor, values: Tensor, *, query_pos: Tensor, allowed: Tensor | None
    ) -> Tensor:
        x = self.cross_attn(x, keys, values, query_pos=query_pos, allowed=allowed)
        x = self.self_attn(x, query_pos)
        return self.ffn(x)


class MLP(nn.Module):
    """Linear layers with ReLU between them: (..., in_dim) → (..., out_dim)."""

    def __init__(self, *, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = layer(x, relu=True)
        return self.layers[-1](x)


class PredictionHead(nn.Module):
    """LayerNorm → class logits and mask embeddings: queries (..., N, C) →
    (..., N, K+1), (..., N, mask_dim)."""

    def __init__(self, *, dim: int = 256, num_classes: int = NUM_CLASSES, mask_dim: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.class_embed = Linear(dim, num_classes + 1)
        self.mask_embed = MLP(in_dim=dim, hidden_dim=dim, out_dim=mask_dim, num_layers=3)

    def forward(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        x = self.norm(queries)
        return self.class_embed(x), self.mask_embed(x)


def run_layer(layer: Callable[..., Any], checkpointed: bool, *args: Any, **kwargs: Any) -> Any:
    """``layer(*args, **kwargs)``, under non-reentrant activation checkpointing when
    ``checkpointed`` and autograd records."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


def allowed_positions(mask_logits: Tensor) -> Tensor:
    """Masked-attention mask (§4.1): mask_logits (B, N, S) → (B, N, S) bool, False where
    ``sigmoid(logit) < 0.5``; a query blocked everywhere may attend everywhere."""
    allowed = mask_logits.detach().sigmoid() >= 0.5
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def resize_features(features: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """features (B, C, H, W) → [(B, C, h, w) for (h, w) in sizes], bilinear (linear, so
    masks from resized features equal resized masks, §4.1)."""
    source = features.contiguous(memory_format=torch.channels_last)  # faster CPU kernel
    return [
        features
        if tuple(features.shape[-2:]) == tuple(size)
        else F.interpolate(source, size=size, mode="bilinear", align_corners=False)
        for size in sizes
    ]


def decoder_memory(
    multi_scale: Sequence[Tensor], level_embed: Tensor, frames: int
) -> tuple[list[Tensor], list[Tensor]]:
    """multi_scale: L maps (B·T, C, h, w), frames of a clip consecutive; level_embed (L, C) →
    keys and values (B·T, h·w, C) per level: values = features + level embedding, keys = values
    + the clip's 3-D sine position encoding."""
    keys, values = [], []
    for level, features in enumerate(multi_scale):
        _, channels, height, width = features.shape
        pos = sine_position_encoding_3d(
            frames, height, width, num_feats=channels // 2, device=features.device
        ).to(features.dtype)  # (T, C, h, w)
        pos = pos.flatten(2).transpose(1, 2)  # (T, h·w, C)
        value = features.flatten(2).transpose(1, 2) + level_embed[level]  # (B·T, h·w, C)
        values.append(value)
        keys.append((value.view(-1, frames, height * width, channels) + pos).flatten(0, 1))
    return keys, values


@dataclass
class DecodingState:
    """queries (B·T, N, C) per frame; clip (B, N, C) the clip queries (the single-frame
    decoder's queries, T = 1); mask_features (B·T, D, H/4, W/4); frames T decoded jointly."""

    queries: Tensor
    clip: Tensor
    mask_features: Tensor
    frames: int


class QueryDecoder(nn.Module):
    """Learned queries refined by ``num_layers`` masked-attention layers, layer i reading memory
    level ``i mod num_levels`` (strides 32, 16, 8); the hooks below decode every frame as its own
    clip (``MaskDecoder``), and ``TemporalDecoder`` overrides them."""

    is_temporal = False  # True: B clips of T frames decoded jointly; False: B·T one-frame clips

    def __init__(
        self,
        *,
        num_classes: int = NUM_CLASSES,
        num_queries: int = 100,
        dim: int = 256,
        mask_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 9,
        num_levels: int = 3,
    ):
        super().__init__()
        self.num_levels, self.num_heads = num_levels, num_heads
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_pos = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(num_levels, dim)
        self.layers = nn.ModuleList(
            DecoderLayer(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim) for _ in range(num_layers)
        )
        self.head_sizes = dict(dim=dim, num_classes=num_classes, mask_dim=mask_dim)
        self.clip_head = PredictionHead(**self.head_sizes)
        self.checkpoint_layers = False  # recompute the layers in backward (see run_layer)

    def forward(
        self,
        mask_features: Tensor,
        multi_scale: Sequence[Tensor],
        *,
        frames: int,
        return_all: bool = True,
    ) -> Predictions:
        """mask_features (B·T, mask_dim, H/4, W/4), multi_scale L × (B·T, C, h, w) of B clips
        of T = ``frames`` frames (frame t of clip b at row b·T + t) → ``Predictions``: all
        ``num_layers + 1`` prediction sets if ``return_all``, else the final one."""
        clip_len = frames if self.is_temporal else 1
        keys, values = decoder_memory(multi_scale, self.level_embed.weight, frames=clip_len)
        resized = resize_features(mask_features, [(m.shape[-2], m.shape[-1]) for m in multi_scale])
        query_pos = self.query_pos.weight.unsqueeze(0)  # (1, N, C)
        batch = mask_features.shape[0] // clip_len
        queries = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)  # (B, N, C)
        queries, clip = self._start(queries, query_pos, keys, values, clip_len)
        state = DecodingState(queries, clip, mask_features, clip_len)

        read_outs: list[list[tuple[Tensor, Tensor]]] = []  # per read-out and head: (class, embed)
        allowed: Tensor | None = None
        for index in range(len(self.layers) + 1):
            if index > 0:
                layer, level = self.layers[index - 1], (index - 1) % self.num_levels
                inputs = (state.queries, keys[level], values[level])  # queries (B·T, N, C)
                options = {"query_pos": query_pos, "allowed": allowed}
                state.queries = run_layer(layer, self.checkpoint_layers, *inputs, **options)
                self._after_layer(state)
            is_final = index == len(self.layers)
            heads, embeddings = self._heads(state, full=return_all or is_final)
            if heads:
                read_outs.append(heads)
            if not is_final:
                features = resized[index % self.num_levels]
                with torch.no_grad():
                    low = self._attention_logits(embeddings, features, state)
                allowed = allowed_positions(low)  # (B·T, N, h·w)
        sets = self._prediction_sets(read_outs, state)
        return Predictions(
            clip=[head_sets[0] for head_sets in sets],
            frame=[head_sets[1] for head_sets in sets] if self.is_temporal else None,
            frames_per_clip=frames,
        )

    def _prediction_sets(
        self, read_outs: list[list[tuple[Tensor, Tensor]]], state: DecodingState
    ) -> list[list[PredictionSet]]:
        """S read-outs' per-head (class logits, mask embeddings (B, N, D) clip head or
        (B, T, N, D) frame head) → prediction sets, each head's S mask logits from one product
        (in training also named as a ``MaskSource``: the loss reads its matched rows from it)."""
        batch, frames, sets = state.clip.shape[0], state.frames, len(read_outs)
        height, width = state.mask_features.shape[-2:]
        masks, sources = [], []
        training = torch.is_grad_enabled() and not torch.compiler.is_compiling()
        for head in range(len(read_outs[0])):
            embeddings = torch.cat([heads[head][1] for heads in read_outs], -2)  # (B, [T,] S·N, D)
            if embeddings.dim() == 3:  # clip head: the same embeddings for every frame
                embeddings = embeddings.unsqueeze(1).expand(-1, frames, -1, -1)
            embeddings, features = embeddings.flatten(0, 1), state.mask_features.flatten(2)
            flat = bmm(embeddings, features)  # (B·T, S·N, h·w)
            logits = flat.view(batch, frames, sets, -1, height, width)
            queries = logits.shape[3]
            masks.append(logits.permute(2, 0, 3, 1, 4, 5).unbind(0))  # S × (B, N, T, h, w)
            source = partial(MaskSource, embeddings, features, flat.detach()) if training else None
            sources.append([source(s * queries) if source else None for s in range(sets)])
        return [
            [PredictionSet(heads[h][0], masks[h][s], sources[h][s]) for h in range(len(heads))]
            for s, heads in enumerate(read_outs)
        ]

    def _start(
        self, queries: Tensor, pos: Tensor, keys: list[Tensor], values: list[Tensor], frames: int
    ) -> tuple[Tensor, Tensor]:
        """Learned queries (B, N, C) → layer 1's queries (B·T, N, C) and clip queries (B, N, C)."""
        return queries, queries

    def _after_layer(self, state: DecodingState) -> None:
        """The clip queries after a layer has refined ``state.queries``."""
        state.clip = state.queries

    def _heads(
        self, state: DecodingState, *, full: bool
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """Each head's class logits and mask embeddings (none unless ``full``), the clip head's
        mask embeddings (B, N, D)."""
        class_logits, embeddings = self.clip_head(state.clip)  # (B, N, K+1), (B, N, D)
        return ([(class_logits, embeddings)] if full else []), embeddings

    def _attention_logits(
        self, embeddings: Tensor, features: Tensor, state: DecodingState
    ) -> Tensor:
        """Mask logits (B·T, N, h·w) of a memory level's mask features (B·T, D, h, w)."""
        return bmm(embeddings.repeat_interleave(state.frames, dim=0), features.flatten(2))


class MaskDecoder(QueryDecoder):
    """Every frame decoded as its own clip → ``Predictions`` of B·T one-frame clips:
    class (B·T, N, K+1), masks (B·T, N, 1, H/4, W/4): ``QueryDecoder``'s own hooks."""
