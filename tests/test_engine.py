import math

import pytest
import torch
from torch import nn

from themask.optim import build_optimizer, build_param_groups, poly_lr, set_learning_rate


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4, bias=False)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.query_feat = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.attn = nn.MultiheadAttention(4, 2)
        self.gn = nn.GroupNorm(2, 4)
        self.proj = nn.Linear(4, 6)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _group_members(groups, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in groups}


def test_param_groups_lr_and_decay_by_module_type():
    model = _Model()
    groups = build_param_groups(model, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    members = _group_members(groups, model)
    assert members == {
        "backbone_decay": ["backbone.conv.weight", "backbone.fc.weight"],
        "backbone_no_decay": ["backbone.conv.bias", "backbone.norm.bias", "backbone.norm.weight"],
        "head_decay": ["attn.in_proj_weight", "attn.out_proj.weight", "proj.weight"],
        "head_no_decay": sorted(
            [
                "attn.in_proj_bias",
                "attn.out_proj.bias",
                "gn.bias",
                "gn.weight",
                "level_embed",
                "proj.bias",
                "query_feat.weight",
            ]
        ),
    }
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone_decay"]["lr"] == pytest.approx(1e-5)
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0
    assert by_name["head_decay"]["weight_decay"] == 0.05 and by_name["head_decay"]["lr"] == 1e-4
    # every trainable parameter exactly once, frozen ones never
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == trainable


def test_set_learning_rate_keeps_backbone_ratio():
    model = _Model()
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    set_learning_rate(opt, 3e-5)
    for group in opt.param_groups:
        expected = 3e-6 if group["name"].startswith("backbone") else 3e-5
        assert group["lr"] == pytest.approx(expected)


def test_poly_lr_values():
    base, steps, power = 1e-4, 160_000, 0.9
    assert poly_lr(0, base, steps, power) == base
    assert poly_lr(steps, base, steps, power) == 0.0
    assert poly_lr(steps + 10, base, steps, power) == 0.0
    assert poly_lr(40_000, base, steps, power) == pytest.approx(base * 0.75**0.9)
    # hand value: (1 - 1/4) ** 0.9 = exp(0.9 * ln 0.75)
    assert poly_lr(1, 1.0, 4, 0.9) == pytest.approx(math.exp(0.9 * math.log(0.75)))
    values = [poly_lr(s, base, 100, power) for s in range(101)]
    assert all(a > b for a, b in zip(values[:-1], values[1:]))
    with pytest.raises(ValueError):
        poly_lr(0, base, 0, power)
