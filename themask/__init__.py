"""themask: THE-Mask video semantic segmentation in plain PyTorch (names load lazily: PEP 562)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "modeling.build",
    "list_presets": "modeling.build",
    "THEMask": "modeling.themask",
    "ModelConfig": "modeling.config",
    "LossConfig": "loss.config",
    "SetCriterion": "loss.criterion",
    "load_model": "weights",
    "save_model": "weights",
    "training_loss": "loss.criterion",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'themask' has no attribute {name!r}")
    return getattr(importlib.import_module(f"themask.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
