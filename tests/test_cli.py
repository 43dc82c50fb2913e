from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from themask.cli import COMMAND_MODULES, SHAPE_CACHES, build_parser, main
from themask.data.toy import make_toy_dataset
from themask.evaluation.visualize import plot_loss_curve
from themask.logger import MetricWriter, read_metrics, setup_logging

# arguments each of our commands must explain in its --help
EXPECTED = {
    "train": ["CONFIG", "key=value", "--out", "--resume", "--init-from", "--device", "--no-eval"],
    "demo": ["--out", "--config", "--baseline", "key=value"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no sub-commands")


COMMANDS = sorted(_subparsers(build_parser()))


def test_every_command_is_registered():
    assert {"train", "demo"} <= set(COMMAND_MODULES)
    assert len(COMMANDS) == len(COMMAND_MODULES)
    assert {name.replace("-", "_") for name in COMMANDS} == set(COMMAND_MODULES)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_zero_and_lists_arguments(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"themask {command}" in text
    sub = _subparsers(build_parser())[command]
    for action in sub._actions:
        for option in action.option_strings:
            assert option in text, f"{command} --help does not mention {option}"
        if not action.option_strings and action.metavar:
            assert str(action.metavar) in text
    for word in EXPECTED.get(command, []):
        assert word in text


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "themask", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--resume" in out.stdout


def test_train_command_writes_the_run_directory(tmp_path):
    root = make_toy_dataset(tmp_path / "toy", num_train=2, num_val=1, num_frames=5, size=(32, 32))
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "preset: mask2former_tiny\n"
        "loss: {num_points: 32}\n"
        "data: {dilation: [0], scale: [32, 32], crop_size: [32, 32], num_workers: 0}\n"
        "train: {max_steps: 2, batch_size: 2, log_interval: 1}\n"
    )
    out = tmp_path / "run"
    code = main(["train", str(config), f"data.root={root}", "--out", str(out), "--no-eval"])
    assert code == 0
    for name in ("config.yaml", "run_info.json", "checkpoint.pt", "model.safetensors"):
        assert (out / name).is_file(), name
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["root"] == str(root) and saved["preset"] == "mask2former_tiny"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")] == [1, 2]
    assert list((out / "tensorboard").iterdir())  # event files
    assert json.loads((out / "run_info.json").read_text())["world_size"] == 1

    # a second run into the same directory must not overwrite it; --resume continues it
    args = ["train", str(config), f"data.root={root}"]
    assert main([*args, "--out", str(out), "--no-eval"]) == 2
    assert main([*args, "train.max_steps=3", "--out", str(out), "--no-eval", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl", "train")] == [1, 2, 3]
    assert main(["train", str(config), "--out", str(tmp_path / "none"), "--resume"]) == 2


def test_train_command_rejects_unknown_override(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train: {max_steps: 1}\n")
    code = main(["train", str(config), "train.max_stepz=3", "--out", str(tmp_path / "r")])
    assert code == 2
    error = capsys.readouterr().err
    assert "train.max_stepz" in error and "max_steps" in error
    assert not (tmp_path / "r").exists()


def test_loss_curve_png(tmp_path):
    writer = MetricWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        writer.write(step, {"loss": 10.0 / step, "matched_fraction_round1": 0.1})
    writer.write(5, {"mIoU": 0.5}, tag="eval")
    writer.close()
    plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png", title="toy")
    image = Image.open(tmp_path / "loss.png")
    assert image.size == (700, 400)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 10  # something was drawn


def test_demo_writes_everything_it_promises(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--train-videos",
            "2",
            "train.max_steps=2",
            "data.crop_size=[32, 32]",
            "loss.num_points=32",
            "eval.max_videos=1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "Weighted IoU" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0.0 <= metrics["metrics"]["mIoU"] <= 1.0
    assert len((out / "toy_data" / "train.txt").read_text().split()) == 2
    video = (out / "toy_data" / "val.txt").read_text().split()[0]
    frames = sorted((out / "toy_data" / "data" / video / "origin").iterdir())
    overlays = sorted((out / "overlays" / video).iterdir())
    assert [p.stem for p in overlays] == [p.stem for p in frames]
    panel = Image.open(overlays[0])
    legend_width = panel.size[0] - 2 * (2 * 128 + 4)  # ground truth | prediction | legend
    assert panel.size[1] == 2 * 96 and 40 < legend_width < 200
    assert (out / "overlay.mp4").stat().st_size > 0
    assert Image.open(out / "loss_curve.png").size == (700, 400)
    assert (out / "run" / "model.safetensors").is_file()


def test_setup_logging_again_replaces_its_own_handlers_only(tmp_path):
    """A second call (a second run in one process) closes the first call's log file: that
    file stops growing, the new one gets each record once; the user's handler stays."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    own = logging.NullHandler()
    root.addHandler(own)
    log = logging.getLogger("themask.test_cli")
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    try:
        first_handler = setup_logging(log_file=first)
        log.info("record one")
        setup_logging(log_file=second)
        size = first.stat().st_size
        log.info("record two")
        log.warning("record three")
        assert first.stat().st_size == size and "record one" in first.read_text()
        assert first_handler is not None and first_handler.stream is None  # closed
        lines = second.read_text().splitlines()
        assert [line.rsplit(": ", 1)[1] for line in lines] == ["record two", "record three"]
        assert own in root.handlers
        files = [getattr(h, "baseFilename", None) for h in root.handlers]
        assert str(first) not in files and files.count(str(second)) == 1
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
        for handler in before:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def test_building_the_cli_imports_no_torch():
    """Command modules import torch inside their functions: `--help` stays fast and
    `themask predict --onnx` runs where torch is not installed."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from themask.cli import build_parser; build_parser()\n"
        "assert not [m for m in sys.modules if m.startswith('torch') and sys.modules[m]]\n"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("command", "user", "expected"),
    [
        ("predict", None, "256"),
        ("eval", None, "256"),
        ("predict", "1024", "1024"),
        ("train", None, None),
    ],
)
def test_eval_and_predict_cap_the_onednn_shape_caches(
    tmp_path, monkeypatch, command, user, expected
):
    """Set before any oneDNN op (tests/test_bench.py measures what the cap bounds); a user's own
    setting wins; training keeps the libraries' defaults (its working set needs more)."""
    for name in SHAPE_CACHES:
        monkeypatch.setenv(name, user or "")  # recorded: the test's end restores the variable
        if user is None:
            monkeypatch.delenv(name)
    missing = str(tmp_path / "missing.safetensors")
    argv = {
        "predict": [
            "predict",
            str(tmp_path / "missing.mp4"),
            "--weights",
            missing,
            "--out",
            str(tmp_path / "o"),
        ],
        "eval": ["eval", "themask_tiny_t2", "--weights", missing, f"data.root={tmp_path}"],
        "train": ["train", str(tmp_path / "missing.yaml")],
    }[command]
    assert main(argv) == 2  # the missing file, after the setting
    assert [os.environ.get(name) for name in SHAPE_CACHES] == [expected, expected]
