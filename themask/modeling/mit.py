"""Mix Transformer (MiT), the SegFormer encoder (docs/DESIGN.md §2): four stages, each an
overlapping patch embedding, pre-norm blocks (spatial-reduction attention, Mix-FFN), LayerNorm."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from themask.modeling.linear import Linear

BLOCK_NORM_EPS = 1e-6

_WIDE = (64, 128, 320, 512)
_HEADS = (1, 2, 5, 8)

MIT_VARIANTS: dict[str, dict[str, Any]] = {
    "mit_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), num_heads=_HEADS),
    "mit_b1": dict(embed_dims=_WIDE, depths=(2, 2, 2, 2), num_heads=_HEADS),
    "mit_b2": dict(embed_dims=_WIDE, depths=(3, 4, 6, 3), num_heads=_HEADS),
    "mit_b3": dict(embed_dims=_WIDE, depths=(3, 4, 18, 3), num_heads=_HEADS),
    "mit_b4": dict(embed_dims=_WIDE, depths=(3, 8, 27, 3), num_heads=_HEADS),
    "mit_b5": dict(embed_dims=_WIDE, depths=(3, 6, 40, 3), num_heads=_HEADS),
}


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    return x * x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep) / keep


def _tokens_to_map(x: Tensor, height: int, width: int) -> Tensor:
    """(N, H·W, C) tokens → (N, C, H, W) view in channels-last memory (no copy)."""
    return x.unflatten(1, (height, width)).permute(0, 3, 1, 2)


def _map_to_tokens(x: Tensor) -> Tensor:
    """(N, C, H, W) → (N, H·W, C); free when ``x`` is channels-last in memory."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows, then LayerNorm (eps 1e-5):
    (N, C_in, H, W) → tokens (N, h·w, C), h, w."""

    def __init__(self, *, in_channels: int, embed_dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(
            in_channels, embed_dim, kernel_size, stride=stride, padding=kernel_size // 2
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(_map_to_tokens(x)), height, width


class SpatialReductionAttention(nn.Module):
    """Self-attention with keys/values from the map reduced by a conv of stride ``sr_ratio``
    and LayerNorm (eps 1e-5); ``kv`` rows [0, C) are the keys, [C, 2C) the values."""

    def __init__(self, *, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"MiT attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.sr_ratio = num_heads, sr_ratio
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.proj = Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """x: (N, L, C) tokens of an (height, width) map, L = height·width → (N, L, C)."""
        n, length, dim = x.shape
        head_dim = dim // self.num_heads
        q = self.q(x)
        if self.sr_ratio > 1:
            reduced = self.sr(_tokens_to_map(x, height, width))  # (N, C, h/sr, w/sr)
            x = self.sr_norm(_map_to_tokens(reduced))  # (N, Lk, C)
        q = q.unflatten(-1, (self.num_heads, head_dim)).transpose(1, 2)  # (N, heads, L, d)
        k, v = self.kv(x).unflatten(-1, (2, self.num_heads, head_dim)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale d^-1/2, (N, heads, L, d)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class MixFFN(nn.Module):
    """Linear(C → hC) → depth-wise 3×3 conv on the 2-D map → GELU → Linear(hC → C)."""

    def __init__(self, *, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.fc2 = Linear(hidden_dim, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """x: (N, L, C) → (N, L, C)."""
        x = _map_to_tokens(self.dwconv(_tokens_to_map(self.fc1(x), height, width)))
        return self.fc2(F.gelu(x) if x.requires_grad else torch.ops.aten.gelu_(x))


class MiTBlock(nn.Module):
    """Pre-norm block: x + DropPath(Attn(LN(x))), then x + DropPath(MixFFN(LN(x)))."""

    def __init__(
        self, *, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float, drop_path: float
    ):
        super().__init__()
        self.drop_path_rate = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = SpatialReductionAttention(dim=dim, num_heads=num_heads, sr_ratio=sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim=dim, hidden_dim=int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        """x: (N, L, C) → (N, L, C)."""
        rate, training = self.drop_path_rate, self.training
        x = x + drop_path(self.attn(self.norm1(x), height, width), rate, training)
        return x + drop_path(self.mlp(self.norm2(x), height, width), rate, training)


class MiTStage(nn.Module):
    """Patch embedding → blocks → LayerNorm (eps 1e-6); returns a (N, C, h, w) map."""

    def __init__(
        self,
        *,
        in_channels: int,
        dim: int,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float,
        drop_path_rates: Sequence[float],
        first: bool,
    ):
        super().__init__()
        kernel_size, stride = (7, 4) if first else (3, 2)
        self.patch_embed = OverlapPatchEmbed(
            in_channels=in_channels, embed_dim=dim, kernel_size=kernel_size, stride=stride
        )
        self.blocks = nn.ModuleList(
            MiTBlock(
                dim=dim, num_heads=num_heads, sr_ratio=sr_ratio, mlp_ratio=mlp_ratio, drop_path=rate
            )
            for rate in drop_path_rates
        )
        self.norm = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C_in, H, W) → (N, C, ⌈H/s⌉, ⌈W/s⌉) as a channels-last view (no copy)."""
        tokens, height, width = self.patch_embed(x)
        for block in self.blocks:
            tokens = block(tokens, height, width)
        return _tokens_to_map(self.norm(tokens), height, width)


class MixTransformer(nn.Module):
    """MiT encoder: (N, 3, H, W) → 4 maps (N, C_s, ⌈H/s⌉, ⌈W/s⌉), s = 4, 8, 16, 32
    (``out_channels``, ``strides``); stochastic depth rises linearly to ``drop_path_rate``."""

    strides: tuple[int, ...] = (4, 8, 16, 32)

    def __init__(
        self,
        *,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int],
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: float = 4,
        drop_path_rate: float = 0.1,
        in_channels: int = 3,
    ):
        super().__init__()
        if {len(embed_dims), len(depths), len(num_heads), len(sr_ratios)} != {4}:
            raise ValueError(
                f"MixTransformer: embed_dims {embed_dims}, depths {depths}, num_heads {num_heads} "
                f"and sr_ratios {sr_ratios} need one entry per stage (4)"
            )
        self.out_channels: tuple[int, ...] = tuple(int(c) for c in embed_dims)
        self.depths: tuple[int, ...] = tuple(int(d) for d in depths)
        total = sum(self.depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear 0 → rate
        bounds = [0, *accumulate(self.depths)]  # each stage's blocks
        self.stages = nn.ModuleList(
            MiTStage(
                in_channels=in_channels if index == 0 else self.out_channels[index - 1],
                dim=self.out_channels[index],
                num_heads=num_heads[index],
                sr_ratio=sr_ratios[index],
                mlp_ratio=mlp_ratio,
                drop_path_rates=rates[bounds[index] : bounds[index + 1]],
                first=index == 0,
            )
            for index in range(len(self.depths))
        )
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (N, 3, H, W) → [(N, C_s, ⌈H/stride_s⌉, ⌈W/stride_s⌉) for the 4 stages], each a
        channels-last view of the stage's tokens (no copy; convolutions read it as is)."""
        return [x := stage(x) for stage in self.stages]


def _init_weights(module: nn.Module) -> None:
    """SegFormer initialisation: truncated normal (std 0.02) linears, He-style fan-out convs."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / (fan_out // module.groups)))
    else:
        return
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def build_mit(name: str, **overrides: Any) -> MixTransformer:
    """Build ``mit_b0`` … ``mit_b5``; ``overrides`` replace constructor arguments (``None``
    keeps the variant's value)."""
    if name not in MIT_VARIANTS:
        raise ValueError(f"unknown MiT variant {name!r}; expected one of {sorted(MIT_VARIANTS)}")
    kwargs = dict(MIT_VARIANTS[name])
    kwargs.update({key: value for key, value in overrides.items() if value is not None})
    return MixTransformer(**kwargs)
