"""Issue 10 through the CLI: interrupts keep the work, bad input is one line with exit 2,
overrides anywhere, shipped configs by name, predict on odd inputs, consistent output."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from themask.cli import main
from themask.data.toy import make_toy_dataset
from themask.evaluation.metrics import summarize_metrics
from themask.evaluation.visualize import OverlayVideoWriter, overlay
from themask.modeling.build import build_model
from themask.weights import read_test_scale, save_model

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "loss.num_points=32",
    "data.scale=[64, 48]",
    "data.crop_size=[32, 32]",
    "data.num_workers=0",
    "train.batch_size=2",
    "train.log_interval=1",
    "eval.max_videos=1",
]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return make_toy_dataset(root, num_train=3, num_val=1, num_frames=5, size=(48, 64))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _one_line_error(err: str, command: str, *names: str) -> None:
    """``err`` (stderr) holds one line besides INFO log records and progress bars: the
    error, naming ``names``."""
    lines = [
        line
        for line in err.strip().splitlines()
        if line and not re.match(r"\d\d:\d\d:\d\d INFO ", line) and "%|" not in line
    ]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"themask {command}: ") and "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


# --------------------------------------------------------------------------- overrides, threads


def test_overrides_after_options_for_train_and_eval(toy_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "toy/themask_toy",
            "--out",
            str(out),
            "--threads",
            "2",
            f"data.root={toy_root}",
            *TINY,
            "train.max_steps=2",
        ]
    )
    assert code == 0 and torch.get_num_threads() == 2  # --threads applied
    printed = capsys.readouterr().out
    # the final evaluation, in percent like the eval table, undefined values as "-"
    summary = next(line for line in printed.splitlines() if line.startswith("eval (%): "))
    miou = float(summary.split("mIoU ")[1].split(",")[0])
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert miou == pytest.approx(100 * record[-1]["mIoU"], abs=0.006)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 2

    weights = out / "model.safetensors"
    # the README's example: options first, the override last
    code = main(
        [
            "eval",
            "toy/themask_toy",
            "--weights",
            str(weights),
            "--clip-len",
            "2",
            "--json",
            str(tmp_path / "m.json"),
            "--threads",
            "1",
            f"data.root={toy_root}",
            "eval.max_videos=1",
        ]
    )
    assert code == 0
    assert json.loads((tmp_path / "m.json").read_text())["clip_len"] == 2
    with pytest.raises(SystemExit):  # a command without overrides still refuses key=value
        main(["predict", "x.mp4", "--weights", str(weights), "--out", "o", "a=b"])


def test_summarize_metrics_percent_and_dash():
    assert summarize_metrics({"mIoU": 0.4123, "mVC16": float("nan"), "num_videos": 3}) == (
        "mIoU 41.23, mVC16 -"
    )


# --------------------------------------------------------------------------- shipped configs


def test_shipped_config_by_name_and_listing(capsys):
    from themask.config import load_config

    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.split()
    assert "vspw/themask_mit_b1_t1" in listed and "toy/themask_toy" in listed
    a = load_config("vspw/themask_mit_b1_t1")
    assert a == load_config("vspw/themask_mit_b1_t1.yaml")
    assert a.preset == "themask_mit_b1_t1"
    assert main(["train", "vspw/no_such_config"]) == 2
    _one_line_error(capsys.readouterr().err, "train", "vspw/no_such_config", "toy/themask_toy")


def test_shipped_config_trains_outside_the_checkout_with_a_plain_install(toy_root, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-compile", "--target", str(target), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**_env(), "PYTHONPATH": str(target)}
    run = (  # the installed copy, not the checkout, is the one imported
        "import sys, themask; from themask.cli import main; "
        "assert themask.__file__.startswith(sys.argv[1]), themask.__file__; "
        "sys.exit(main(sys.argv[2:]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", run, str(target), "train", "toy/themask_toy",
         f"data.root={toy_root}", *TINY, "train.max_steps=1", "--no-eval", "--out", "run"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (elsewhere / "run" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- bad input


def _bad_weights(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.safetensors"
    save_model(build_model("themask_tiny_t1", num_classes=8), good)
    files = {"text": tmp_path / "notes.txt", "text_pth": tmp_path / "notes.pth"}
    files["text"].write_text("not weights\n")
    files["text_pth"].write_text("not weights either\n")
    files["truncated"] = tmp_path / "cut.safetensors"
    files["truncated"].write_bytes(good.read_bytes()[:5000])
    files["pickle"] = tmp_path / "pickled.pth"
    torch.save({"state_dict": load_file(good), "meta": {"obj": pickle.PickleError()}},
               files["pickle"])  # fmt: skip
    return files


def test_bad_weights_files_are_one_line_and_exit_2(tmp_path, capsys):
    for kind, path in _bad_weights(tmp_path).items():
        code = main(["predict", "x.mp4", "--weights", str(path), "--out", str(tmp_path / "o")])
        assert code == 2, kind
        _one_line_error(capsys.readouterr().err, "predict", path)
    code = main(["eval", "vspw/themask_mit_b0_t1", "--weights", str(tmp_path / "nothing.pth")])
    assert code == 2
    _one_line_error(capsys.readouterr().err, "eval", "nothing.pth")
    # -v adds the traceback
    assert main(["-v", "predict", "x.mp4", "--weights", str(path), "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("themask predict: ")


def test_malformed_yaml_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text("train: {max_steps: [1\n")
    assert main(["train", str(config)]) == 2
    _one_line_error(capsys.readouterr().err, "train", config, "not valid YAML")


def test_class_count_error_exit_2_with_prefix(tmp_path, capsys):
    weights = tmp_path / "toy8.safetensors"
    save_model(build_model("themask_tiny_t1", num_classes=8), weights)
    assert main(["eval", "vspw/themask_mit_b0_t1", "--weights", str(weights)]) == 2
    _one_line_error(capsys.readouterr().err, "eval", weights, "8 classes")


def test_training_user_errors_leave_no_run_directory(toy_root, tmp_path, capsys):
    text = tmp_path / "backbone.pth"
    text.write_text("hello")
    cases = {
        "pretrained_backbone": ([f"data.root={toy_root}", f"pretrained_backbone={text}"], text),
        "data.root": ([f"data.root={tmp_path / 'missing'}"], tmp_path / "missing"),
    }
    for name, (overrides, named) in cases.items():
        out = tmp_path / f"run_{name}"
        code = main(["train", "toy/themask_toy", "--out", str(out), *TINY, *overrides])
        assert code == 2, name
        _one_line_error(capsys.readouterr().err, "train", named)
        assert not out.exists(), name


def test_rgb_mask_in_a_loader_worker_is_one_line(tmp_path):
    root = make_toy_dataset(tmp_path / "toy", num_train=1, num_val=1, num_frames=4, size=(48, 64))
    video = (root / "train.txt").read_text().split()[0]
    for mask in (root / "data" / video / "mask").iterdir():
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(mask)
    out = subprocess.run(
        [sys.executable, "-m", "themask", "train", "toy/themask_toy", f"data.root={root}", *TINY,
         "data.num_workers=1", "train.max_steps=1", "--no-eval", "--out", str(tmp_path / "run")],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("themask train: ") and "mode RGB" in last and video in last
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------- interrupts, resume

_INTERRUPT_SCRIPT = """
import os, signal, sys
from themask.cli import main
from themask.engine import Trainer

signum, count, at_step = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
original = Trainer._optimizer_step

def step_and_signal(self):
    norm = original(self)
    if self.step + 1 == at_step:  # during the step that ends at `at_step`
        for _ in range(count):  # to the process group, loader workers included, as Ctrl-C
            os.killpg(os.getpgrp(), signum)
    return norm

Trainer._optimizer_step = step_and_signal
sys.exit(main(sys.argv[4:]))
"""


def _interrupted_run(tmp_path, args, signum, count=1, at_step=2):
    script = tmp_path / "interrupt.py"
    script.write_text(textwrap.dedent(_INTERRUPT_SCRIPT))
    return subprocess.run(
        [sys.executable, str(script), str(signum), str(count), str(at_step), *args],
        env=_env(), capture_output=True, text=True, timeout=300, start_new_session=True,
    )  # fmt: skip


@pytest.mark.parametrize("signum", [2, 15])  # SIGINT, SIGTERM
def test_signal_checkpoints_and_resume_continues_exactly(toy_root, tmp_path, signum):
    steps = 4
    train = ["train", "toy/themask_toy", f"data.root={toy_root}", *TINY, "--no-eval",
             f"train.max_steps={steps}", "train.checkpoint_interval=100",
             "model.drop_path_rate=0.1"]  # fmt: skip
    out = tmp_path / "run"
    # a loader worker here: it must survive the signal and end with the run (no hang)
    done = _interrupted_run(tmp_path, [*train, "data.num_workers=1", "--out", str(out)], signum)
    assert done.returncode == 128 + signum, done.stderr
    assert "Traceback" not in done.stderr and "--resume" in done.stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and not (out / "model.safetensors").exists()
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"")  # as a SIGKILL mid-write leaves it
    assert main([*train, "--out", str(out), "--resume"]) == 0  # workers 1 -> 0: harmless
    assert not list(out.glob(".*.tmp"))
    assert "data.num_workers" in (out / "resume_changes.jsonl").read_text()
    assert main([*train, "--out", str(tmp_path / "straight")]) == 0
    resumed = load_file(out / "model.safetensors")
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)


def test_second_sigint_stops_at_once(toy_root, tmp_path):
    train = ["train", "toy/themask_toy", f"data.root={toy_root}", *TINY, "--no-eval",
             "train.max_steps=4", "train.checkpoint_interval=100"]  # fmt: skip
    done = _interrupted_run(tmp_path, [*train, "--out", str(tmp_path / "run")], 2, count=2)
    assert done.returncode == 130
    assert done.stderr.strip().splitlines()[-1] == "themask train: interrupted"
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # stopped before any save


def test_resume_refuses_breaking_changes_and_records_harmless_ones(toy_root, tmp_path, capsys):
    out = tmp_path / "run"
    train = ["train", "toy/themask_toy", f"data.root={toy_root}", *TINY, "--no-eval",
             "--out", str(out)]  # fmt: skip
    assert main([*train, "train.max_steps=1"]) == 0
    original = (out / "config.yaml").read_text()
    capsys.readouterr()
    assert main([*train, "train.max_steps=2", "train.batch_size=4", "--resume"]) == 2
    _one_line_error(capsys.readouterr().err, "train", "train.batch_size: 2 -> 4")
    assert main([*train, "train.max_steps=2", "train.log_interval=5", "--resume"]) == 0
    assert (out / "config.yaml").read_text() == original
    record = json.loads((out / "resume_changes.jsonl").read_text())
    assert record == {
        "step": 1,
        "changes": {"train.log_interval": [1, 5], "train.max_steps": [1, 2]},
    }
    capsys.readouterr()
    assert main([*train, "train.max_steps=1", "train.log_interval=5", "--resume"]) == 2
    _one_line_error(capsys.readouterr().err, "train", "train.max_steps: 1 is not above step 2")


# --------------------------------------------------------------------------- predict


def _tiny_weights(path: Path, scale=None) -> Path:
    torch.manual_seed(0)
    save_model(build_model("themask_tiny_t2", num_classes=8), path, test_scale=scale)
    return path


def test_predict_frames_of_different_sizes(tmp_path):
    weights = _tiny_weights(tmp_path / "w.safetensors")
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (48, 64), "b": (48, 64), "c": (40, 40), "d": (64, 48), "e": (48, 64)}
    for stem, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(folder / f"{stem}.png")
    out = tmp_path / "out"
    args = ["predict", str(folder), "--weights", str(weights), "--out", str(out)]
    assert main([*args, "--scale", "64", "48"]) == 0
    for stem, (h, w) in sizes.items():
        labels = np.asarray(Image.open(out / "labels" / f"{stem}.png"))
        assert labels.shape == (h, w)
        frame = np.asarray(Image.open(folder / f"{stem}.png").convert("RGB"))
        shown = np.asarray(Image.open(out / "overlays" / f"{stem}.png"))
        # the legend sits beside the picture: the overlay itself is untouched
        palette = np.asarray(Image.open(out / "labels" / f"{stem}.png").getpalette()[:24])
        expected = overlay(frame, labels, palette.reshape(8, 3).astype(np.uint8))
        assert shown.shape[0] == h and shown.shape[1] > w
        assert np.array_equal(shown[:, :w], expected)
    with av.open(str(out / "overlay.mp4")) as container:
        video = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    assert len(video) == len(sizes) and video[0].shape[0] == 48
    assert float(rate) == 15.0  # frame folders: --fps default


def test_eval_names_a_video_whose_frames_differ_in_size(tmp_path, capsys):
    root = make_toy_dataset(tmp_path / "toy", num_train=1, num_val=1, num_frames=4, size=(48, 64))
    video = (root / "val.txt").read_text().split()[0]
    for folder in ("origin", "mask"):
        for path in sorted((root / "data" / video / folder).iterdir())[2:]:
            image = Image.open(path)
            image.resize((40, 40), Image.NEAREST).save(path)
    weights = _tiny_weights(tmp_path / "w.safetensors")
    code = main(["eval", "toy/themask_toy", "--weights", str(weights), f"data.root={root}",
                 "--clip-len", "2"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    _one_line_error(err, "eval", f"video {video}", "is 40x40, earlier frames 64x48")


def test_predict_step_below_one_is_one_line_with_either_engine(tmp_path, capsys):
    weights = _tiny_weights(tmp_path / "w.safetensors")
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(folder / "a.png")
    for source in (["--weights", str(weights)], ["--onnx", str(tmp_path)]):
        args = ["predict", str(folder), *source, "--out", str(tmp_path / "o"), "--step", "0"]
        assert main(args) == 2
        _one_line_error(capsys.readouterr().err, "predict", "--step", ">= 1")
    assert not (tmp_path / "o").exists()


def test_predict_keeps_the_frame_rate_and_uses_the_stored_scale(tmp_path, caplog):
    weights = _tiny_weights(tmp_path / "w.safetensors", scale=(64, 48))
    assert read_test_scale(weights) == (64, 48)
    clip = tmp_path / "clip.mp4"
    with OverlayVideoWriter(clip, fps=30) as writer:
        for value in range(3):
            writer.write(np.full((96, 128, 3), 60 * value, np.uint8))
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="themask.commands.predict"):
        assert main(["predict", str(clip), "--weights", str(weights), "--out", str(out)]) == 0
    assert "test scale (64, 48)" in caplog.text
    with av.open(str(out / "overlay.mp4")) as container:
        assert float(container.streams.video[0].average_rate) == 30.0


# --------------------------------------------------------------------------- consistency


def test_convert_names_the_tiny_preset(tmp_path, capsys):
    weights = _tiny_weights(tmp_path / "w.safetensors")
    assert main(["convert", str(weights), str(tmp_path / "c.safetensors")]) == 0
    assert "preset themask_tiny_t2, 8 classes" in capsys.readouterr().out


def test_bench_help_is_plain_text():
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
    text = subprocess.run(
        [sys.executable, str(bench), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "``" not in text and "brief" not in text and "--mode train" in text
