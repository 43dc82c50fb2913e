"""MiT ImageNet weights → our backbone names (one way): the original SegFormer layout, and
Hugging Face and mmseg 1.x through the original names (docs/WEIGHTS.md)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from themask.io import PathLike
from themask.weights.files import (
    NameTable,
    StateDict,
    WeightsError,
    load_strict,
    read_state_dict,
    rename,
)

logger = logging.getLogger(__name__)

# original name inside block ``block{s}.{j}`` → ours inside ``stages.{s-1}.blocks.{j}``
ORIGINAL_BLOCK_TO_OURS = {
    "norm1": "norm1",
    "attn.q": "attn.q",
    "attn.kv": "attn.kv",
    "attn.proj": "attn.proj",
    "attn.sr": "attn.sr",
    "attn.norm": "attn.sr_norm",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv",
    "mlp.fc2": "mlp.fc2",
}
# inside a block, Hugging Face → original; key and value are fused into kv afterwards
_HF_BLOCK_TO_ORIGINAL = {
    "layer_norm_1": "norm1",
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.key",
    "attention.self.value": "attn.value",
    "attention.self.sr": "attn.sr",
    "attention.self.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj",
    "layer_norm_2": "norm2",
    "mlp.dense1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.dense2": "mlp.fc2",
}
# inside a block, mmseg 1.x → original; in_proj is split into q and kv afterwards
_MMSEG_BLOCK_TO_ORIGINAL = {
    "norm1": "norm1",
    "attn.attn.out_proj": "attn.proj",
    "attn.sr": "attn.sr",
    "attn.norm": "attn.norm",
    "norm2": "norm2",
    "ffn.layers.0": "mlp.fc1",
    "ffn.layers.1": "mlp.dwconv.dwconv",
    "ffn.layers.4": "mlp.fc2",
}


def _expand(
    pairs: list[tuple[str, str]], block: tuple[str, str], names: Mapping[str, str]
) -> NameTable:
    """The (source, target) prefix pairs of stages 0–3 (``{s}``: the stage counted from 0,
    ``{S}``: from 1), with the ``block`` pair joined to each pair of ``names`` in a block."""
    pairs = pairs + [(f"{block[0]}{a}.", f"{block[1]}{b}.") for a, b in names.items()]
    return tuple(
        (source.format(s=s, S=s + 1, i="{i}"), target.format(s=s, S=s + 1, i="{i}"))
        for s in range(4)
        for source, target in pairs
    )


_TABLES = {
    "original": _expand(
        [("patch_embed{S}.", "stages.{s}.patch_embed."), ("norm{S}.", "stages.{s}.norm.")],
        ("block{S}.{i}.", "stages.{s}.blocks.{i}."),
        ORIGINAL_BLOCK_TO_OURS,
    ),
    "huggingface": _expand(
        [
            ("encoder.patch_embeddings.{s}.proj.", "patch_embed{S}.proj."),
            ("encoder.patch_embeddings.{s}.layer_norm.", "patch_embed{S}.norm."),
            ("encoder.layer_norm.{s}.", "norm{S}."),
        ],
        ("encoder.block.{s}.{i}.", "block{S}.{i}."),
        _HF_BLOCK_TO_ORIGINAL,
    ),
    "mmseg": _expand(
        [
            ("layers.{s}.0.projection.", "patch_embed{S}.proj."),
            ("layers.{s}.0.norm.", "patch_embed{S}.norm."),
            ("layers.{s}.2.", "norm{S}."),
            ("layers.{s}.1.{i}.attn.attn.in_proj_", "block{S}.{i}.attn.in_proj_"),
        ],
        ("layers.{s}.1.{i}.", "block{S}.{i}."),
        _MMSEG_BLOCK_TO_ORIGINAL,
    ),
}


def _renamed(state_dict: Mapping[str, Tensor], layout: str) -> StateDict:
    out: StateDict = {}
    for key, value in state_dict.items():
        new = rename(key, _TABLES[layout])
        if new is None:
            raise WeightsError(f"MiT weights ({layout} layout): unexpected key {key!r}")
        out[new] = value
    return out


def mit_original_to_ours(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Original SegFormer names → ours; the ImageNet classifier ``head.*`` is dropped."""
    return _renamed({k: v for k, v in state_dict.items() if not k.startswith("head.")}, "original")


def mit_hf_to_original(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Hugging Face ``SegformerModel`` names (``encoder.…``) → original; key and value fused."""
    out = _renamed(state_dict, "huggingface")
    for key in [k for k in out if ".attn.key." in k]:
        fused, value = key.replace(".key.", ".kv."), key.replace(".key.", ".value.")
        if value not in out:
            raise WeightsError(f"MiT weights (Hugging Face layout): {fused} lacks its value half")
        out[fused] = torch.cat((out.pop(key), out.pop(value)))  # rows [0, C) k, [C, 2C) v
    orphans = [k.replace(".value.", ".kv.") for k in out if ".attn.value." in k]
    if orphans:
        raise WeightsError(f"MiT weights (Hugging Face layout): {orphans[0]} lacks its key half")
    return out


def mit_mmseg_to_original(state_dict: Mapping[str, Tensor]) -> StateDict:
    """mmseg 1.x names (``layers.{s}.{0,1,2}``) → original: ``in_proj`` split into q and kv,
    1×1-conv FFN weights made linear."""
    out = _renamed(state_dict, "mmseg")
    for key in [k for k in out if ".attn.in_proj_" in k]:
        prefix, param = key.split(".in_proj_")
        qkv = out.pop(key)
        dim = qkv.shape[0] // 3  # rows [q; k; v]
        out[f"{prefix}.q.{param}"] = qkv[:dim]
        out[f"{prefix}.kv.{param}"] = qkv[dim:]
    for key in [k for k in out if k.endswith((".mlp.fc1.weight", ".mlp.fc2.weight"))]:
        out[key] = out[key].flatten(1)  # (out, in, 1, 1) → (out, in)
    return out


_SENTINELS = {
    "themask": "stages.0.patch_embed.proj.weight",
    "original": "patch_embed1.proj.weight",
    "huggingface": "encoder.patch_embeddings.0.proj.weight",
    "mmseg": "layers.0.0.projection.weight",
}
_TO_ORIGINAL = {"huggingface": mit_hf_to_original, "mmseg": mit_mmseg_to_original}


def detect_mit_layout(state_dict: Mapping[str, Tensor]) -> str:
    """The MiT layout of a backbone state dict, by a sentinel key."""
    for layout, sentinel in _SENTINELS.items():
        if sentinel in state_dict:
            return layout
    raise WeightsError(
        "not a recognised MiT state dict: none of the sentinel keys "
        f"{sorted(_SENTINELS.values())} is present (first keys: {sorted(state_dict)[:5]})"
    )


def _select_backbone_keys(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Keep the encoder part of a classification/segmentation checkpoint, drop the rest."""
    keys = list(state_dict)
    for prefix in ("backbone.", "segformer."):
        if any(key.startswith(prefix) for key in keys):
            renamed = {key: key[len(prefix) :] for key in keys if key.startswith(prefix)}
            break
    else:
        if any(key.startswith("encoder.") for key in keys):  # a bare Hugging Face SegformerModel
            renamed = {key: key for key in keys if key.startswith("encoder.")}
        else:
            renamed = {key: key for key in keys if not key.startswith(("head.", "classifier."))}
    dropped = [key for key in keys if key not in renamed]
    if dropped:
        logger.info(
            "MiT weights: ignoring %d non-backbone keys, e.g. %s", len(dropped), dropped[:3]
        )
    return {new: state_dict[old] for old, new in renamed.items()}


def convert_mit_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Any supported MiT layout → our backbone names; non-backbone keys are dropped."""
    state_dict = _select_backbone_keys(state_dict)
    layout = detect_mit_layout(state_dict)
    if layout == "themask":
        return state_dict
    if layout in _TO_ORIGINAL:
        state_dict = _TO_ORIGINAL[layout](state_dict)
    return mit_original_to_ours(state_dict)


def load_backbone_state_dict(
    backbone: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "state dict"
) -> str:
    """Load MiT weights (any supported layout) into ``backbone`` strictly; returns the layout."""
    selected = _select_backbone_keys(state_dict)  # (selecting again is a no-op)
    layout = detect_mit_layout(selected)
    converted = convert_mit_state_dict(selected)
    load_strict(backbone, converted, what=f"MiT weights {source} ({layout} layout)")
    logger.info(
        "loaded MiT weights from %s (%s layout, %d tensors)", source, layout, len(converted)
    )
    return layout


def load_backbone_weights(backbone: nn.Module, path: PathLike) -> None:
    """Load MiT weights (a file or Hugging Face directory, any layout) into ``backbone``."""
    load_backbone_state_dict(backbone, read_state_dict(path), source=str(path))
