"""Fast paths against the plain ones: bf16 CPU inference (scores accumulated in fp32),
activation checkpointing and the mask product's row-skipping backward (same gradients)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from themask import SetCriterion, build_model, training_loss
from themask.modeling.build import preset_loss_config
from themask.modeling.outputs import Predictions, PredictionSet

pytestmark = pytest.mark.usefixtures("one_thread")

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _tiny(preset: str = "themask_tiny_t2", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(preset, num_classes=8, drop_path_rate=0.0, **overrides)


@pytest.mark.parametrize("preset", ["themask_tiny_t2", "mask2former_tiny"])
def test_bf16_scores_are_fp32_and_close_to_fp32(preset):
    model = _tiny(preset).eval()
    clip = torch.randn(1, 2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(clip)
        with torch.autocast(**BF16):
            fast = model(clip)
    assert fast.dtype == torch.float32 and fast.shape == reference.shape == (1, 2, 8, 64, 96)
    assert not torch.equal(fast, reference)  # the network did run in bf16
    error = (fast - reference).abs().max()
    assert error <= 0.05 * reference.abs().max(), error  # loose: bf16 has 8 mantissa bits


def _naive_scores(heads, frames, size):
    """Σ_q softmax(class)[:K]·sigmoid(mask) in float64 query by query, heads averaged, then
    upsampled. class (B, N, K+1) or (B, T, N, K+1), masks (B, N, T, h, w) → (B, T, K, H, W)."""
    total = 0.0
    for head in heads:
        probs = head.class_logits.double().softmax(-1)[..., :-1]
        if probs.dim() == 3:  # one class per clip query
            probs = probs[:, None].expand(-1, frames, -1, -1)  # (B, T, N, K)
        masks = head.mask_logits.double().sigmoid()  # (B, N, T, h, w)
        for q in range(masks.shape[1]):
            total = total + probs[:, :, q, :, None, None] * masks[:, q, :, None] / len(heads)
    b, t, k, h, w = total.shape
    up = F.interpolate(total.reshape(b * t, k, h, w), size=size, mode="bilinear")
    return up.reshape(b, t, k, *size)


def test_score_accumulation_runs_in_fp32_under_bf16_autocast():
    """The decoder's bf16 logits are summed over the queries in fp32: the scores under a bf16
    autocast equal a float64 query-by-query sum; the same einsum in bf16 would not."""
    model = _tiny().eval()
    g = torch.Generator().manual_seed(2)
    queries, classes, frames, h, w = 100, 8, 2, 8, 16
    masks = [(4 * torch.randn(1, queries, frames, h, w, generator=g)).bfloat16() for _ in "cf"]
    clip_class = (3 * torch.randn(1, queries, classes + 1, generator=g)).bfloat16()
    frame_class = (3 * torch.randn(1, frames, queries, classes + 1, generator=g)).bfloat16()
    heads = [PredictionSet(clip_class, masks[0]), PredictionSet(frame_class, masks[1])]
    predictions = Predictions(clip=heads[:1], frame=heads[1:], frames_per_clip=frames)
    with torch.autocast(**BF16):
        scores = model.semantic_scores(predictions, (4 * h, 4 * w))
        probs, sig = clip_class.softmax(-1)[..., :-1], masks[0].sigmoid()
        bf16_sum = torch.einsum("bnk,bnthw->btkhw", probs, sig)
    assert scores.dtype == torch.float32
    naive = _naive_scores(heads, frames, (4 * h, 4 * w))
    torch.testing.assert_close(scores.double(), naive, rtol=1e-5, atol=1e-5)
    # without the guard: the same einsum under the autocast runs in bf16 and is off by far more
    fp32_sum = torch.einsum("bnk,bnthw->btkhw", probs.float(), sig.float())
    assert bf16_sum.dtype == torch.bfloat16
    assert (bf16_sum.float() - fp32_sum).abs().max() > 1e-3


def _loss_and_grads(model, clip, labels, preset):
    torch.manual_seed(3)  # the criterion's point sampling and the TAD's dropout
    criterion = SetCriterion(preset_loss_config(preset), model.num_classes)
    loss, _ = training_loss(model, clip, labels, criterion)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["themask_tiny_t2", "mask2former_tiny"])
def test_activation_checkpointing_keeps_loss_and_gradients(preset):
    plain = _tiny(preset, tad_dropout=0.1).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_activation_checkpointing(True)
    watched = ["decoder.layers.0", "decoder.layers.2", "pixel_decoder.encoder_layers.1"]
    if plain.is_temporal:
        watched.append("decoder.temporal")  # the TAD's aggregation (dropout 0.1 replayed)
    calls = {}
    for kind, model in (("plain", plain), ("checkpointed", checkpointed)):
        modules = dict(model.named_modules())
        for name in watched:
            key = (kind, name)
            calls[key] = 0
            modules[name].register_forward_pre_hook(
                lambda *_, key=key: calls.__setitem__(key, calls[key] + 1)
            )
    g = torch.Generator().manual_seed(4)
    clip = torch.randn(2, 2, 3, 64, 64, generator=g)
    labels = torch.randint(0, 8, (2, 2, 64, 64), generator=g)
    labels[:, :, :, :20] = 255
    loss, grads = _loss_and_grads(plain, clip, labels, preset)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, clip, labels, preset)
    for name in watched:  # every call ran again in the backward pass
        assert calls["checkpointed", name] == 2 * calls["plain", name] > 0, name
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 50
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpoint_activations_option_reaches_the_model(tmp_path):
    from themask.config import load_config
    from themask.engine import Trainer

    overrides = ["preset=themask_tiny_t2", "train.max_steps=1", "train.batch_size=1"]
    for flag in (False, True):
        cfg = load_config(None, [*overrides, f"train.checkpoint_activations={str(flag).lower()}"])
        # no data needed: the Trainer reads the train split when it is built, unless given
        # its own batches
        trainer = Trainer(
            cfg, tmp_path / str(flag), evaluate=False, progress=False, batches=lambda _: iter(())
        )
        assert trainer.model.pixel_decoder.checkpoint_layers is flag
        assert trainer.model.decoder.checkpoint_layers is flag


def test_bf16_keeps_the_pixel_decoder_projections_in_fp32():
    """1×1 conv + GroupNorm of the backbone maps stay float32 under a bf16 autocast (in bf16
    they flip near-tied pixels); the rest of the network does run in bf16."""
    model = _tiny().eval()
    dtypes = {}
    decoder = model.pixel_decoder
    watched = {"lateral": decoder.lateral, "mask_features": decoder.mask_features}
    watched.update({f"input_proj{i}": proj for i, proj in enumerate(decoder.input_proj)})
    for name, module in watched.items():
        module.register_forward_hook(
            lambda m, i, out, name=name: dtypes.__setitem__(name, out.dtype)
        )
    with torch.inference_mode(), torch.autocast(**BF16):
        model(torch.randn(1, 2, 3, 64, 64))
    assert dtypes.pop("mask_features") == torch.bfloat16
    assert dtypes == dict.fromkeys(dtypes, torch.float32) and len(dtypes) == 4


def test_predict_cli_amp_bf16_runs_the_network_under_a_bf16_autocast(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from themask.cli import main
    from themask.modeling.themask import THEMask
    from themask.weights import save_model

    save_model(_tiny(), tmp_path / "model.safetensors")
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        image = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
        Image.fromarray(image).save(frames / f"{index:05d}.png")
    seen = []
    original = THEMask.decode

    def spy(self, features, batch, frames):
        predictions = original(self, features, batch, frames)
        autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        dtypes = (features.mask_features.dtype, predictions.final.mask_logits.dtype)
        seen.append((autocast, *dtypes))
        return predictions

    monkeypatch.setattr(THEMask, "decode", spy)
    for amp in ("bf16", "off"):
        args = ["predict", str(frames), "--out", str(tmp_path / amp), "--amp", amp]
        args += ["--weights", str(tmp_path / "model.safetensors"), "--scale", "64", "48"]
        assert main([*args, "--device", "cpu"]) == 0
        assert len(list((tmp_path / amp / "labels").glob("*.png"))) == 3
    # bf16: backbone and pixel decoder in bf16, the transformer decoder in float32
    assert seen[:3] == [(torch.bfloat16, torch.bfloat16, torch.float32)] * 3
    assert seen[3:] == [(False, torch.float32, torch.float32)] * 3


def test_fused_adamw_steps_like_the_plain_one():
    """build_optimizer's fused AdamW against the plain per-parameter AdamW on the same groups:
    three steps with the same gradients give the same parameters within fp32 round-off."""
    from themask.config import TrainConfig
    from themask.optim import build_optimizer

    fast_model = _tiny()
    plain_model = copy.deepcopy(fast_model)
    start = {n: p.detach().clone() for n, p in fast_model.named_parameters()}
    fast = build_optimizer(fast_model, TrainConfig(lr=1e-3, weight_decay=0.05))
    name_of = {id(p): n for n, p in fast_model.named_parameters()}
    plain_params = dict(plain_model.named_parameters())
    groups = [
        {**g, "params": [plain_params[name_of[id(p)]] for p in g["params"]]}
        for g in fast.param_groups
    ]
    plain = torch.optim.AdamW(groups, foreach=False, fused=False)
    assert fast.defaults["fused"]
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        grads = {n: torch.randn(p.shape, generator=g) for n, p in start.items()}
        for model, optimizer in ((fast_model, fast), (plain_model, plain)):
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
            optimizer.step()
    for name, p in fast_model.named_parameters():
        assert (p - start[name]).abs().max() > 1e-4  # it moved
        torch.testing.assert_close(p, plain_params[name], rtol=0, atol=5e-7)


ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
MALLINFO = """
import ctypes, sys, torch
from themask.precision import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    keep_freed_memory()
before = libc.mallinfo2().hblkhd
x, y = torch.ones(6 << 20), torch.ones(100 << 20)  # 24 MiB, 400 MiB (above any mmap threshold)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_serves_large_tensors_from_the_heap():
    """glibc maps 24 and 400 MiB tensors with mmaps of their own (returned at once when freed,
    to be faulted in again next step); after ``keep_freed_memory`` both come from the heap."""
    mapped = {}
    for mode in ("plain", "keep"):
        command = [sys.executable, "-c", MALLINFO, mode]
        run = subprocess.run(command, capture_output=True, text=True, env=ENV)
        if "mallinfo2" in run.stderr:
            pytest.skip("glibc < 2.33: no mallinfo2")
        assert run.returncode == 0, run.stderr
        mapped[mode] = int(run.stdout)
    assert mapped["plain"] >= 424 << 20 and mapped["keep"] == 0, mapped


@pytest.mark.parametrize("preset", ["themask_tiny_t2", "mask2former_tiny"])
def test_criterion_on_the_model_gives_the_same_loss_and_gradients_through_mask_sources(preset):
    # The model's sets carry MaskSources in training: the loss reads matched rows from them. The
    # same predictions without sources (indexed rows, autograd through the full product) give
    # the same loss and parameter gradients.
    torch.manual_seed(0)
    model = build_model(preset, num_classes=4).train()
    clip, labels = torch.randn(1, 2, 3, 64, 64), torch.randint(0, 4, (1, 2, 64, 64))
    criterion = SetCriterion(preset_loss_config(preset), 4)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for strip in (False, True):
        torch.manual_seed(1)
        predictions = model(clip)
        assert all(s.source is not None for s in predictions.clip)
        if strip:
            for sets in (predictions.clip, predictions.frame or []):
                sets[:] = [PredictionSet(s.class_logits, s.mask_logits) for s in sets]
        torch.manual_seed(2)
        loss = criterion(predictions, labels).total
        results.append((loss, torch.autograd.grad(loss, params, allow_unused=True)))
    (loss, grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, plain_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("x86", "avx512_bf16", "amx", "native"),
    [
        (True, False, False, False),
        (True, True, False, True),
        (True, False, True, True),
        (False, False, False, True),  # torch's x86 checks say nothing about ARM
    ],
)
def test_bf16_on_a_cpu_without_bf16_units_warns_once(
    monkeypatch, caplog, x86, avx512_bf16, amx, native
):
    from themask import precision

    monkeypatch.setattr(precision, "X86", x86)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    precision.cpu_bf16_units.cache_clear()
    precision._warn_emulated_bf16.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="themask.precision"):
            for _ in range(3):
                assert precision.resolve_amp("bf16", "cpu") == torch.bfloat16
            precision.resolve_amp("off", "cpu")
        warnings = [r for r in caplog.records if "emulated" in r.getMessage()]
        assert len(warnings) == (0 if native else 1)
        assert (precision.cpu_bf16_units() is not False) is native
    finally:
        precision.cpu_bf16_units.cache_clear()
        precision._warn_emulated_bf16.cache_clear()
