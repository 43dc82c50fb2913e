"""MiT ImageNet weights → our backbone names (one way): the original SegFormer layout, and
Hugging Face and mmseg 1.x through the original names (docs/WEIGHTS.md)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from themask.io import PathLike
from themask.weights.files import StateDict, WeightsError, load_strict, read_state_dict

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
_RE_ORIGINAL = re.compile(
    r"(?:patch_embed(\d+)\.(proj|norm)|block(\d+)\.(\d+)\.(.+)|norm(\d+))\.(weight|bias)"
)


def _unknown(key: str, layout: str) -> WeightsError:
    return WeightsError(f"MiT weights ({layout} layout): unexpected key {key!r}")


def mit_original_to_ours(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Original SegFormer names → ours; the ImageNet classifier ``head.*`` is dropped."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith("head."):
            continue
        match = _RE_ORIGINAL.fullmatch(key)
        if match is None:
            raise _unknown(key, "original")
        patch_stage, patch_part, block_stage, block, inner, norm_stage, param = match.groups()
        if patch_stage is not None:
            new = f"stages.{int(patch_stage) - 1}.patch_embed.{patch_part}"
        elif norm_stage is not None:
            new = f"stages.{int(norm_stage) - 1}.norm"
        elif inner in ORIGINAL_BLOCK_TO_OURS:
            new = f"stages.{int(block_stage) - 1}.blocks.{block}.{ORIGINAL_BLOCK_TO_OURS[inner]}"
        else:
            raise _unknown(key, "original")
        out[f"{new}.{param}"] = value
    return out


_HF_BLOCK_TO_ORIGINAL = {
    "layer_norm_1": "norm1",
    "attention.self.query": "attn.q",
    "attention.self.sr": "attn.sr",
    "attention.self.layer_norm": "attn.norm",
    "attention.output.dense": "attn.proj",
    "layer_norm_2": "norm2",
    "mlp.dense1": "mlp.fc1",
    "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.dense2": "mlp.fc2",
}
_RE_HF = re.compile(
    r"encoder\.(?:patch_embeddings\.(\d+)\.(proj|layer_norm)|block\.(\d+)\.(\d+)\.(.+)"
    r"|layer_norm\.(\d+))\.(weight|bias)"
)


def mit_hf_to_original(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Hugging Face ``SegformerModel`` names (``encoder.…``, no ``segformer.`` prefix) →
    original; key and value are fused into kv."""
    out: StateDict = {}
    pending: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        match = _RE_HF.fullmatch(key)
        if match is None:
            raise _unknown(key, "Hugging Face")
        patch_stage, patch_part, block_stage, block, inner, norm_stage, param = match.groups()
        if patch_stage is not None:
            part = "proj" if patch_part == "proj" else "norm"
            out[f"patch_embed{int(patch_stage) + 1}.{part}.{param}"] = value
        elif norm_stage is not None:
            out[f"norm{int(norm_stage) + 1}.{param}"] = value
        else:
            prefix = f"block{int(block_stage) + 1}.{block}"
            if inner in ("attention.self.key", "attention.self.value"):
                pending.setdefault(f"{prefix}.attn.kv.{param}", {})[inner.rsplit(".", 1)[1]] = value
            elif inner in _HF_BLOCK_TO_ORIGINAL:
                out[f"{prefix}.{_HF_BLOCK_TO_ORIGINAL[inner]}.{param}"] = value
            else:
                raise _unknown(key, "Hugging Face")
    for key, parts in pending.items():
        if set(parts) != {"key", "value"}:
            missing = "value" if "key" in parts else "key"
            raise WeightsError(f"MiT weights (Hugging Face layout): {key} lacks its {missing} half")
        out[key] = torch.cat((parts["key"], parts["value"]), dim=0)  # rows [0,C)=k, [C,2C)=v
    return out


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
_RE_MMSEG = re.compile(r"layers\.(\d+)\.(?:0\.(projection|norm)|1\.(\d+)\.(.+)|2)\.(weight|bias)")
_RE_MMSEG_IN_PROJ = re.compile(r"layers\.(\d+)\.1\.(\d+)\.attn\.attn\.in_proj_(weight|bias)")


def mit_mmseg_to_original(state_dict: Mapping[str, Tensor]) -> StateDict:
    """mmseg 1.x names (``layers.{s}.{0,1,2}``) → original: ``in_proj`` split into q and kv,
    1×1-conv FFN weights made linear."""
    out: StateDict = {}
    for key, value in state_dict.items():
        in_proj = _RE_MMSEG_IN_PROJ.fullmatch(key)
        if in_proj is not None:
            stage, block, param = in_proj.groups()
            prefix = f"block{int(stage) + 1}.{block}.attn"
            dim = value.shape[0] // 3  # rows [q; k; v]
            out[f"{prefix}.q.{param}"] = value[:dim]
            out[f"{prefix}.kv.{param}"] = value[dim:]
            continue
        match = _RE_MMSEG.fullmatch(key)
        if match is None:
            raise _unknown(key, "mmseg 1.x")
        stage, patch_part, block, inner, param = match.groups()
        s = int(stage) + 1
        if patch_part is not None:
            part = "proj" if patch_part == "projection" else "norm"
            out[f"patch_embed{s}.{part}.{param}"] = value
        elif block is None:
            out[f"norm{s}.{param}"] = value
        elif inner in _MMSEG_BLOCK_TO_ORIGINAL:
            name = _MMSEG_BLOCK_TO_ORIGINAL[inner]
            if name in ("mlp.fc1", "mlp.fc2") and param == "weight":
                value = value.flatten(1)  # (out, in, 1, 1) → (out, in)
            out[f"block{s}.{block}.{name}.{param}"] = value
        else:
            raise _unknown(key, "mmseg 1.x")
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
    layout = detect_mit_layout(_select_backbone_keys(state_dict))
    converted = convert_mit_state_dict(state_dict)
    load_strict(backbone, converted, what=f"MiT weights {source} ({layout} layout)")
    logger.info(
        "loaded MiT weights from %s (%s layout, %d tensors)", source, layout, len(converted)
    )
    return layout


def load_backbone_weights(backbone: nn.Module, path: PathLike) -> None:
    """Load MiT weights (a file or Hugging Face directory, any layout) into ``backbone``."""
    load_backbone_state_dict(backbone, read_state_dict(path), source=str(path))
