"""``train.init_from``: trained weights, of other classes or of stage 1 (docs/DESIGN.md §6)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from torch import Tensor, nn

from themask.io import PathLike
from themask.weights.files import WeightsError, check_state_dict, load_strict, read_state_dict
from themask.weights.official import as_ours

logger = logging.getLogger(__name__)

CLASS_LAYER_PATTERN = re.compile(r"^decoder\.\w+\.class_embed\.(weight|bias)$")
HEAD_INITS = ("official", "copy")
_TAD_ONLY = ("decoder.temporal.", "decoder.frame_head.")


def load_stage1_into_temporal(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, head_init: str = "official"
) -> None:
    """A TAD model from a fitting stage-1 state dict (ours or official); ``head_init="official"``:
    the temporal layers, head norms and frame head stay fresh; ``copy``: both heads = stage 1's."""
    if head_init not in HEAD_INITS:
        raise WeightsError(f"head_init: expected one of {HEAD_INITS}, got {head_init!r}")
    if not getattr(model, "is_temporal", False):
        raise WeightsError("load_stage1_into_temporal: no Temporal Aggregation Decoder")
    stage1 = as_ours(state_dict)
    temporal_keys = sorted(key for key in stage1 if key.startswith(_TAD_ONLY))
    if temporal_keys:
        raise WeightsError(
            "load_stage1_into_temporal: the checkpoint already has a temporal decoder "
            f"({temporal_keys[:3]} …); load it with load_model or a strict load instead"
        )
    target = model.state_dict()
    shared = {key: value for key, value in target.items() if not key.startswith(_TAD_ONLY)}
    check_state_dict(shared, stage1, what="stage-1 checkpoint → temporal model")
    new_state, head = dict(target), "decoder.clip_head."
    if head_init == "official":
        new_state.update({k: v for k, v in stage1.items() if not k.startswith(f"{head}norm.")})
        fresh = "decoder.temporal, clip_head.norm, frame_head (norm, class_embed, mask_embed)"
    else:
        new_state.update(stage1)
        heads = {k[len(head) :]: v for k, v in stage1.items() if k.startswith(head)}
        new_state.update({f"decoder.frame_head.{k}": v for k, v in heads.items()})
        fresh = "decoder.temporal"
    model.load_state_dict(new_state, strict=True)
    logger.info("stage-1 weights loaded (head_init=%s); freshly initialised: %s", head_init, fresh)


def init_from_weights(model: nn.Module, path: PathLike, *, head_init: str = "official") -> None:
    """Load ``path`` into ``model`` (stage 1 into a TAD model); other-K class layers start fresh."""
    state_dict, target = as_ours(read_state_dict(path)), model.state_dict()
    fresh = [
        key
        for key, value in sorted(state_dict.items())
        if CLASS_LAYER_PATTERN.match(key) and key in target and value.shape != target[key].shape
    ]
    state_dict.update({key: target[key] for key in fresh})
    if fresh:
        k, names = model.num_classes, ", ".join(fresh)
        logger.info("%s: class layers re-initialised for %d classes: %s", path, k, names)
    has_tad = any(key.startswith("decoder.temporal.") for key in state_dict)
    if getattr(model, "is_temporal", False) and not has_tad:
        load_stage1_into_temporal(model, state_dict, head_init=head_init)
    else:
        load_strict(model, state_dict, what=str(path))
