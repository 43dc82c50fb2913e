"""Weight files: reading, layout conversion and strict loading.

Pure conversion functions (state dict in → state dict out) plus thin loaders:

- MiT ImageNet weights in three public layouts (``reference/weights.md``): the original SegFormer
  release (``patch_embed1.proj.weight`` …), Hugging Face ``nvidia/mit-b*`` (``segformer.encoder.``
  …) and mmseg 1.x (``layers.0.0.projection.weight`` …) → :func:`load_backbone_weights`.
- Checkpoints trained with the official THE-Mask code (mmseg 0.x names) ↔ ours:
  :func:`convert_official_state_dict`, :func:`to_official_state_dict`, :func:`infer_preset`.
- Stage 1 → stage 2 initialisation: :func:`load_stage1_into_temporal`.
- Our own format (safetensors + model config JSON): :func:`save_model`, :func:`load_model`.

Every load is strict: missing, unexpected or mis-shaped keys raise ``WeightsError`` (a
``ValueError``) naming them, as does a file that cannot be read as weights.
Nothing here unpickles arbitrary objects (``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from themask.io import PathLike, atomic_write
from themask.modeling.build import build_model, build_model_from_config, list_presets, preset_config
from themask.modeling.config import ModelConfig
from themask.modeling.mit import MIT_VARIANTS
from themask.modeling.themask import THEMask

logger = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A weights file is unreadable, of an unknown layout, or does not fit the model."""


StateDict = dict[str, Tensor]

_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("state_dict", "model")


# --------------------------------------------------------------------------- reading files


def read_state_dict(path: PathLike) -> StateDict:
    """Read a weights file or a Hugging Face model directory into a flat ``{name: tensor}``.

    ``.safetensors`` through safetensors; ``.pth/.pt/.bin`` through
    ``torch.load(map_location="cpu", weights_only=True)``; a directory must hold
    ``model.safetensors`` or ``pytorch_model.bin``. ``state_dict``/``model`` wrappers and a
    ``module.`` prefix (DDP) are removed.
    """
    source = Path(path)
    if source.is_dir():
        for name in _HF_FILES:
            if (source / name).is_file():
                source = source / name
                break
        else:
            raise FileNotFoundError(f"{path}: directory holds none of {list(_HF_FILES)}")
    if not source.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if source.suffix == ".safetensors":
        try:
            loaded: object = load_file(str(source), device="cpu")
        except Exception as error:  # safetensors raises its own error types
            raise WeightsError(
                f"{path}: not a readable .safetensors file ({_first_line(error)})"
            ) from error
    elif source.suffix in _TORCH_SUFFIXES:
        try:
            loaded = torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            if found is None:
                raise WeightsError(
                    f"{path}: not a readable PyTorch weights file ({_first_line(error)})"
                ) from error
            raise WeightsError(
                f"{path}: holds {found.group(1)}, which a safe (weights-only) load refuses. If "
                "you trust the file, re-save just its state dict: "
                "torch.save(torch.load(SRC, weights_only=False)['state_dict'], DST)"
            ) from None
        except Exception as error:  # not a zip/pickle file: torch raises many kinds
            raise WeightsError(
                f"{path}: not a readable PyTorch weights file ({_first_line(error)})"
            ) from error
    else:
        raise WeightsError(
            f"{path}: unknown weights format {source.suffix!r}; expected .safetensors, "
            f"{', '.join(_TORCH_SUFFIXES)} or a Hugging Face directory"
        )
    return unwrap_state_dict(loaded, source=str(path))


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def unwrap_state_dict(obj: object, *, source: str = "state dict") -> StateDict:
    """Remove ``state_dict``/``model`` wrappers and a ``module.`` prefix; keep tensors only."""
    while isinstance(obj, Mapping):
        wrapper = next((key for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: expected a mapping of tensors, got {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise WeightsError(f"{source}: holds no tensors (keys: {sorted(obj)[:10]})")
    skipped = len(obj) - len(tensors)
    if skipped:
        logger.debug("%s: ignored %d non-tensor entries", source, skipped)
    if all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module.") :]: value for key, value in tensors.items()}
    return tensors


# --------------------------------------------------------------------------- strict loading


def check_state_dict(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor], *, what: str
) -> None:
    """Raise ``ValueError`` listing missing, unexpected and mis-shaped keys (``what`` names it)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mis_shaped = sorted(
        f"{key}: expected {tuple(expected[key].shape)}, got {tuple(given[key].shape)}"
        for key in set(expected) & set(given)
        if expected[key].shape != given[key].shape
    )
    problems = []
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mis-shaped keys", mis_shaped),
    ):
        if items:
            problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
    if problems:
        raise WeightsError(f"{what}: weights do not fit the model.\n" + "\n".join(problems))


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], *, what: str) -> None:
    """``module.load_state_dict(strict=True)`` after a readable key/shape check."""
    check_state_dict(module.state_dict(), state_dict, what=what)
    module.load_state_dict(dict(state_dict), strict=True)


# --------------------------------------------------------------------------- MiT layouts

# Our MiT names (themask.modeling.mit) ↔ the original release, per stage s (0-based) and block j.
_OURS_BLOCK_TO_ORIGINAL = {
    "norm1": "norm1",
    "attn.q": "attn.q",
    "attn.kv": "attn.kv",
    "attn.proj": "attn.proj",
    "attn.sr": "attn.sr",
    "attn.sr_norm": "attn.norm",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.dwconv": "mlp.dwconv.dwconv",
    "mlp.fc2": "mlp.fc2",
}
_ORIGINAL_BLOCK_TO_OURS = {v: k for k, v in _OURS_BLOCK_TO_ORIGINAL.items()}

_RE_OURS = re.compile(
    r"stages\.(\d+)\.(?:(patch_embed\.(?:proj|norm))|blocks\.(\d+)\.(.+)|(norm))\.(weight|bias)"
)
_RE_ORIGINAL = re.compile(
    r"(?:patch_embed(\d+)\.(proj|norm)|block(\d+)\.(\d+)\.(.+)|norm(\d+))\.(weight|bias)"
)


def _unknown(key: str, layout: str) -> WeightsError:
    return ValueError(f"MiT weights ({layout} layout): unexpected key {key!r}")


def mit_ours_to_original(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Our backbone names → the original SegFormer names (``patch_embed1.proj.weight`` …)."""
    out: StateDict = {}
    for key, value in state_dict.items():
        match = _RE_OURS.fullmatch(key)
        if match is None:
            raise _unknown(key, "themask")
        stage, patch, block, inner, final_norm, param = match.groups()
        s = int(stage) + 1
        if patch is not None:
            new = f"patch_embed{s}.{patch.split('.')[1]}"
        elif final_norm is not None:
            new = f"norm{s}"
        elif inner in _OURS_BLOCK_TO_ORIGINAL:
            new = f"block{s}.{block}.{_OURS_BLOCK_TO_ORIGINAL[inner]}"
        else:
            raise _unknown(key, "themask")
        out[f"{new}.{param}"] = value
    return out


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
        elif inner in _ORIGINAL_BLOCK_TO_OURS:
            new = f"stages.{int(block_stage) - 1}.blocks.{block}.{_ORIGINAL_BLOCK_TO_OURS[inner]}"
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
    """Hugging Face ``SegformerModel`` names (``encoder.…``) → original; key/value are fused.

    Expects the ``segformer.`` prefix already removed and ``classifier.*`` dropped.
    """
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
    """mmseg 1.x names (``layers.{s}.{0,1,2}``) → original; splits ``in_proj`` into q and kv and
    turns the 1×1-conv FFN weights back into linear weights."""
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


def detect_mit_layout(state_dict: Mapping[str, Tensor]) -> str:
    """Identify the MiT layout by a sentinel key (after ``backbone.``/``segformer.`` removal)."""
    sentinels = {
        "themask": "stages.0.patch_embed.proj.weight",
        "original": "patch_embed1.proj.weight",
        "huggingface": "encoder.patch_embeddings.0.proj.weight",
        "mmseg": "layers.0.0.projection.weight",
    }
    for layout, sentinel in sentinels.items():
        if sentinel in state_dict:
            return layout
    raise WeightsError(
        "not a recognised MiT state dict: none of the sentinel keys "
        f"{sorted(sentinels.values())} is present (first keys: {sorted(state_dict)[:5]})"
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
    """Any supported MiT layout → our backbone names (``stages.{s}.…``).

    Prefixes ``backbone.`` (mmseg 0.x) and ``segformer.`` (HF) are removed; ImageNet heads
    (``head.*``, ``classifier.*``) and other non-backbone parts of a checkpoint are dropped.
    """
    state_dict = _select_backbone_keys(state_dict)
    layout = detect_mit_layout(state_dict)
    if layout == "themask":
        return dict(state_dict)
    if layout == "huggingface":
        state_dict = mit_hf_to_original(state_dict)
    elif layout == "mmseg":
        state_dict = mit_mmseg_to_original(state_dict)
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
    """Load MiT weights from ``path`` (file or Hugging Face directory, any supported layout)
    into ``backbone``, strictly."""
    load_backbone_state_dict(backbone, read_state_dict(path), source=str(path))


# --------------------------------------------------------------------------- official THE-Mask

# (official name after ``decode_head.``, our name); ``{i}`` stands for a layer index. Prefixes
# end with a dot or are full parameter names, so no entry is a prefix of another's match.
_OFFICIAL_COMMON = (
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
    (
        "predictor.transformer_cross_attention_layers.{i}.multihead_attn.",
        "decoder.layers.{i}.cross_attn.attn.",
    ),
    (
        "predictor.transformer_cross_attention_layers.{i}.norm.",
        "decoder.layers.{i}.cross_attn.norm.",
    ),
    (
        "predictor.transformer_self_attention_layers.{i}.self_attn.",
        "decoder.layers.{i}.self_attn.attn.",
    ),
    ("predictor.transformer_self_attention_layers.{i}.norm.", "decoder.layers.{i}.self_attn.norm."),
    ("predictor.transformer_ffn_layers.{i}.", "decoder.layers.{i}.ffn."),
    ("predictor.class_embed.", "decoder.clip_head.class_embed."),
    ("predictor.mask_embed.", "decoder.clip_head.mask_embed."),
)
_OFFICIAL_SINGLE = (("predictor.decoder_norm.", "decoder.clip_head.norm."),)
_TAD = "predictor.deformabel_transformer_cross_attention_layers."  # (sic)
_OFFICIAL_TEMPORAL = (
    ("predictor.decoder_norm1.", "decoder.clip_head.norm."),
    ("predictor.decoder_norm2.", "decoder.frame_head.norm."),
    ("predictor.class_embed_aux.", "decoder.frame_head.class_embed."),
    ("predictor.mask_embed_aux.", "decoder.frame_head.mask_embed."),
    (f"{_TAD}self_attn.", "decoder.temporal.clip_self_attn.attn."),
    (f"{_TAD}norm2.", "decoder.temporal.clip_self_attn.norm."),
    (f"{_TAD}self_attn_box.", "decoder.temporal.frame_self_attn.attn."),
    (f"{_TAD}norm2_box.", "decoder.temporal.frame_self_attn.norm."),
    (f"{_TAD}cross_attn.", "decoder.temporal.frame_cross_attn.attn."),
    (f"{_TAD}norm1_box.", "decoder.temporal.frame_cross_attn.norm."),
    (f"{_TAD}linear1_box.", "decoder.temporal.frame_ffn.linear1."),
    (f"{_TAD}linear2_box.", "decoder.temporal.frame_ffn.linear2."),
    (f"{_TAD}norm3_box.", "decoder.temporal.frame_ffn.norm."),
    (f"{_TAD}time_attention_weights.", "decoder.temporal.time_score."),
    (f"{_TAD}time_attention.", "decoder.temporal.time_value."),
    (f"{_TAD}norm1.", "decoder.temporal.norm."),
    (f"{_TAD}linear1.", "decoder.temporal.ffn.linear1."),
    (f"{_TAD}linear2.", "decoder.temporal.ffn.linear2."),
    (f"{_TAD}norm3.", "decoder.temporal.ffn.norm."),
)
# Keys the official forward pass never reads: an unused seg conv, an unused linear of the TAD
# module and the criterion's no-object class weight (a loss buffer).
_OFFICIAL_UNUSED = re.compile(
    r"decode_head\.(?:conv_seg\..*|criterion\.empty_weight"
    r"|predictor\.deformabel_transformer_cross_attention_layers\.reference_points\..*)"
)


def _prefix_pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace(re.escape("{i}"), r"(\d+)"))


def _rename(key: str, table: tuple, *, reverse: bool) -> str | None:
    """Rename ``key`` by the first matching (official, ours) prefix pair; None if none match."""
    for official, ours in table:
        source, target = (ours, official) if reverse else (official, ours)
        match = _prefix_pattern(source).match(key)
        if match is not None:
            new = target.replace("{i}", match.group(1)) if match.groups() else target
            return new + key[match.end() :]
    return None


def _is_official(state_dict: Mapping[str, Tensor]) -> bool:
    return any(key.startswith("decode_head.") for key in state_dict)


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Official THE-Mask (mmseg) state dict → our ``THEMask`` names.

    ``backbone.*`` (original MiT names) → ``backbone.stages.…``; ``decode_head.pixel_decoder``
    → ``pixel_decoder``; ``decode_head.predictor`` → ``decoder``. Keys the official forward
    never reads (``decode_head.conv_seg.*``, the TAD module's ``reference_points.*``,
    ``decode_head.criterion.empty_weight``) are dropped. Unknown keys raise ``ValueError``.
    """
    temporal = f"decode_head.{_TAD}time_attention.weight" in state_dict
    table = _OFFICIAL_COMMON + (_OFFICIAL_TEMPORAL if temporal else _OFFICIAL_SINGLE)
    backbone: StateDict = {}
    out: StateDict = {}
    unknown = []
    dropped = 0
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            backbone[key[len("backbone.") :]] = value
        elif _OFFICIAL_UNUSED.fullmatch(key):
            dropped += 1
        elif key.startswith("decode_head.") and (
            new := _rename(key[len("decode_head.") :], table, reverse=False)
        ):
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


def to_official_state_dict(model_state: Mapping[str, Tensor]) -> StateDict:
    """Our ``THEMask`` state dict → official THE-Mask names (inverse of
    :func:`convert_official_state_dict`; the keys it drops are not produced)."""
    temporal = any(key.startswith("decoder.temporal.") for key in model_state)
    table = _OFFICIAL_COMMON + (_OFFICIAL_TEMPORAL if temporal else _OFFICIAL_SINGLE)
    backbone: StateDict = {}
    out: StateDict = {}
    unknown = []
    for key, value in model_state.items():
        if key.startswith("backbone."):
            backbone[key[len("backbone.") :]] = value
        elif new := _rename(key, table, reverse=True):
            out[f"decode_head.{new}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(
            f"to_official_state_dict: {len(unknown)} keys without an official name:\n  "
            + "\n  ".join(unknown)
        )
    out.update({f"backbone.{k}": v for k, v in mit_ours_to_original(backbone).items()})
    return out


def _as_ours(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Our names for a state dict that is either ours or official."""
    return convert_official_state_dict(state_dict) if _is_official(state_dict) else dict(state_dict)


def _architecture_of_state(ours: Mapping[str, Tensor]) -> dict:
    """The shape facts of a full-model state dict (our names) that presets differ in."""

    def count(pattern: str) -> int:
        regex = re.compile(pattern)
        return len({m.group(1) for key in ours if (m := regex.match(key))})

    widths = []
    for stage in range(4):
        weight = ours.get(f"backbone.stages.{stage}.patch_embed.proj.weight")
        if weight is None:
            raise WeightsError(f"infer_preset: no backbone stage {stage} in the state dict")
        widths.append(int(weight.shape[0]))
    queries = ours.get("decoder.query_feat.weight")
    if queries is None:
        raise WeightsError("infer_preset: no decoder.query_feat.weight (not a full model?)")
    return dict(
        widths=tuple(widths),
        depths=tuple(count(rf"backbone\.stages\.{s}\.blocks\.(\d+)\.") for s in range(4)),
        temporal=any(key.startswith("decoder.temporal.") for key in ours),
        num_queries=int(queries.shape[0]),
        hidden_dim=int(queries.shape[1]),
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


def infer_preset(state_dict: Mapping[str, Tensor]) -> str:
    """The preset a full-model state dict (ours or official) was built from, found by
    comparing backbone widths and block counts, decoder kind, queries, hidden width and layer
    counts with every preset (e.g. ``themask_mit_b1_t1`` / ``themask_mit_b1_t2``).

    A ``mask2former_*`` checkpoint has the same network as the ``themask_*_t1`` preset and is
    reported as the latter (the presets differ only in the training objective).
    """
    found = _architecture_of_state(_as_ours(state_dict))
    matches = [
        name for name in list_presets() if _architecture_of_config(preset_config(name)) == found
    ]
    if not matches:
        raise WeightsError(
            f"infer_preset: no preset has this architecture {found}; pass one explicitly"
        )
    return min(matches, key=lambda name: (not name.startswith("themask_"), name))


def infer_num_classes(state_dict: Mapping[str, Tensor]) -> int:
    """K from the clip head's class layer (K + 1 outputs, the last one is "no object")."""
    ours = _as_ours(state_dict)
    weight = ours.get("decoder.clip_head.class_embed.weight")
    if weight is None:
        raise WeightsError("infer_num_classes: no decoder.clip_head.class_embed.weight")
    return int(weight.shape[0]) - 1


# --------------------------------------------------------------------------- fine-tuning

CLASS_LAYER_PATTERN = re.compile(r"^decoder\.\w+\.class_embed\.(weight|bias)$")


def replace_class_layers(
    state_dict: Mapping[str, Tensor], model: nn.Module
) -> tuple[StateDict, list[str]]:
    """Our-layout ``state_dict`` with every class-prediction tensor (``decoder.*.class_embed``)
    whose shape differs from ``model``'s replaced by the model's own (fresh) tensor, so
    weights trained for another class count K load into ``model``. Returns the new state
    dict and the names of the replaced tensors."""
    target = model.state_dict()
    ours = dict(_as_ours(state_dict))
    replaced = sorted(
        key
        for key, value in ours.items()
        if CLASS_LAYER_PATTERN.match(key) and key in target and value.shape != target[key].shape
    )
    ours.update({key: target[key] for key in replaced})
    return ours, replaced


# --------------------------------------------------------------------------- stage 1 → stage 2

HEAD_INITS = ("official", "copy")


def load_stage1_into_temporal(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, head_init: str = "official"
) -> None:
    """Initialise a TAD model (``model.is_temporal``) from a single-frame (stage-1) checkpoint,
    ours or official.

    Every stage-1 weight must fit the model by name and shape (backbone, pixel decoder, queries,
    decoder layers, clip head); otherwise ``ValueError`` lists the offending keys.

    ``head_init="official"`` reproduces the official stage-2 start (DESIGN §6): the TAD-only
    parts keep their fresh initialisation — the shared ``decoder.temporal`` module, both head
    norms (``clip_head.norm`` and ``frame_head.norm``; the official names differ between the
    stages) and the frame head's class and mask layers. Everything else, including the clip
    head's class and mask layers, comes from stage 1.

    ``head_init="copy"``: as "official", and in addition the stage-1 head (norm, class layer,
    mask MLP) is copied into the frame head, and the stage-1 norm into the clip head's norm,
    so both heads start as the stage-1 head. Only ``decoder.temporal`` stays fresh.
    """
    if head_init not in HEAD_INITS:
        raise WeightsError(f"head_init: expected one of {HEAD_INITS}, got {head_init!r}")
    if not getattr(model, "is_temporal", False):
        raise WeightsError(
            "load_stage1_into_temporal: the model has no Temporal Aggregation Decoder"
        )
    stage1 = _as_ours(state_dict)
    tad_only = ("decoder.temporal.", "decoder.frame_head.")
    temporal_keys = sorted(key for key in stage1 if key.startswith(tad_only))
    if temporal_keys:
        raise WeightsError(
            "load_stage1_into_temporal: the checkpoint already has a temporal decoder "
            f"({temporal_keys[:3]} …); load it with load_model or a strict load instead"
        )
    target = model.state_dict()
    shared = {key: value for key, value in target.items() if not key.startswith(tad_only)}
    check_state_dict(shared, stage1, what="stage-1 checkpoint → temporal model")
    new_state = dict(target)
    if head_init == "official":
        new_state.update(
            {k: v for k, v in stage1.items() if not k.startswith("decoder.clip_head.norm.")}
        )
        fresh = "decoder.temporal, clip_head.norm, frame_head (norm, class_embed, mask_embed)"
    else:
        new_state.update(stage1)
        head = "decoder.clip_head."
        new_state.update(
            {
                f"decoder.frame_head.{k[len(head) :]}": v
                for k, v in stage1.items()
                if k.startswith(head)
            }
        )
        fresh = "decoder.temporal"
    model.load_state_dict(new_state, strict=True)
    logger.info("stage-1 weights loaded (head_init=%s); freshly initialised: %s", head_init, fresh)


# --------------------------------------------------------------------------- our format

CONFIG_METADATA_KEY = "themask_config"
CLASSES_METADATA_KEY = "themask_classes"


TEST_METADATA_KEY = "themask_test"


def save_model(
    model: THEMask,
    path: PathLike,
    *,
    class_names: Sequence[str] | None = None,
    palette: np.ndarray | None = None,
    test_scale: tuple[int, int] | None = None,
) -> None:
    """Write ``model``'s weights as safetensors, with ``model.config`` (a ``ModelConfig``) as
    JSON under the metadata key ``themask_config``; atomic (no partial file on failure).
    When given: the class names and the (K, 3) palette under ``themask_classes``, and
    ``test_scale`` (long, short), the test resize of the training data, under
    ``themask_test`` for ``themask predict`` (see :func:`read_test_scale`)."""
    config = getattr(model, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        raise WeightsError(
            "save_model: the model has no dataclass `config` (build it with build_model)"
        )
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(config))}
    if test_scale is not None:
        metadata[TEST_METADATA_KEY] = json.dumps({"scale": [int(v) for v in test_scale]})
    if class_names is not None:
        if len(class_names) != model.num_classes or (
            palette is not None and len(palette) != len(class_names)
        ):
            raise ValueError(
                f"save_model: {len(class_names)} class names (palette: "
                f"{None if palette is None else len(palette)}) for {model.num_classes} classes"
            )
        classes = {"names": list(class_names)}
        if palette is not None:
            classes["palette"] = np.asarray(palette, dtype=np.uint8).tolist()
        metadata[CLASSES_METADATA_KEY] = json.dumps(classes)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    logger.info("saved %d tensors to %s", len(tensors), path)


def _dataclass_from_dict(cls: type, values: Mapping[str, object], *, where: str) -> typing.Any:
    """Rebuild dataclass ``cls`` from its ``asdict`` JSON: nested dataclasses and tuples
    (JSON lists) are restored; missing fields take their defaults; unknown fields raise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise WeightsError(f"{where}: unknown {cls.__name__} fields {unknown}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = _dataclass_from_dict(hint, value, where=f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _metadata(path: PathLike) -> dict[str, str]:
    """The metadata of a .safetensors file ({} when it is no readable safetensors file)."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # unreadable: reported when the tensors are read
        return {}


def read_test_scale(path: PathLike) -> tuple[int, int] | None:
    """The (long, short) test resize stored by :func:`save_model`, or ``None``."""
    stored = _metadata(path).get(TEST_METADATA_KEY)
    if stored is None:
        return None
    long_side, short_side = json.loads(stored)["scale"]
    return int(long_side), int(short_side)


def read_model_config(path: PathLike) -> ModelConfig:
    """The ``ModelConfig`` stored in a file written by :func:`save_model`."""
    metadata = _metadata(path)
    if CONFIG_METADATA_KEY not in metadata:
        raise WeightsError(
            f"{path}: no '{CONFIG_METADATA_KEY}' metadata; not a themask model file "
            "(convert other checkpoints with `themask convert`)"
        )
    return _dataclass_from_dict(
        ModelConfig,
        json.loads(metadata[CONFIG_METADATA_KEY]),
        where=f"{path}:{CONFIG_METADATA_KEY}",
    )


def read_class_info(path: PathLike) -> tuple[list[str], np.ndarray | None] | None:
    """(class names, (K, 3) uint8 palette or None) stored by :func:`save_model`, or ``None``
    for a file without them (any other weights format included)."""
    stored = _metadata(path).get(CLASSES_METADATA_KEY)
    if stored is None:
        return None
    values = json.loads(stored)
    palette = values.get("palette")
    return list(values["names"]), None if palette is None else np.array(palette, dtype=np.uint8)


def load_model(path: PathLike, *, map_location: str | torch.device = "cpu") -> THEMask:
    """Rebuild a ``THEMask`` from a file written by :func:`save_model` (no preset needed),
    load its weights strictly and move it to ``map_location``."""
    model = build_model_from_config(read_model_config(path))
    load_strict(model, read_state_dict(path), what=str(path))
    return model.to(map_location)


def _is_themask_file(path: Path) -> bool:
    return CONFIG_METADATA_KEY in _metadata(path)


def model_from_weights(
    path: PathLike, *, preset: str | None = None, num_classes: int | None = None
) -> THEMask:
    """A ``THEMask`` holding the weights at ``path``, whatever their layout:

    - our own file (``save_model``): rebuilt from its config (``preset``/``num_classes`` must
      then be left out);
    - a full-model state dict, official THE-Mask names or ours (e.g. a training checkpoint):
      ``preset`` and ``num_classes`` are inferred from the shapes unless given;
    - MiT ImageNet weights (original / Hugging Face / mmseg 1.x): a fresh model of ``preset``
      (required) with ``num_classes`` (default 124) and these backbone weights.
    """
    source = Path(path)
    if _is_themask_file(source):
        if preset is not None or num_classes is not None:
            raise WeightsError(f"{path} is a themask model file; it fixes its own preset")
        return load_model(source)
    state_dict = read_state_dict(source)
    if _is_official(state_dict) or any(key.startswith("decoder.") for key in state_dict):
        layout = "official THE-Mask" if _is_official(state_dict) else "themask"
        ours = _as_ours(state_dict)
        preset = preset or infer_preset(ours)
        num_classes = num_classes if num_classes is not None else infer_num_classes(ours)
        model = build_model(preset, num_classes=num_classes)
        load_strict(model, ours, what=f"{path} ({layout} layout) → preset {preset}")
    else:
        if preset is None:
            raise WeightsError(f"{path}: MiT backbone weights only; name the model with a preset")
        model = build_model(preset, num_classes=124 if num_classes is None else num_classes)
        layout = "MiT " + load_backbone_state_dict(model.backbone, state_dict, source=str(path))
    logger.info(
        "%s: %s weights → preset %s, %d classes, %.2f M parameters",
        path,
        layout,
        preset,
        model.num_classes,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model
