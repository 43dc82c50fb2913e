"""Presets and builders, the only place that reads a ``ModelConfig`` (docs/DESIGN.md §4–§7).
``PRESETS``: name → ``ModelConfig`` diff (the network: ``*_t1`` and ``mask2former_*`` the
single-frame decoder, ``*_t2`` the TAD); ``PRESET_LOSSES``: name → ``LossConfig`` diff."""

from __future__ import annotations

import dataclasses
from typing import Any

from themask.data.vspw import NUM_CLASSES
from themask.loss.config import LossConfig
from themask.modeling.config import ModelConfig
from themask.modeling.mit import build_mit
from themask.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from themask.modeling.temporal_decoder import TemporalDecoder
from themask.modeling.themask import THEMask
from themask.modeling.transformer import MaskDecoder

_TINY: dict[str, Any] = dict(
    backbone="mit_b0",
    backbone_embed_dims=(16, 32, 64, 128),
    backbone_depths=(1, 1, 1, 1),
    backbone_num_heads=(1, 1, 2, 4),
    num_queries=10,
    hidden_dim=64,
    mask_dim=64,
    pixel_decoder_layers=2,
    pixel_decoder_heads=4,
    pixel_decoder_ffn_dim=128,
    deform_points=2,
    decoder_layers=3,
    decoder_heads=4,
    decoder_ffn_dim=128,
    tad_ffn_dim=128,
)

PRESETS: dict[str, dict[str, Any]] = {}
PRESET_LOSSES: dict[str, dict[str, Any]] = {}
_T1: dict[str, Any] = dict(decoder="single", num_frames=1)
_T2: dict[str, Any] = dict(decoder="temporal", num_frames=2)
# network and default objective (LossConfig diff) of the three families; tiny: fewer points
for _size, _network, _loss in [(f"mit_b{i}", dict(backbone=f"mit_b{i}"), {}) for i in range(6)] + [
    ("tiny", _TINY, dict(num_points=1024))
]:
    for _name, _decoder, _objective in (
        (f"themask_{_size}_t1", _T1, dict(second_round_cost="bce")),
        (f"themask_{_size}_t2", _T2, dict(second_round_cost="full")),
        (f"mask2former_{_size}", _T1, dict(num_rounds=1, second_round_loss="hard")),
    ):
        PRESETS[_name] = {**_network, **_decoder}
        PRESET_LOSSES[_name] = {**_objective, **_loss}


def list_presets() -> list[str]:
    """Names accepted by ``build_model``, sorted."""
    return sorted(PRESETS)


def preset_config(name: str, *, num_classes: int = NUM_CLASSES, **overrides: Any) -> ModelConfig:
    """The network (``ModelConfig``) of preset ``name`` with ``overrides`` (``ModelConfig``
    fields) applied. ``mask2former_*`` and ``themask_*_t1`` share a network."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {list_presets()}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"preset {name!r}: unknown ModelConfig field(s) {unknown}")
    return ModelConfig(**{**PRESETS[name], **overrides, "num_classes": num_classes})


def preset_loss_config(name: str, **overrides: Any) -> LossConfig:
    """The default training objective of preset ``name`` with ``overrides`` (``LossConfig``
    fields) applied."""
    if name not in PRESET_LOSSES:
        raise ValueError(f"unknown preset {name!r}; expected one of {list_presets()}")
    return LossConfig(**{**PRESET_LOSSES[name], **overrides})


def build_model_from_config(config: ModelConfig) -> THEMask:
    """Wire backbone, pixel decoder and transformer decoder as ``config`` describes."""
    backbone = build_mit(
        config.backbone,
        embed_dims=config.backbone_embed_dims,
        depths=config.backbone_depths,
        num_heads=config.backbone_num_heads,
        drop_path_rate=config.drop_path_rate,
    )
    pixel_decoder = MSDeformAttnPixelDecoder(
        in_channels=backbone.out_channels,
        conv_dim=config.hidden_dim,
        mask_dim=config.mask_dim,
        num_layers=config.pixel_decoder_layers,
        num_heads=config.pixel_decoder_heads,
        num_points=config.deform_points,
        ffn_dim=config.pixel_decoder_ffn_dim,
    )
    temporal = config.decoder == "temporal"
    tad_args: dict[str, Any] = dict(tad_ffn_dim=config.tad_ffn_dim, tad_dropout=config.tad_dropout)
    decoder = (TemporalDecoder if temporal else MaskDecoder)(
        num_classes=config.num_classes,
        num_queries=config.num_queries,
        dim=config.hidden_dim,
        mask_dim=config.mask_dim,
        num_heads=config.decoder_heads,
        ffn_dim=config.decoder_ffn_dim,
        num_layers=config.decoder_layers,
        **(tad_args if temporal else {}),
    )
    return THEMask(config=config, backbone=backbone, pixel_decoder=pixel_decoder, decoder=decoder)


def build_model(name: str, *, num_classes: int = NUM_CLASSES, **overrides: Any) -> THEMask:
    """Build preset ``name`` (see ``list_presets()``); ``overrides`` are ``ModelConfig`` fields."""
    return build_model_from_config(preset_config(name, num_classes=num_classes, **overrides))
