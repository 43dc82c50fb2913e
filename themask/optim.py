"""Optimiser parameter groups and the poly learning-rate schedule (docs/DESIGN.md §6).

The rules are code, not name patterns:

* learning rate: parameters of ``model.backbone`` get ``lr × backbone_lr_mult``;
* weight decay: only the weight matrices/kernels of linear, convolution and multi-head
  attention layers decay. Norm layers, biases, embeddings (``nn.Embedding``) and free
  parameters such as level embeddings do not.
"""

from __future__ import annotations

import torch
from torch import nn

DECAYING_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)


def parameter_decays(module: nn.Module, param: torch.Tensor) -> bool:
    """Whether ``param`` (owned directly by ``module``) gets weight decay."""
    return isinstance(module, DECAYING_MODULES) and param.ndim >= 2


def build_param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float,
    backbone: nn.Module | None = None,
) -> list[dict]:
    """AdamW parameter groups; frozen parameters (``requires_grad=False``) are left out.

    Each group carries ``lr_scale`` (1 or ``backbone_lr_mult``) so the schedule can set
    ``lr = poly_lr(step, ...) * lr_scale``. ``backbone`` defaults to ``model.backbone``.
    """
    if backbone is None:
        backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    groups: dict[tuple, dict] = {}
    seen = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            in_backbone = id(param) in backbone_ids
            decays = parameter_decays(module, param)
            key = (in_backbone, decays)
            if key not in groups:
                scale = backbone_lr_mult if in_backbone else 1.0
                groups[key] = {
                    "params": [],
                    "lr": lr * scale,
                    "lr_scale": scale,
                    "weight_decay": weight_decay if decays else 0.0,
                    "name": f"{'backbone' if in_backbone else 'head'}_"
                    f"{'decay' if decays else 'no_decay'}",
                }
            groups[key]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def poly_lr(step: int, base_lr: float, max_steps: int, power: float) -> float:
    """Poly schedule without warm-up: ``base_lr · (1 − step / max_steps) ** power``.

    ``step`` is the 0-based index of the optimizer step about to be taken; the rate reaches 0
    at ``max_steps``.
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    progress = min(max(step, 0), max_steps) / max_steps
    return base_lr * (1.0 - progress) ** power


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr × group['lr_scale']``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, backbone_lr_mult: float
) -> torch.optim.AdamW:
    """AdamW over ``build_param_groups`` (betas and eps are PyTorch defaults, as official)."""
    groups = build_param_groups(
        model, lr=lr, weight_decay=weight_decay, backbone_lr_mult=backbone_lr_mult
    )
    if not groups:
        raise ValueError("no trainable parameters: everything is frozen")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
