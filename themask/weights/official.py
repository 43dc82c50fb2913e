"""Official THE-Mask checkpoints (mmseg 0.x names) → ours; the network of a full state dict.
The tables below are the only copy of the official names (docs/DESIGN.md §9)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from torch import Tensor

from themask.modeling.build import list_presets, preset_config
from themask.modeling.config import ModelConfig
from themask.modeling.mit import MIT_VARIANTS
from themask.weights.files import NameTable, StateDict, WeightsError, rename
from themask.weights.mit import mit_original_to_ours

logger = logging.getLogger(__name__)

# (official name after ``decode_head.``, our name); ``{i}`` stands for a layer index. Prefixes
# end with a dot or are full parameter names, so no entry is a prefix of another's match.
_CROSS = "predictor.transformer_cross_attention_layers.{i}."
_SELF = "predictor.transformer_self_attention_layers.{i}."
OFFICIAL_COMMON = (
    ("pixel_decoder.input_proj.", "pixel_decoder.input_proj."),
    ("pixel_decoder.transformer.level_embed", "pixel_decoder.level_embed"),
    ("pixel_decoder.transformer.encoder.layers.", "pixel_decoder.encoder_layers."),
    ("pixel_decoder.adapter_1.weight", "pixel_decoder.lateral.0.weight"),
    ("pixel_decoder.adapter_1.norm.", "pixel_decoder.lateral.1."),
    ("pixel_decoder.layer_1.weight", "pixel_decoder.fpn_output.0.weight"),
    ("pixel_decoder.layer_1.norm.", "pixel_decoder.fpn_output.1."),
    ("pixel_decoder.mask_features.", "pixel_decoder.mask_features."),
    ("predictor.query_feat.", "decoder.query_feat."),
    ("predictor.query_embed.", "decoder.query_pos."),
    ("predictor.level_embed.", "decoder.level_embed."),
    (f"{_CROSS}multihead_attn.", "decoder.layers.{i}.cross_attn.attn."),
    (f"{_CROSS}norm.", "decoder.layers.{i}.cross_attn.norm."),
    (f"{_SELF}self_attn.", "decoder.layers.{i}.self_attn.attn."),
    (f"{_SELF}norm.", "decoder.layers.{i}.self_attn.norm."),
    ("predictor.transformer_ffn_layers.{i}.", "decoder.layers.{i}.ffn."),
    ("predictor.class_embed.", "decoder.clip_head.class_embed."),
    ("predictor.mask_embed.", "decoder.clip_head.mask_embed."),
)
OFFICIAL_SINGLE = (("predictor.decoder_norm.", "decoder.clip_head.norm."),)
TAD = "predictor.deformabel_transformer_cross_attention_layers."  # (sic)
OFFICIAL_TEMPORAL = (
    ("predictor.decoder_norm1.", "decoder.clip_head.norm."),
    ("predictor.decoder_norm2.", "decoder.frame_head.norm."),
    ("predictor.class_embed_aux.", "decoder.frame_head.class_embed."),
    ("predictor.mask_embed_aux.", "decoder.frame_head.mask_embed."),
    (f"{TAD}self_attn.", "decoder.temporal.clip_self_attn.attn."),
    (f"{TAD}norm2.", "decoder.temporal.clip_self_attn.norm."),
    (f"{TAD}self_attn_box.", "decoder.temporal.frame_self_attn.attn."),
    (f"{TAD}norm2_box.", "decoder.temporal.frame_self_attn.norm."),
    (f"{TAD}cross_attn.", "decoder.temporal.frame_cross_attn.attn."),
    (f"{TAD}norm1_box.", "decoder.temporal.frame_cross_attn.norm."),
    (f"{TAD}linear1_box.", "decoder.temporal.frame_ffn.linear1."),
    (f"{TAD}linear2_box.", "decoder.temporal.frame_ffn.linear2."),
    (f"{TAD}norm3_box.", "decoder.temporal.frame_ffn.norm."),
    (f"{TAD}time_attention_weights.", "decoder.temporal.time_score."),
    (f"{TAD}time_attention.", "decoder.temporal.time_value."),
    (f"{TAD}norm1.", "decoder.temporal.norm."),
    (f"{TAD}linear1.", "decoder.temporal.ffn.linear1."),
    (f"{TAD}linear2.", "decoder.temporal.ffn.linear2."),
    (f"{TAD}norm3.", "decoder.temporal.ffn.norm."),
)
# Keys the official forward pass never reads: an unused seg conv, an unused linear of the TAD
# module and the criterion's no-object class weight (a loss buffer).
_OFFICIAL_UNUSED = re.compile(
    r"decode_head\.(?:conv_seg\..*|criterion\.empty_weight"
    r"|predictor\.deformabel_transformer_cross_attention_layers\.reference_points\..*)"
)


def official_table(temporal: bool) -> NameTable:
    """(official name after ``decode_head.``, our name) pairs of a single-frame or TAD model."""
    return OFFICIAL_COMMON + (OFFICIAL_TEMPORAL if temporal else OFFICIAL_SINGLE)


def is_official(state_dict: Mapping[str, Tensor]) -> bool:
    return any(key.startswith("decode_head.") for key in state_dict)


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Official THE-Mask state dict → our names; keys its forward never reads are dropped,
    unknown keys raise ``WeightsError``."""
    table = official_table(f"decode_head.{TAD}time_attention.weight" in state_dict)
    backbone: StateDict = {}
    out: StateDict = {}
    unknown = []
    dropped = 0
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            backbone[key[len("backbone.") :]] = value
        elif _OFFICIAL_UNUSED.fullmatch(key):
            dropped += 1
        elif key.startswith("decode_head.") and (new := rename(key[len("decode_head.") :], table)):
            out[new] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(
            f"official THE-Mask checkpoint: {len(unknown)} unknown keys:\n  " + "\n  ".join(unknown)
        )
    if not backbone:
        raise WeightsError("official THE-Mask checkpoint: no backbone.* keys")
    out.update({f"backbone.{k}": v for k, v in mit_original_to_ours(backbone).items()})
    logger.debug("official checkpoint: %d tensors converted, %d unused dropped", len(out), dropped)
    return out


def as_ours(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Our names for a state dict that is either ours or official."""
    return convert_official_state_dict(state_dict) if is_official(state_dict) else dict(state_dict)


def _architecture_of_state(ours: Mapping[str, Tensor]) -> dict:
    """The shape facts of a full state dict (our names) that network presets differ in."""

    def count(pattern: str) -> int:
        regex = re.compile(pattern)
        return len({m.group(1) for key in ours if (m := regex.match(key))})

    def shape(key: str) -> tuple[int, ...]:
        if key not in ours:
            raise WeightsError(f"no {key} in the state dict (not a full model?)")
        return tuple(ours[key].shape)

    return dict(
        widths=tuple(shape(f"backbone.stages.{s}.patch_embed.proj.weight")[0] for s in range(4)),
        depths=tuple(count(rf"backbone\.stages\.{s}\.blocks\.(\d+)\.") for s in range(4)),
        temporal=any(key.startswith("decoder.temporal.") for key in ours),
        num_queries=shape("decoder.query_feat.weight")[0],
        hidden_dim=shape("decoder.query_feat.weight")[1],
        decoder_layers=count(r"decoder\.layers\.(\d+)\."),
        pixel_decoder_layers=count(r"pixel_decoder\.encoder_layers\.(\d+)\."),
    )


def _architecture_of_config(config: ModelConfig) -> dict:
    variant = MIT_VARIANTS[config.backbone]
    return dict(
        widths=tuple(config.backbone_embed_dims or variant["embed_dims"]),
        depths=tuple(config.backbone_depths or variant["depths"]),
        temporal=config.decoder == "temporal",
        num_queries=config.num_queries,
        hidden_dim=config.hidden_dim,
        decoder_layers=config.decoder_layers,
        pixel_decoder_layers=config.pixel_decoder_layers,
    )


def infer_model_config(state_dict: Mapping[str, Tensor]) -> ModelConfig:
    """The preset network (with K classes) whose shape facts a full state dict (ours or
    official) has."""
    ours = as_ours(state_dict)
    found = _architecture_of_state(ours)
    num_classes = infer_num_classes(ours)
    for name in list_presets():
        config = preset_config(name, num_classes=num_classes)
        if _architecture_of_config(config) == found:
            return config
    raise WeightsError(f"no preset has this architecture {found}; pass one explicitly")


def infer_num_classes(state_dict: Mapping[str, Tensor]) -> int:
    """K of a full state dict (ours or official): the clip head's class outputs − no-object."""
    weight = as_ours(state_dict).get("decoder.clip_head.class_embed.weight")
    if weight is None:
        raise WeightsError("no decoder.clip_head.class_embed.weight in the state dict")
    return int(weight.shape[0]) - 1
