"""Weight files: reading (``files``), MiT (``mit``) and official (``official``) layouts, ours."""

from __future__ import annotations

from themask.weights.files import WeightsError, read_state_dict
from themask.weights.format import (
    load_model,
    model_from_weights,
    read_class_info,
    read_test_scale,
    save_model,
)
from themask.weights.mit import load_backbone_weights

__all__ = [
    "WeightsError",
    "load_backbone_weights",
    "load_model",
    "model_from_weights",
    "read_class_info",
    "read_state_dict",
    "read_test_scale",
    "save_model",
]
