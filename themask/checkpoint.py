"""Weight files: reading, layout conversion and strict loading.

Pure conversion functions (state dict in → state dict out) plus thin loaders:

- MiT ImageNet weights in three public layouts (``reference/weights.md``): the original SegFormer
  release (``patch_embed1.proj.weight`` …), Hugging Face ``nvidia/mit-b*`` (``segformer.encoder.``
  …) and mmseg 1.x (``layers.0.0.projection.weight`` …) → :func:`load_backbone_weights`.
- Checkpoints trained with the official THE-Mask code (mmseg 0.x names) ↔ ours:
  :func:`convert_official_state_dict`, :func:`to_official_state_dict`, :func:`infer_preset`.
- Stage 1 → stage 2 initialisation: :func:`load_stage1_into_temporal`.
- Our own format (safetensors + model config JSON): :func:`save_model`, :func:`load_model`.

Every load is strict: missing, unexpected or mis-shaped keys raise ``ValueError`` naming them.
Nothing here unpickles arbitrary objects (``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from themask.io import PathLike

logger = logging.getLogger(__name__)

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
        from safetensors.torch import load_file

        loaded: object = load_file(str(source), device="cpu")
    elif source.suffix in _TORCH_SUFFIXES:
        loaded = torch.load(source, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"{path}: unknown weights format {source.suffix!r}; expected .safetensors, "
            f"{', '.join(_TORCH_SUFFIXES)} or a Hugging Face directory"
        )
    return unwrap_state_dict(loaded, source=str(path))


def unwrap_state_dict(obj: object, *, source: str = "state dict") -> StateDict:
    """Remove ``state_dict``/``model`` wrappers and a ``module.`` prefix; keep tensors only."""
    while isinstance(obj, Mapping):
        wrapper = next((key for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a mapping of tensors, got {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{source}: holds no tensors (keys: {sorted(obj)[:10]})")
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
        raise ValueError(f"{what}: weights do not fit the model.\n" + "\n".join(problems))


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


def _unknown(key: str, layout: str) -> ValueError:
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
            raise ValueError(f"MiT weights (Hugging Face layout): {key} lacks its {missing} half")
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


MIT_LAYOUTS = ("themask", "original", "huggingface", "mmseg")


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
    raise ValueError(
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


def load_backbone_weights(backbone: nn.Module, path: PathLike) -> None:
    """Load MiT weights from ``path`` (any supported layout) into ``backbone``, strictly."""
    state_dict = read_state_dict(path)
    layout = detect_mit_layout(_select_backbone_keys(state_dict))
    converted = convert_mit_state_dict(state_dict)
    load_strict(backbone, converted, what=f"MiT weights {path} ({layout} layout)")
    logger.info("loaded MiT weights from %s (%s layout, %d tensors)", path, layout, len(converted))
