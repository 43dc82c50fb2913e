"""Test oracles: our names → the public layouts, the inverse of ``themask.weights`` (which
converts one way only). Built from the library's own tables, inverted."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from themask.weights.files import NAME_TABLES, StateDict
from themask.weights.mit import mit_to_ours
from themask.weights.official import official_table, rename

ORIGINAL_BLOCK_TO_OURS = NAME_TABLES["mit"]["original"]["in_block"]
_OURS_BLOCK_TO_ORIGINAL = {ours: original for original, ours in ORIGINAL_BLOCK_TO_OURS.items()}
_RE_OURS = re.compile(
    r"stages\.(\d+)\.(?:(patch_embed\.(?:proj|norm))|blocks\.(\d+)\.(.+)|(norm))\.(weight|bias)"
)


def convert_mit_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Any supported MiT layout → our backbone names (the library's conversion, layout dropped)."""
    return mit_to_ours(state_dict)[0]


def mit_ours_to_original(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Our backbone names → the original SegFormer names (``patch_embed1.proj.weight`` …)."""
    out: StateDict = {}
    for key, value in state_dict.items():
        match = _RE_OURS.fullmatch(key)
        assert match is not None, key
        stage, patch, block, inner, final_norm, param = match.groups()
        s = int(stage) + 1
        if patch is not None:
            new = f"patch_embed{s}.{patch.split('.')[1]}"
        elif final_norm is not None:
            new = f"norm{s}"
        else:
            new = f"block{s}.{block}.{_OURS_BLOCK_TO_ORIGINAL[inner]}"
        out[f"{new}.{param}"] = value
    return out


def to_official_state_dict(model_state: Mapping[str, Tensor]) -> StateDict:
    """Our ``THEMask`` state dict → official THE-Mask names (the converter's table inverted)."""
    temporal = any(key.startswith("decoder.temporal.") for key in model_state)
    table = tuple((ours, official) for official, ours in official_table(temporal))
    backbone = {
        k[len("backbone.") :]: v for k, v in model_state.items() if k.startswith("backbone.")
    }
    out: StateDict = {}
    for key, value in model_state.items():
        if not key.startswith("backbone."):
            new = rename(key, table)
            assert new is not None, f"{key} has no official name"
            out[f"decode_head.{new}"] = value
    out.update({f"backbone.{k}": v for k, v in mit_ours_to_original(backbone).items()})
    return out
