"""Weight files read safely (nothing unpickled), loaded strictly, keys renamed by prefix tables."""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor, nn

from themask.io import PathLike

logger = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
NameTable = tuple[tuple[str, str], ...]  # (source prefix, target prefix) pairs
# the key-name tables of the MiT and official layouts, described in names.yaml
NAME_TABLES: dict[str, Any] = yaml.safe_load(Path(__file__).with_name("names.yaml").read_bytes())

_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPER_KEYS = ("state_dict", "model")


class WeightsError(ValueError):
    """A weights file is unreadable, of an unknown layout, or does not fit the model."""


def read_state_dict(path: PathLike) -> StateDict:
    """A weights file (``.safetensors``; ``.pth/.pt/.bin`` loaded weights-only) or a Hugging Face
    model directory as a flat ``{name: tensor}`` (wrappers and a ``module.`` prefix removed)."""
    source = Path(path)
    if source.is_dir():
        source = next((source / n for n in _HF_FILES if (source / n).is_file()), source)
        if source.is_dir():
            raise FileNotFoundError(f"{path}: directory holds none of {list(_HF_FILES)}")
    if not source.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if source.suffix not in (".safetensors", *_TORCH_SUFFIXES):
        expected = f".safetensors, {', '.join(_TORCH_SUFFIXES)} or a Hugging Face directory"
        raise WeightsError(f"{path}: unknown weights format {source.suffix!r}; expected {expected}")
    try:
        if source.suffix == ".safetensors":
            obj: object = load_file(str(source), device="cpu")
        else:
            obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch raise many kinds
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if isinstance(error, pickle.UnpicklingError) and found is not None:
            raise WeightsError(
                f"{path}: holds {found.group(1)}, which a safe (weights-only) load refuses. If "
                "you trust the file, allow that class and re-save just its state dict: with "
                f"torch.serialization.safe_globals([{found.group(1)}]): "
                "torch.save(torch.load(SRC, weights_only=True)['state_dict'], DST)"
            ) from None
        kind = ".safetensors" if source.suffix == ".safetensors" else "PyTorch weights"
        text = str(error).strip()
        reason = text.splitlines()[0] if text else type(error).__name__
        raise WeightsError(f"{path}: not a readable {kind} file ({reason})") from error
    while isinstance(obj, Mapping):
        wrapper = next((key for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a mapping of tensors, got {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: holds no tensors (keys: {sorted(obj)[:10]})")
    if len(obj) > len(tensors):
        logger.debug("%s: ignored %d non-tensor entries", path, len(obj) - len(tensors))
    if all(key.startswith("module.") for key in tensors):
        tensors = {key[len("module.") :]: value for key, value in tensors.items()}
    return tensors


def check_state_dict(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor], *, what: str
) -> None:
    """Raise ``WeightsError`` listing missing, unexpected and mis-shaped keys of ``what``."""
    mis_shaped = sorted(
        f"{key}: expected {tuple(expected[key].shape)}, got {tuple(given[key].shape)}"
        for key in set(expected) & set(given)
        if expected[key].shape != given[key].shape
    )
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    groups = {"missing keys": missing, "unexpected keys": unexpected, "mis-shaped keys": mis_shaped}
    problems = [f"{len(v)} {k}:\n  " + "\n  ".join(v) for k, v in groups.items() if v]
    if problems:
        raise WeightsError(f"{what}: weights do not fit the model.\n" + "\n".join(problems))


def load_strict(module: nn.Module, state_dict: Mapping[str, Tensor], *, what: str) -> None:
    """``module.load_state_dict(strict=True)`` after a readable key/shape check."""
    check_state_dict(module.state_dict(), state_dict, what=what)
    module.load_state_dict(dict(state_dict), strict=True)


def rename(key: str, table: NameTable) -> str | None:
    """``key`` renamed by the first matching (source, target) prefix pair (``{i}``: an index)."""
    for source, target in table:
        match = re.match(re.escape(source).replace(re.escape("{i}"), r"(\d+)"), key)
        if match is not None:
            new = target.replace("{i}", match.group(1)) if match.groups() else target
            return new + key[match.end() :]
    return None
