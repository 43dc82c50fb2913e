"""CUDA paths (skipped without CUDA; ``make gpu-check`` runs them).

* a few training steps of a tiny preset with amp off / bf16 / fp16 whose forward pass runs
  under ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises), and whose forward
  pass + loss may sync at most ``LOSS_SYNCS`` times per step (the matcher's one read of its
  costs), counted with ``set_sync_debug_mode("warn")``;
* CUDA against CPU at fixed points: deformable attention (values and gradients), point
  sampling, the criterion (same random points on both devices);
* with >= 2 GPUs, the two-process equivalence test over NCCL.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from themask.config import load_config
from themask.data.loader import Batch, ClipMeta
from themask.engine import Trainer

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(600),
]
CUDA = torch.device("cuda")
LOSS_SYNCS = 1  # per step: the Hungarian matcher reads its cost matrices once


@contextmanager
def sync_debug_error():
    """Any synchronising CUDA call inside the block raises a RuntimeError."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@contextmanager
def counted_syncs():
    """Yields a list that receives one entry per synchronising CUDA call in the block."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found: list[str] = []
            yield found
            found += [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture
def exact_fp32():
    """No TF32 while comparing with the CPU (the trainer turns it on process-wide)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def _cfg(*overrides):
    return load_config(
        None,
        [
            "preset=themask_tiny_t2",
            "loss.num_points=64",
            "data.dilation=[-3]",
            "train.batch_size=2",
            "train.max_steps=3",
            "train.log_interval=3",
            "train.checkpoint_interval=3",
            *overrides,
        ],
    )


def _batches(start_batch, size=64):
    """Loader-like batches: uint8 frames, the bottom rows padding (ignored labels)."""
    index = start_batch
    while True:
        g = torch.Generator().manual_seed(index)
        frames = torch.randint(0, 256, (2, 2, 3, size, size), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 8, (2, 2, size, size), generator=g)
        labels[..., size - 8 :, :] = 255
        meta = [ClipMeta("v", ["a", "b"], (size, size), image_size=(size - 8, size))] * 2
        yield Batch(frames.pin_memory(), labels.pin_memory(), meta)
        index += 1


def _stand_in_loss(model, frames, labels, *, step):
    predictions = model(frames)
    total = frames.new_zeros(())
    for prediction_set in list(predictions.clip) + list(predictions.frame or []):
        total = total + prediction_set.mask_logits.float().sigmoid().mean()
        total = total + prediction_set.class_logits.float().pow(2).mean()
    return total, {}


def _train(tmp_path, amp, loss_fn):
    trainer = Trainer(
        _cfg(f"train.amp={amp}"),
        tmp_path,
        device="cuda",
        batches=_batches,
        loss_fn=loss_fn,
        evaluate=False,
        progress=False,
    )
    losses = trainer.train().losses
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    return trainer


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_forward_pass_has_no_host_sync(tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")

    def checked(model, frames, labels, *, step):
        with sync_debug_error():
            return _stand_in_loss(model, frames, labels, step=step)

    trainer = _train(tmp_path, amp, checked)
    assert (trainer.scaler is not None) == (amp == "fp16")


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_forward_and_training_loss_sync_at_most_once(tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    from themask.loss.criterion import SetCriterion, training_loss

    per_step = []
    cfg = _cfg(f"train.amp={amp}")
    criterion = SetCriterion(cfg.loss, cfg.model.num_classes)

    def counted(model, frames, labels, *, step):
        with counted_syncs() as found:
            result = training_loss(model, frames, labels, criterion, step=step)
        per_step.append(found)
        return result

    _train(tmp_path, amp, counted)
    assert all(len(found) <= LOSS_SYNCS for found in per_step), per_step


def test_auto_precision_on_cuda():
    from themask.precision import configure_cuda_math, resolve_amp

    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    assert resolve_amp("auto", CUDA) is expected
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    configure_cuda_math(CUDA)
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
    torch.set_float32_matmul_precision(previous[0])
    torch.backends.cudnn.benchmark = previous[1]


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_deformable_attention_matches_cpu(exact_fp32, grad):
    # training: the bag reader and its own backward; inference: the bag reader alone
    from themask.modeling.ms_deform_attn import ms_deform_attn_pytorch

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (8, 12), (16, 24)]
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(2, tokens, 4, 8, generator=g)
    locations = torch.rand(2, 30, 4, 3, 4, 2, generator=g) * 1.2 - 0.1  # some outside
    weights = torch.rand(2, 30, 4, 3, 4, generator=g)
    results = {}
    for device in ("cpu", "cuda"):
        inputs = [x.to(device).requires_grad_(grad) for x in (value, locations, weights)]
        output = ms_deform_attn_pytorch(inputs[0], shapes, inputs[1], inputs[2])
        if grad:
            output.pow(2).sum().backward()
        results[device] = [output.detach().cpu()] + [x.grad.cpu() for x in inputs if grad]
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5)


def test_point_sampling_matches_cpu():
    from themask.loss.point_sample import point_sample, sample_queries

    g = torch.Generator().manual_seed(1)
    maps = torch.randn(5, 1, 13, 17, generator=g)
    coords = torch.rand(5, 40, 2, generator=g)
    on_cuda = point_sample(maps.to(CUDA), coords.to(CUDA)).cpu()
    torch.testing.assert_close(on_cuda, point_sample(maps, coords), rtol=1e-5, atol=1e-6)
    queries = maps.view(1, 5, 1, 13, 17).expand(2, -1, 3, -1, -1)  # (B, N, T, h, w)
    on_cuda = sample_queries(queries.to(CUDA), coords[:2].to(CUDA)).cpu()
    torch.testing.assert_close(on_cuda, sample_queries(queries, coords[:2]), rtol=1e-5, atol=1e-6)


def test_matched_row_gradients_match_cpu(exact_fp32):
    # the criterion's row product (gather from a MaskSource; rows uploaded by assign)
    import numpy as np

    from themask.loss.criterion import assign, gather
    from themask.loss.matcher import BatchMatch, MatchIndices
    from themask.modeling.outputs import MaskSource, PredictionSet

    g = torch.Generator().manual_seed(2)
    embeddings, features = torch.randn(4, 10, 4, generator=g), torch.randn(4, 4, 6, generator=g)
    match = MatchIndices((torch.tensor([1, 3]), torch.tensor([0, 1])))
    result = BatchMatch([[match, match]] * 2, [np.array([0, 2])] * 2, np.ones((2, 2), bool))
    grads = {}
    for device in ("cpu", "cuda"):
        inputs = [x.detach().to(device).requires_grad_() for x in (embeddings, features)]
        flat = torch.bmm(*inputs)  # B·T = 4 frames, S·N = 2 sets of 5 queries, 2×3 maps
        masks = flat.view(2, 2, 2, 5, 2, 3).permute(2, 0, 3, 1, 4, 5)
        sets = [
            PredictionSet(flat, masks[s], MaskSource(*inputs, flat.detach(), 5 * s)) for s in (0, 1)
        ]
        rows = assign(result, queries=5, num_classes=3, device=torch.device(device)).primary
        picked = gather(sets, rows)
        picked.backward(torch.linspace(-1, 1, picked.numel(), device=device).view_as(picked))
        grads[device] = [x.grad.cpu() for x in inputs]
    for cpu, cuda in zip(grads["cpu"], grads["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-6)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(x, device) for x in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(
            obj, **{f.name: _to(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        )
    return obj


def test_criterion_matches_cpu_at_the_same_points(monkeypatch, exact_fp32):
    """The matcher and the point losses draw ``torch.rand`` points; both devices get the same
    points from one CPU generator, so the losses must agree."""
    from themask.loss.criterion import SetCriterion
    from themask.modeling.build import build_model, preset_loss_config

    torch.manual_seed(0)
    model = build_model("themask_tiny_t2", num_classes=8).train()
    batch = next(_batches(0))
    frames = (batch.frames.float() - 120.0) / 58.0
    with torch.no_grad():
        predictions = model(frames)
    labels = batch.labels  # (B, T, H, W), T = 2: the temporal preset keeps clips
    criterion = SetCriterion(preset_loss_config("themask_tiny_t2"), model.num_classes)
    real_rand = torch.rand
    results = {}
    for device in ("cpu", "cuda"):
        g = torch.Generator().manual_seed(5)

        def fixed_rand(*size, device=None, generator=None, _g=g, **kwargs):
            return real_rand(*size, generator=_g, **kwargs).to(device or "cpu")

        monkeypatch.setattr(torch, "rand", fixed_rand)
        output = criterion(_to(predictions, device), labels.to(device), step=0)
        monkeypatch.setattr(torch, "rand", real_rand)
        terms = {k: float(v) for k, v in output.terms.items()}
        results[device] = (float(output.total), terms)
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-4)
    assert results["cuda"][1].keys() == results["cpu"][1].keys()
    for key, value in results["cpu"][1].items():
        assert results["cuda"][1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# ---------------------------------------------------------------------------- NCCL DDP

STEPS = 3


def _ddp_cfg(max_steps):
    return _cfg(
        f"train.max_steps={max_steps}",
        "train.batch_size=4",
        "train.amp=off",
        "train.log_interval=1",
        "model.drop_path_rate=0.0",
        "model.tad_dropout=0.0",
    )


def _deterministic_loss(model, frames, labels, *, step):
    """No random points: per-process means over equal halves = the global-batch mean."""
    predictions = model(frames)
    total = frames.new_zeros(())
    for prediction_set in list(predictions.clip) + list(predictions.frame or []):
        masks = prediction_set.mask_logits
        small = F.interpolate(labels.float(), size=masks.shape[-2:], mode="nearest")
        query_class = (torch.arange(masks.shape[1], device=masks.device) % 8).view(1, -1, 1, 1, 1)
        total = total + F.binary_cross_entropy_with_logits(
            masks, (small[:, None] == query_class).float()
        )
        total = total + prediction_set.class_logits.float().pow(2).mean()
    return total, {}


def _four_clip_batches(start_batch):
    """The same 4 clips per step for any world size: rank r of W takes its share."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    source = _batches(start_batch * 1000)
    while True:
        a, b = next(source), next(source)
        frames, labels = torch.cat([a.frames, b.frames]), torch.cat([a.labels, b.labels])
        share = slice(rank * 4 // world, (rank + 1) * 4 // world)
        yield Batch(frames[share], labels[share], (a.meta + b.meta)[share])


def _nccl_worker(rank, world_size, port, out):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from themask import distributed

    try:
        trainer = Trainer(
            _ddp_cfg(STEPS),
            f"{out}/run",
            device="cuda",
            batches=_four_clip_batches,
            loss_fn=_deterministic_loss,
            evaluate=False,
            progress=False,
        )
        torch.set_float32_matmul_precision("highest")  # as the single process below
        losses = trainer.train().losses
        state = {k: v.cpu() for k, v in trainer.model.state_dict().items()}
        torch.save({"losses": losses, "state": state}, f"{out}/rank{rank}.pt")
    finally:
        distributed.cleanup()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_nccl_processes_match_one_process(tmp_path, exact_fp32):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_nccl_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = Trainer(
        _ddp_cfg(STEPS),
        tmp_path / "single",
        device="cuda",
        batches=_four_clip_batches,
        loss_fn=_deterministic_loss,
        evaluate=False,
        progress=False,
    )
    torch.set_float32_matmul_precision("highest")  # the trainer switched TF32 on
    expected = single.train().losses
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(expected, rel=1e-3)
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
