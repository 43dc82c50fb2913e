"""CPU-side checks of the CUDA-facing behaviour: precision defaults, the step's scalar log,
skipped fp16 steps, the deformable-attention normaliser and ``demo --device``."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from themask.config import ConfigError, RunConfig
from themask.engine import StepWindow, window_means
from themask.modeling.ms_deform_attn import MSDeformAttn, offset_normaliser
from themask.precision import autocast_context, resolve_amp

pytestmark = pytest.mark.usefixtures("one_thread")


def test_amp_auto_is_fp32_on_cpu_and_explicit_modes_resolve():
    assert RunConfig().train.amp == "auto" and RunConfig().eval.amp == "auto"
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp(None, cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_amp(torch.float16, cpu) is torch.float16
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_amp("fp8", cpu)
    with autocast_context("auto", cpu):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context("bf16", cpu):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_amp_off_from_yaml_and_overrides(tmp_path):
    """YAML 1.1 reads a bare ``off`` as False; the config must still mean the mode "off"."""
    from themask.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("train:\n  amp: off\neval:\n  amp: off\n")
    cfg = load_config(path, [])
    assert (cfg.train.amp, cfg.eval.amp) == ("off", "off")
    assert load_config(None, ["train.amp=off"]).train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp: True is not one of"):
        load_config(None, ["train.amp=on"])


def test_vspw_configs_say_their_precision():
    from pathlib import Path

    import yaml

    from themask.config import load_config

    folder = Path(__file__).resolve().parents[1] / "themask" / "configs" / "vspw"
    for path in sorted(folder.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert raw["train"]["amp"] == "auto" and raw["eval"]["amp"] == "auto", path.name
        assert load_config(path, []).train.amp == "auto"


def test_step_window_reads_tensors_and_floats_per_step():
    window = StepWindow()
    window.append({"loss": torch.tensor(2.0), "grad_norm": torch.tensor(0.5), "fraction": 0.25})
    window.append({"loss": torch.tensor(4.0), "grad_norm": torch.tensor(1.5), "fraction": 0.75})
    rows = window.read()
    assert rows == [
        {"grad_norm": 0.5, "loss": 2.0, "fraction": 0.25},
        {"grad_norm": 1.5, "loss": 4.0, "fraction": 0.75},
    ]
    assert len(window) == 0  # cleared
    means = window_means(rows, count_skipped=False)
    assert means == {"grad_norm": 1.0, "loss": 3.0, "fraction": 0.5}


def test_skipped_fp16_steps_are_counted_not_averaged():
    rows = [
        {"loss": 1.0, "grad_norm": 2.0},
        {"loss": 9.0, "grad_norm": math.inf},  # the scaler skipped this step
        {"loss": 3.0, "grad_norm": 4.0},
        {"loss": 5.0, "grad_norm": math.nan},
    ]
    means = window_means(rows, count_skipped=True)
    assert means == {"skipped_steps": 2.0, "loss": 2.0, "grad_norm": 3.0}
    all_skipped = window_means(rows[1:2], count_skipped=True)
    assert all_skipped["skipped_steps"] == 1.0 and math.isnan(all_skipped["loss"])


def test_trainer_accepts_tensor_terms_and_rejects_fp16_on_cpu(tmp_path):
    from test_engine import _mean_loss, _synthetic_batches, _tiny_cfg

    from themask.engine import Trainer
    from themask.logger import read_metrics

    def loss_fn(model, frames, labels, *, step):
        total, _ = _mean_loss(model, frames, labels, step=step)
        return total, {"as_tensor": total.detach() * 2, "as_float": 0.5}

    cfg = _tiny_cfg("train.max_steps=2", "train.log_interval=2")
    trainer = Trainer(
        cfg,
        tmp_path,
        batches=_synthetic_batches(),
        loss_fn=loss_fn,
        evaluate=False,
        progress=False,
    )
    losses = trainer.train().losses
    (record,) = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert record["as_tensor"] == pytest.approx(losses[0] + losses[1])  # mean of 2·loss
    assert record["as_float"] == 0.5 and math.isfinite(record["grad_norm"])
    assert "skipped_steps" not in record  # no grad scaler without fp16
    with pytest.raises(ConfigError, match="train.amp: amp=fp16 needs a CUDA"):
        Trainer(
            _tiny_cfg("train.amp=fp16"),
            tmp_path / "fp16",
            batches=_synthetic_batches(),
            evaluate=False,
            progress=False,
        )


def test_offset_normaliser_and_module_output_unchanged():
    shapes = [(3, 5), (6, 10), (12, 20)]
    expected = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    assert torch.equal(offset_normaliser(shapes, device="cpu", dtype=torch.float32), expected)
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=16, num_heads=2, num_levels=3, num_points=2)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    query = torch.randn(2, 7, 16)
    value = torch.randn(2, sum(h * w for h, w in shapes), 16)
    ref = torch.rand(2, 7, 2)
    built_here = attn(query, ref, value, shapes)
    passed_in = attn(query, ref, value, shapes, expected)
    assert torch.equal(built_here, passed_in)


def test_train_cli_fp16_on_cpu_is_one_line_and_status_2(tmp_path, capsys):
    from themask.cli import main

    config = tmp_path / "run.yaml"
    config.write_text("preset: themask_tiny_t2\n")
    status = main(
        ["train", str(config), "train.amp=fp16", "--device", "cpu", "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == ["themask train: train.amp: amp=fp16 needs a CUDA device; use bf16 or off on CPU"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a CPU-only machine")
def test_demo_device_cuda_without_cuda_is_one_line_and_status_2(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "themask", "demo", "--device", "cuda", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == "themask demo: --device cuda: no CUDA device is available"
    assert not any(tmp_path.iterdir())  # nothing written
