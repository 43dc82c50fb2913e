"""Official THE-Mask checkpoints (``names.yaml``, docs/DESIGN.md §9) → ours; a state dict's net."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from torch import Tensor

from themask.modeling.build import list_presets, preset_config
from themask.modeling.config import ModelConfig
from themask.modeling.mit import MIT_VARIANTS
from themask.weights.files import NAME_TABLES, NameTable, StateDict, WeightsError, rename
from themask.weights.mit import mit_original_to_ours

logger = logging.getLogger(__name__)

TAD = "predictor.deformabel_transformer_cross_attention_layers."  # (sic)
_CONFIG_FACTS = ("num_queries", "hidden_dim", "decoder_layers", "pixel_decoder_layers")
_OFFICIAL_UNUSED = re.compile(r"decode_head\.(?:" + "|".join(NAME_TABLES["official_unused"]) + ")")


def official_table(temporal: bool) -> NameTable:
    """(official name after ``decode_head.``, our name) pairs of a single-frame or TAD model."""
    own = NAME_TABLES["official_temporal" if temporal else "official_single"]
    return (*NAME_TABLES["official_common"].items(), *own.items())


def is_official(state_dict: Mapping[str, Tensor]) -> bool:
    return any(key.startswith("decode_head.") for key in state_dict)


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Official THE-Mask state dict → ours; unread keys dropped, unknown ones a ``WeightsError``."""
    table = official_table(f"decode_head.{TAD}time_attention.weight" in state_dict)
    backbone, out, unknown, dropped = {}, {}, [], 0
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
        listed = "".join(f"\n  {key}" for key in unknown)
        raise WeightsError(f"official THE-Mask checkpoint: {len(unknown)} unknown keys:{listed}")
    if not backbone:
        raise WeightsError("official THE-Mask checkpoint: no backbone.* keys")
    out.update({f"backbone.{k}": v for k, v in mit_original_to_ours(backbone).items()})
    logger.debug("official checkpoint: %d tensors converted, %d unused dropped", len(out), dropped)
    return out


def as_ours(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Our names for a state dict that is either ours or official."""
    return convert_official_state_dict(state_dict) if is_official(state_dict) else dict(state_dict)


def infer_model_config(state_dict: Mapping[str, Tensor]) -> ModelConfig:
    """The preset network (with K classes) of a full state dict, ours or official."""
    ours = as_ours(state_dict)

    def count(pattern: str) -> int:
        return len({m.group(1) for key in ours if (m := re.match(pattern, key))})

    def shape(key: str) -> tuple[int, ...]:
        if key not in ours:
            raise WeightsError(f"no {key} in the state dict (not a full model?)")
        return tuple(ours[key].shape)

    found = dict(  # the shape facts that network presets differ in
        widths=tuple(shape(f"backbone.stages.{s}.patch_embed.proj.weight")[0] for s in range(4)),
        depths=tuple(count(rf"backbone\.stages\.{s}\.blocks\.(\d+)\.") for s in range(4)),
        temporal=any(key.startswith("decoder.temporal.") for key in ours),
        num_queries=shape("decoder.query_feat.weight")[0],
        hidden_dim=shape("decoder.query_feat.weight")[1],
        decoder_layers=count(r"decoder\.layers\.(\d+)\."),
        pixel_decoder_layers=count(r"pixel_decoder\.encoder_layers\.(\d+)\."),
    )
    num_classes = infer_num_classes(ours)
    for name in list_presets():
        config = preset_config(name, num_classes=num_classes)
        variant = MIT_VARIANTS[config.backbone]
        facts = dict(  # the same facts of the preset's network
            widths=tuple(config.backbone_embed_dims or variant["embed_dims"]),
            depths=tuple(config.backbone_depths or variant["depths"]),
            temporal=config.decoder == "temporal",
            **{field: getattr(config, field) for field in _CONFIG_FACTS},
        )
        if facts == found:
            return config
    raise WeightsError(f"no preset has this architecture {found}; pass one explicitly")


def infer_num_classes(state_dict: Mapping[str, Tensor]) -> int:
    """K of a full state dict (ours or official): the clip head's class outputs − no-object."""
    weight = as_ours(state_dict).get("decoder.clip_head.class_embed.weight")
    if weight is None:
        raise WeightsError("no decoder.clip_head.class_embed.weight in the state dict")
    return int(weight.shape[0]) - 1
