"""themask: THE-Mask video semantic segmentation in plain PyTorch.

Public names are imported lazily (PEP 562): ``import themask`` does not load torch.
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


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
