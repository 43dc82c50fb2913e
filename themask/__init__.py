"""themask: THE-Mask video semantic segmentation in plain PyTorch.

Public names are imported lazily (PEP 562), so ``import themask`` (and ``themask --help``)
stays fast; ``from themask import build_model`` loads torch and the model on first use.
"""

from __future__ import annotations

from themask.io import lazy_exports

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

__getattr__ = lazy_exports("themask", _EXPORTS)


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
