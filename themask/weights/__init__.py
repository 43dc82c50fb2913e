"""Weight files (``files``), MiT (``mit``), official (``official``) layouts; ours: .safetensors."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from themask.config import ConfigError, update_dataclass
from themask.data.vspw import NUM_CLASSES
from themask.io import PathLike, atomic_write
from themask.modeling.build import build_model, build_model_from_config, preset_config
from themask.modeling.config import ModelConfig
from themask.modeling.themask import THEMask
from themask.weights import official
from themask.weights.files import WeightsError, load_strict, read_state_dict
from themask.weights.mit import load_backbone_weights

logger = logging.getLogger(__name__)

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
    """Write ``model``'s weights and metadata atomically; ``test_scale``: (long, short)."""
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise WeightsError("save_model: the model has no ModelConfig `config` (use build_model)")
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(config))}
    if test_scale is not None:
        metadata[TEST_METADATA_KEY] = json.dumps({"scale": [int(v) for v in test_scale]})
    if class_names is not None:
        colours = None if palette is None else len(palette)
        if len(class_names) != model.num_classes or colours not in (None, len(class_names)):
            names = f"{len(class_names)} class names (palette: {colours})"
            raise WeightsError(f"save_model: {names} for {model.num_classes} classes")
        classes: dict[str, list] = {"names": list(class_names)}
        if palette is not None:
            classes["palette"] = np.asarray(palette, dtype=np.uint8).tolist()
        metadata[CLASSES_METADATA_KEY] = json.dumps(classes)
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    logger.info("saved %d tensors to %s", len(tensors), path)


def _stored(path: PathLike, key: str) -> Any:
    """The JSON value under ``key`` in a .safetensors file's metadata (None if absent)."""
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(key)
    except Exception:  # unreadable: reported when the tensors are read
        return None
    return None if text is None else json.loads(text)


def read_class_info(path: PathLike) -> tuple[list[str], np.ndarray | None] | None:
    """(class names, (K, 3) uint8 palette or None) stored by :func:`save_model`, else None."""
    values = _stored(path, CLASSES_METADATA_KEY)
    if values is None:
        return None
    palette = values.get("palette")
    return list(values["names"]), None if palette is None else np.array(palette, dtype=np.uint8)


def read_test_scale(path: PathLike) -> tuple[int, int] | None:
    """The (long, short) test resize stored by :func:`save_model`, else None."""
    values = _stored(path, TEST_METADATA_KEY)
    return None if values is None else (int(values["scale"][0]), int(values["scale"][1]))


def load_model(path: PathLike, *, map_location: str | torch.device = "cpu") -> THEMask:
    """The ``THEMask`` of a file written by :func:`save_model`, on ``map_location``."""
    values = _stored(path, CONFIG_METADATA_KEY)
    if values is None:
        hint = "not a themask model file (convert other checkpoints with `themask convert`)"
        raise WeightsError(f"{path}: no '{CONFIG_METADATA_KEY}' metadata; {hint}")
    values.pop("loss", None)  # files from before the objective left the network config
    try:
        config = update_dataclass(ModelConfig(), values, CONFIG_METADATA_KEY)
    except ConfigError as err:
        raise WeightsError(f"{path}: {err}") from None
    model = build_model_from_config(config)
    load_strict(model, read_state_dict(path), what=str(path))
    return model.to(map_location)


def model_from_weights(
    path: PathLike, *, preset: str | None = None, num_classes: int | None = None
) -> THEMask:
    """A ``THEMask`` with the weights at ``path``: our file, a full state dict (ours or official;
    network and K inferred unless given) or MiT ImageNet weights (``preset`` needed, K: 124)."""
    if _stored(path, CONFIG_METADATA_KEY) is not None:
        if preset is not None or num_classes is not None:
            raise WeightsError(f"{path} is a themask model file; it fixes its own preset")
        return load_model(path)
    state_dict = read_state_dict(path)
    from_official = official.is_official(state_dict)
    if from_official or any(key.startswith("decoder.") for key in state_dict):
        layout = "official THE-Mask" if from_official else "themask"
        ours = official.convert_official_state_dict(state_dict) if from_official else state_dict
        classes = official.infer_num_classes(ours) if num_classes is None else num_classes
        base = official.infer_model_config(ours) if preset is None else preset_config(preset)
        model = build_model_from_config(dataclasses.replace(base, num_classes=classes))
        load_strict(model, ours, what=f"{path} ({layout} layout)")
    else:
        if preset is None:
            raise WeightsError(f"{path}: MiT backbone weights only; name the model with a preset")
        model = build_model(preset, num_classes=NUM_CLASSES if num_classes is None else num_classes)
        layout = "MiT " + load_backbone_weights(model.backbone, state_dict, source=str(path))
    network = f"{model.config.backbone} {model.config.decoder} decoder, {model.num_classes} classes"
    size = sum(p.numel() for p in model.parameters()) / 1e6
    logger.info("%s: %s weights → %s, %.2f M parameters", path, layout, network, size)
    return model
