"""Mask2Former pixel decoder (docs/DESIGN.md §3): a deformable-attention encoder over res5,
res4, res3 and one FPN step onto res2 that gives the per-pixel ``mask_features``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from themask.modeling.linear import Linear, SameConv2d
from themask.modeling.ms_deform_attn import MSDeformAttn, SpatialShapes, offset_normaliser
from themask.modeling.outputs import FrameFeatures
from themask.modeling.position_encoding import sine_position_encoding_2d
from themask.modeling.transformer import run_layer
from themask.precision import in_float32

NUM_ENCODER_LEVELS = 3


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a ReLU FFN (dropout 0)."""

    def __init__(
        self, *, dim: int = 256, ffn_dim: int = 1024, num_heads: int = 8, num_points: int = 4
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(
            dim=dim, num_heads=num_heads, num_levels=NUM_ENCODER_LEVELS, num_points=num_points
        )
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = Linear(dim, ffn_dim)
        self.linear2 = Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: SpatialShapes,
        normaliser: Tensor | None = None,
    ) -> Tensor:
        """src (N, S, C), pos (S, C), reference_points (1, S, 2) → (N, S, C); ``normaliser``:
        see ``MSDeformAttn.forward``."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, normaliser)
        src = self.norm1(src + attended)
        return self.norm2(src + self.linear2(self.linear1(src, relu=True)))


def _pixel_centres(
    spatial_shapes: SpatialShapes, *, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """(1, S, 2) pixel centres ((j+0.5)/W_l, (i+0.5)/H_l) of every level, row-major."""
    work_dtype = torch.promote_types(dtype, torch.float32)  # never coarser than float32
    centres = []
    for height, width in spatial_shapes:
        ys = (torch.arange(height, dtype=work_dtype, device=device) + 0.5) / height
        xs = (torch.arange(width, dtype=work_dtype, device=device) + 0.5) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1))
    return torch.cat(centres, dim=0).to(dtype).unsqueeze(0)


class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder of Mask2Former: backbone maps res2..res5 → ``FrameFeatures``."""

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: in_channels must list the 4 backbone stages "
                f"(strides 4, 8, 16, 32), got {list(in_channels)}"
            )
        if conv_dim % norm_groups:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: conv_dim {conv_dim} is not divisible by "
                f"norm_groups {norm_groups}"
            )
        self.in_channels, self.conv_dim = tuple(in_channels), conv_dim
        # res5, res4, res3: lowest resolution first, the encoder's level order
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, conv_dim, 1), nn.GroupNorm(norm_groups, conv_dim))
            for channels in reversed(self.in_channels[1:])
        )
        self.level_embed = nn.Parameter(torch.empty(NUM_ENCODER_LEVELS, conv_dim))
        self.encoder_layers = nn.ModuleList(
            DeformableEncoderLayer(
                dim=conv_dim, ffn_dim=ffn_dim, num_heads=num_heads, num_points=num_points
            )
            for _ in range(num_layers)
        )
        self.lateral = nn.Sequential(
            nn.Conv2d(self.in_channels[0], conv_dim, 1, bias=False),
            nn.GroupNorm(norm_groups, conv_dim),
        )
        self.fpn_output = nn.Sequential(
            SameConv2d(conv_dim, conv_dim, 3),
            nn.GroupNorm(norm_groups, conv_dim),
            nn.ReLU(inplace=True),
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        self.checkpoint_layers = False  # recompute encoder layers in backward (see run_layer)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mask2Former initialisation: xavier for the projections and encoder, Caffe2-style
        xavier (kaiming-uniform, a=1) for the FPN convs, N(0, 1) level embeddings."""
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)  # type: ignore[index]
            nn.init.zeros_(proj[0].bias)  # type: ignore[index]
        for param in self.encoder_layers.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        for layer in self.encoder_layers:
            layer.self_attn.reset_parameters()  # type: ignore[union-attr, operator]
        nn.init.normal_(self.level_embed)
        convs = (self.lateral[0], self.fpn_output[0], self.mask_features)
        for conv in cast("tuple[nn.Conv2d, ...]", convs):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> FrameFeatures:
        """features: [res2 (N, C2, H/4, W/4), res3 (N, C3, H/8, W/8), res4 (N, C4, H/16, W/16),
        res5 (N, C5, H/32, W/32)] → mask_features (N, mask_dim, H/4, W/4), multi_scale
        [(N, C, H/32, W/32), (N, C, H/16, W/16), (N, C, H/8, W/8)]."""
        channels = tuple(f.shape[1] for f in features)
        if channels != self.in_channels:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: expected 4 feature maps res2..res5 of the in_channels "
                f"{self.in_channels} it was built with, got channels {channels}"
            )
        maps = [in_float32(proj, x) for proj, x in zip(self.input_proj, reversed(features[1:]))]
        batch = maps[0].shape[0]
        spatial_shapes = [(m.shape[2], m.shape[3]) for m in maps]  # stride 32, 16, 8
        src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # (N, S, C)
        device, dtype = src.device, src.dtype
        encodings = [  # (C, h, w) per level
            sine_position_encoding_2d(
                h, w, num_feats=self.conv_dim // 2, device=device, dtype=dtype
            )
            for h, w in spatial_shapes
        ]
        pos = torch.cat(  # (S, C), shared by the batch
            [e.flatten(1).t() + self.level_embed[i] for i, e in enumerate(encodings)]
        )
        centres = _pixel_centres(spatial_shapes, device=device, dtype=dtype)
        normaliser = offset_normaliser(spatial_shapes, device=device, dtype=dtype)
        for layer in self.encoder_layers:
            src = run_layer(
                layer, self.checkpoint_layers, src, pos, centres, spatial_shapes, normaliser
            )

        level_tokens = src.split([h * w for h, w in spatial_shapes], 1)
        multi_scale = [
            tokens.transpose(1, 2).reshape(batch, self.conv_dim, h, w)
            for (h, w), tokens in zip(spatial_shapes, level_tokens)
        ]
        res2 = features[0].contiguous(memory_format=torch.channels_last)  # as MiT's: faster convs
        fused = in_float32(self.lateral, res2)  # (N, C, H/4, W/4), channels-last like the rest
        coarse = multi_scale[-1].clone(memory_format=torch.channels_last)  # else NCHW out (N=1)
        # in place (the norm's output), as the ReLU: two stride-4 maps fewer at once
        fused.add_(F.interpolate(coarse, fused.shape[-2:], mode="bilinear", align_corners=False))
        return FrameFeatures(self.mask_features(self.fpn_output(fused)), multi_scale)
