"""themask: THE-Mask video semantic segmentation in plain PyTorch.

Public names are imported lazily (PEP 562), so ``import themask`` (and ``themask --help``)
stays fast; ``from themask import build_model`` loads torch and the model on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "build_model": "themask.modeling.build",
    "list_presets": "themask.modeling.build",
    "THEMask": "themask.modeling.themask",
    "ModelConfig": "themask.modeling.config",
    "LossConfig": "themask.loss.config",
    "SetCriterion": "themask.loss.criterion",
    "load_model": "themask.weights",
    "save_model": "themask.weights",
    "training_loss": "themask.loss.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'themask' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
