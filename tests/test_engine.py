from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from themask.config import TrainConfig
from themask.optim import build_optimizer, build_param_groups, poly_lr, set_learning_rate

pytestmark = pytest.mark.usefixtures("one_thread")


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
    groups = build_param_groups(
        model, TrainConfig(lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    )
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
    opt = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1))
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


# ---------------------------------------------------------------------------------------------
# the Trainer on synthetic batches (no files)


def _tiny_cfg(*overrides):
    from themask.config import load_config

    return load_config(
        None,
        [
            "preset=themask_tiny_t2",
            "model.drop_path_rate=0.0",
            "model.tad_dropout=0.0",
            "loss.num_points=32",
            "data.dilation=[-3]",
            "train.batch_size=4",
            "train.max_steps=2",
            "train.lr=1e-3",
            "train.log_interval=1",
            *overrides,
        ],
    )


def _synthetic_batches(batch_size=4, frames=2, size=32):
    from themask.data.loader import Batch

    def make(start_batch):
        index = start_batch
        while True:
            g = torch.Generator().manual_seed(index)
            yield Batch(
                torch.randn(batch_size, frames, 3, size, size, generator=g),
                torch.randint(0, 8, (batch_size, frames, size, size), generator=g),
                [],
            )
            index += 1

    return make


def _mean_loss(model, frames, labels, *, step):
    """Deterministic stand-in objective (no point sampling) over every network output."""
    import torch.nn.functional as F

    predictions = model(frames)
    total = frames.new_zeros(())
    for prediction_set in list(predictions.clip) + list(predictions.frame or []):
        masks = prediction_set.mask_logits  # (B, N, T, h, w)
        small = F.interpolate(labels.float(), size=masks.shape[-2:], mode="nearest")
        query_class = (torch.arange(masks.shape[1]) % 8).view(1, -1, 1, 1, 1)
        target = (small[:, None] == query_class).float()
        total = total + F.binary_cross_entropy_with_logits(masks, target)
        total = total + prediction_set.class_logits.float().pow(2).mean()
    return total, {}


def test_trainer_freezes_backbone_and_pixel_decoder(tmp_path):
    from themask.engine import Trainer

    cfg = _tiny_cfg("train.freeze=[backbone, pixel_decoder]")
    trainer = Trainer(cfg, tmp_path, batches=_synthetic_batches(), evaluate=False, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    modes = []
    trainer.model.backbone.register_forward_hook(lambda m, i, o: modes.append(m.training))
    trainer.train()
    after = trainer.model.state_dict()
    frozen = [k for k in before if k.startswith(("backbone.", "pixel_decoder."))]
    trained = [k for k in before if k.startswith("decoder.") and before[k].is_floating_point()]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in trained) > len(trained) // 2
    assert modes and not any(modes)  # frozen modules run in eval mode (no drop-path)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in trainer.model.backbone.parameters())
    # poly schedule: the last step (index 1 of 2) ran at lr * (1 - 1/2) ** 0.9
    head = [g for g in trainer.optimizer.param_groups if g["name"].startswith("head")][0]
    assert head["lr"] == pytest.approx(1e-3 * 0.5**0.9)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    from themask.engine import Trainer

    results = {}
    for accum in (1, 2):
        cfg = _tiny_cfg(f"train.grad_accum={accum}", "train.max_steps=3")
        per_forward = 4 // accum

        def batches(start_batch, per_forward=per_forward, accum=accum):
            # the same 4 clips per optimizer step, split into `accum` forward passes
            source = _synthetic_batches()(start_batch // accum)
            for batch in source:
                for i in range(accum):
                    part = slice(i * per_forward, (i + 1) * per_forward)
                    yield type(batch)(batch.frames[part], batch.labels[part], [])

        trainer = Trainer(
            cfg,
            tmp_path / str(accum),
            batches=batches,
            loss_fn=_mean_loss,
            evaluate=False,
            progress=False,
        )
        assert trainer.per_process_batch == per_forward
        results[accum] = (trainer.train().losses, trainer.model.state_dict())
    losses_1, state_1 = results[1]
    losses_2, state_2 = results[2]
    assert len(set(losses_1)) == 3
    assert losses_2 == pytest.approx(losses_1, rel=1e-4)
    for key in state_1:
        torch.testing.assert_close(state_2[key], state_1[key], rtol=0, atol=5e-3)


def test_init_from_stage1_weights(tmp_path):
    from themask.engine import Trainer
    from themask.modeling.build import build_model
    from themask.weights import save_model

    stage1 = build_model("themask_tiny_t1", num_classes=8)
    save_model(stage1, tmp_path / "stage1.safetensors")
    cfg = _tiny_cfg(f"train.init_from={tmp_path / 'stage1.safetensors'}")
    trainer = Trainer(
        cfg, tmp_path / "run", batches=_synthetic_batches(), evaluate=False, progress=False
    )
    for key, value in stage1.backbone.state_dict().items():
        assert torch.equal(trainer.model.backbone.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        Trainer(cfg, tmp_path / "empty", resume=True, batches=_synthetic_batches())


def test_bf16_autocast_on_cpu_and_fp16_needs_cuda(tmp_path):
    from themask.engine import Trainer, autocast_context

    seen = []

    def loss_fn(model, frames, labels, *, step):
        total, terms = _mean_loss(model, frames, labels, step=step)
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return total, terms

    cfg = _tiny_cfg("train.amp=bf16", "train.max_steps=1")
    trainer = Trainer(
        cfg, tmp_path, batches=_synthetic_batches(), loss_fn=loss_fn, evaluate=False, progress=False
    )
    losses = trainer.train().losses
    assert seen == [torch.bfloat16] and math.isfinite(losses[0])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        autocast_context("fp16", torch.device("cpu"))


def test_metric_log_holds_means_over_the_interval(tmp_path):
    from themask.engine import Trainer
    from themask.logger import read_metrics

    cfg = _tiny_cfg("train.max_steps=3", "train.log_interval=2")
    trainer = Trainer(
        cfg,
        tmp_path,
        batches=_synthetic_batches(),
        loss_fn=_mean_loss,
        evaluate=False,
        progress=False,
    )
    losses = trainer.train().losses
    records = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [2, 3]  # every 2 steps and the last one
    assert records[0]["loss"] == pytest.approx((losses[0] + losses[1]) / 2)
    assert records[1]["loss"] == pytest.approx(losses[2])
    assert records[1]["lr"] == pytest.approx(1e-3 * (1 - 2 / 3) ** 0.9)


@pytest.mark.parametrize("rounds", [1, 2])
def test_trainer_builds_its_criterion_from_the_run_objective(tmp_path, rounds):
    """The objective is the run's ``loss`` section, not a property of the network."""
    from themask.engine import Trainer
    from themask.logger import read_metrics

    cfg = _tiny_cfg("train.max_steps=1", f"loss.num_rounds={rounds}")
    trainer = Trainer(cfg, tmp_path, batches=_synthetic_batches(), evaluate=False, progress=False)
    assert trainer.criterion.config == cfg.loss and not hasattr(trainer.model.config, "loss")
    trainer.train()
    (record,) = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert math.isfinite(record["loss"]) and "frame_loss_class" in record  # TAD: both heads
    assert ("loss_mask_secondary" in record) == (rounds == 2)
