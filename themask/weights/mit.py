"""MiT ImageNet weights (original, Hugging Face, mmseg 1.x layouts) → ours (docs/WEIGHTS.md)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from themask.io import PathLike
from themask.weights.files import NAME_TABLES, WeightsError, load_strict, read_state_dict, rename

logger = logging.getLogger(__name__)


def _expand(table: dict) -> tuple[tuple[str, str], ...]:
    """The (source, target) prefix pairs of stages 0–3 of a MiT layout in ``names.yaml``."""
    source, target = table["block"]
    block = [(f"{source}{a}.", f"{target}{b}.") for a, b in table["in_block"].items()]
    return tuple(
        (old.format(s=s, S=s + 1, i="{i}"), new.format(s=s, S=s + 1, i="{i}"))
        for s in range(4)
        for old, new in [*table["stages"].items(), *block]
    )


_TABLES = {layout: _expand(table) for layout, table in NAME_TABLES["mit"].items()}


def _renamed(state_dict: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new = rename(key, _TABLES[layout])
        if new is None:
            raise WeightsError(f"MiT weights ({layout} layout): unexpected key {key!r}")
        out[new] = value
    return out


def mit_original_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Original SegFormer names → ours; the ImageNet classifier ``head.*`` is dropped."""
    return _renamed({k: v for k, v in state_dict.items() if not k.startswith("head.")}, "original")


def mit_hf_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
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


def mit_mmseg_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """mmseg 1.x names → original: ``in_proj`` split into q and kv, 1×1-conv FFN made linear."""
    out = _renamed(state_dict, "mmseg")
    for key in [k for k in out if ".attn.in_proj_" in k]:
        (prefix, param), qkv = key.split(".in_proj_"), out.pop(key)
        dim = qkv.shape[0] // 3  # rows [q; k; v]
        out[f"{prefix}.q.{param}"], out[f"{prefix}.kv.{param}"] = qkv[:dim], qkv[dim:]
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


def mit_to_ours(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """(our names, layout) of the MiT encoder of a supported state dict; other keys dropped."""
    keys = list(state_dict)
    found = [p for p in ("backbone.", "segformer.") if any(k.startswith(p) for k in keys)]
    if found:
        selected = {k[len(found[0]) :]: state_dict[k] for k in keys if k.startswith(found[0])}
    elif any(key.startswith("encoder.") for key in keys):  # a bare Hugging Face SegformerModel
        selected = {k: state_dict[k] for k in keys if k.startswith("encoder.")}
    else:
        selected = {k: state_dict[k] for k in keys if not k.startswith(("head.", "classifier."))}
    if len(selected) < len(keys):
        logger.info("MiT weights: ignoring %d non-backbone keys", len(keys) - len(selected))
    layout = detect_mit_layout(selected)
    if layout in _TO_ORIGINAL:
        selected = _TO_ORIGINAL[layout](selected)
    return (selected if layout == "themask" else mit_original_to_ours(selected)), layout


def load_backbone_weights(
    backbone: nn.Module, weights: PathLike | Mapping[str, Tensor], *, source: str = "state dict"
) -> str:
    """Load MiT weights (file, Hugging Face directory or state dict) strictly; → the layout."""
    if not isinstance(weights, Mapping):
        weights, source = read_state_dict(weights), str(weights)
    converted, layout = mit_to_ours(weights)
    load_strict(backbone, converted, what=f"MiT weights {source} ({layout} layout)")
    message = "loaded MiT weights from %s (%s layout, %d tensors)"
    logger.info(message, source, layout, len(converted))
    return layout
