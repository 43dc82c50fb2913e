"""AdamW groups (backbone lr × mult; only linear/conv/attention weights decay), poly lr."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from themask.config import TrainConfig

DECAYING_MODULES = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention)


def build_param_groups(model: nn.Module, train: TrainConfig) -> list[dict]:
    """Groups of the trainable parameters, each with ``lr_scale`` (1 or ``backbone_lr_mult``)."""
    lr, weight_decay, backbone_lr_mult = train.lr, train.weight_decay, train.backbone_lr_mult
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
            decays = isinstance(module, DECAYING_MODULES) and param.ndim >= 2
            scale, decay = backbone_lr_mult if in_backbone else 1.0, weight_decay if decays else 0.0
            name = f"{'backbone' if in_backbone else 'head'}_{'decay' if decays else 'no_decay'}"
            new = dict(lr=lr * scale, lr_scale=scale, weight_decay=decay, name=name)
            groups.setdefault((in_backbone, decays), dict(params=[], **new))["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def poly_lr(step: int, base_lr: float, max_steps: int, power: float) -> float:
    """``base_lr · (1 − step / max_steps) ** power`` for the 0-based step to take."""
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    return base_lr * (1.0 - min(max(step, 0), max_steps) / max_steps) ** power


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr × group['lr_scale']``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """Fused AdamW (PyTorch's betas and eps, as official) over ``build_param_groups``."""
    groups = build_param_groups(model, train)
    if not groups:
        raise ValueError("no trainable parameters: everything is frozen")
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, fused=True)
