"""Model configuration: a plain dataclass; presets are small diffs of it (see ``build.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from themask.data.vspw import NUM_CLASSES


@dataclass
class ModelConfig:
    """Everything needed to rebuild a network; ``backbone_*`` override the widths, depths and
    heads of the MiT variant ``backbone`` (``mit_b0`` … ``mit_b5``)."""

    backbone: str = "mit_b1"
    backbone_embed_dims: tuple[int, int, int, int] | None = None  # None: MIT_VARIANTS' value
    backbone_depths: tuple[int, int, int, int] | None = None
    backbone_num_heads: tuple[int, int, int, int] | None = None
    drop_path_rate: float = 0.1
    decoder: Literal["single", "temporal"] = "temporal"  # single = Mask2Former decoder (§4.1)
    num_classes: int = NUM_CLASSES
    num_frames: int = 2  # clip length used for training the temporal decoder
    num_queries: int = 100
    hidden_dim: int = 256
    mask_dim: int = 256
    # pixel decoder (§3)
    pixel_decoder_layers: int = 6
    pixel_decoder_heads: int = 8
    pixel_decoder_ffn_dim: int = 1024
    deform_points: int = 4
    # transformer decoder (§4)
    decoder_layers: int = 9
    decoder_heads: int = 8
    decoder_ffn_dim: int = 2048
    # temporal aggregation module (§4.2)
    tad_ffn_dim: int = 2048
    tad_dropout: float = 0.1
    size_divisor: int = 32
