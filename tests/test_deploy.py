"""ONNX export and the torch-free ONNX Runtime predictor (tiny presets)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from themask import __version__  # noqa: E402
from themask.cli import main  # noqa: E402
from themask.data.resize import MEAN, STD  # noqa: E402
from themask.data.vspw import DataError  # noqa: E402
from themask.deploy.export import export_decoder  # noqa: E402
from themask.deploy.runtime import (  # noqa: E402  # noqa: E402
    FEATURES,
    FORMAT,
    IMAGE,
    OnnxStreamingPredictor,
    read_manifest,
    resize_bilinear,
)
from themask.evaluation.predict import StreamingPredictor  # noqa: E402
from themask.evaluation.visualize import OverlayVideoWriter  # noqa: E402
from themask.modeling.build import build_model  # noqa: E402
from themask.weights import save_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny TAD model saved to weights, exported by the CLI at T = 2, plus a T = 1 decoder."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("onnx")
    model = build_model("themask_tiny_t2", num_classes=NUM_CLASSES).eval()
    weights = root / "model.safetensors"
    save_model(model, weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["export", "--weights", str(weights), "--out", str(root / "t2")]) == 0
        export_decoder(model, root / "decoder_t1.onnx", clip_len=1)
    finally:
        torch.set_num_threads(threads)
    return model, weights, root


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("clip_len", [1, 2])
@pytest.mark.parametrize("size", [(64, 96), (128, 64)])  # both differ from the traced 96×128
def test_onnx_scores_equal_pytorch(exported, one_thread, clip_len, size):
    model, _, root = exported
    encoder = _session(root / "t2" / "encoder.onnx")
    decoder = _session(root / ("t2/decoder.onnx" if clip_len == 2 else "decoder_t1.onnx"))
    frames = torch.randn(1, clip_len, 3, *size)
    with torch.no_grad():
        torch_features = model.encode(frames)
        reference = model.stride4_scores(model.decode(torch_features, 1, clip_len))[0]
    per_frame = [encoder.run(list(FEATURES), {IMAGE: frame[None].numpy()}) for frame in frames[0]]
    torch_parts = [torch_features.mask_features, *torch_features.multi_scale]
    for k, name in enumerate(FEATURES):
        stacked = np.concatenate([f[k] for f in per_frame])
        np.testing.assert_allclose(stacked, torch_parts[k].numpy(), atol=1e-4, err_msg=name)
    inputs = {name: np.concatenate([f[k] for f in per_frame]) for k, name in enumerate(FEATURES)}
    scores = decoder.run(None, inputs)[0]
    assert scores.shape == (clip_len, NUM_CLASSES, size[0] // 4, size[1] // 4)
    np.testing.assert_allclose(scores, reference.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "source,target", [((6, 10), (24, 40)), ((7, 5), (3, 11)), ((4, 4), (4, 9))]
)
def test_resize_bilinear_matches_torch_interpolate(source, target):
    scores = np.random.default_rng(0).standard_normal((3, *source)).astype(np.float32)
    expected = F.interpolate(
        torch.from_numpy(scores)[None], size=target, mode="bilinear", align_corners=False
    )[0]
    np.testing.assert_allclose(resize_bilinear(scores, target), expected.numpy(), atol=1e-5)


def test_onnx_streaming_predictor_reuses_features_like_pytorch(exported, one_thread):
    model, _, root = exported
    predictor = OnnxStreamingPredictor(root / "t2", step=1, threads=1)
    runs = {"encoder": 0}
    encoder_run = predictor.encoder.run

    def counting_run(*args, **kwargs):
        runs["encoder"] += 1
        return encoder_run(*args, **kwargs)

    predictor.encoder = type("Counting", (), {"run": staticmethod(counting_run)})()
    reference = StreamingPredictor(model, clip_len=2, step=1)
    frames = torch.randn(4, 3, 40, 56)  # not a multiple of 32: padded in push
    for frame in frames:
        scores = predictor.push(frame.numpy())
        assert scores.shape == (NUM_CLASSES, 40, 56)
        np.testing.assert_allclose(scores, reference.push(frame).numpy(), atol=1e-4)
    assert runs["encoder"] == 4  # every frame encoded once
    with pytest.raises(DataError, match="frame 4: network input 96×56"):
        predictor.push(torch.randn(3, 96, 56).numpy())


def test_manifest_round_trip(exported):
    model, _, root = exported
    manifest = read_manifest(root / "t2")
    written = json.loads((root / "t2" / "manifest.json").read_text())
    assert written["format"] == FORMAT and written["themask_version"] == __version__
    assert (manifest.num_classes, manifest.clip_len, manifest.opset) == (NUM_CLASSES, 2, 18)
    assert manifest.class_names == [str(i) for i in range(NUM_CLASSES)]
    assert np.asarray(manifest.palette).shape == (NUM_CLASSES, 3)
    assert (manifest.mean, manifest.std) == (list(MEAN), list(STD))
    assert manifest.model["decoder"] == "temporal" and manifest.size_divisor == 32
    copy = root / "copy"
    shutil.copytree(root / "t2", copy, dirs_exist_ok=True)
    manifest.clip_len = 7
    manifest.write(copy)
    assert read_manifest(copy) == manifest


def _write_video(path: Path, frames: int = 8, size=(60, 90)):
    """Smooth moving colour blobs, so labels are not dominated by near-ties of noise."""
    ys, xs = np.mgrid[: size[0], : size[1]]
    with OverlayVideoWriter(path, fps=10) as writer:
        for t in range(frames):
            picture = np.stack(
                [
                    128 + 100 * np.sin((xs + 4 * t) / 9.0),
                    128 + 100 * np.cos((ys - 2 * t) / 7.0),
                    128 + 100 * np.sin((xs + ys) / 13.0),
                ],
                axis=-1,
            )
            writer.write(np.clip(picture, 0, 255).astype(np.uint8))


TORCH_BLOCKED = (
    "import sys; sys.modules['torch'] = None\n"
    "from themask.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "assert not [m for m in sys.modules if m.split('.')[0] == 'torch' and sys.modules[m]]\n"
    "sys.exit(code)\n"
)


def _predict_without_torch(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", TORCH_BLOCKED, "predict", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_predict_onnx_without_torch_equals_pytorch_predict(exported, tmp_path, one_thread):
    _, weights, root = exported
    video = tmp_path / "clip.mp4"
    _write_video(video)
    common = ["--scale", "96", "64", "--step", "1", "--fps", "10"]
    torch_out, onnx_out = tmp_path / "torch", tmp_path / "onnx"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(weights),
                str(video),
                "--out",
                str(torch_out),
                "--clip-len",
                "2",
                "--device",
                "cpu",
                *common,
            ]
        )
        == 0
    )
    result = _predict_without_torch(
        "--onnx", str(root / "t2"), str(video), "--out", str(onnx_out), *common
    )
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (torch_out / "labels").iterdir())
    assert len(names) == 8 and names == sorted(p.name for p in (onnx_out / "labels").iterdir())
    expected = np.stack([np.array(Image.open(torch_out / "labels" / n)) for n in names])
    labels = np.stack([np.array(Image.open(onnx_out / "labels" / n)) for n in names])
    assert len(np.unique(expected)) > 1  # a non-trivial segmentation
    assert (labels == expected).mean() >= 0.9999
    assert (
        Image.open(onnx_out / "labels" / names[0]).getpalette()
        == Image.open(torch_out / "labels" / names[0]).getpalette()
    )
    assert sorted(p.name for p in (onnx_out / "overlays").iterdir()) == names  # PNG as --weights
    import av

    with av.open(str(onnx_out / "overlay.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8


@pytest.fixture
def fresh_log_handler():
    """Let ``main`` attach its log handler to this test's (captured) stderr, then drop it."""
    import logging

    root = logging.getLogger()
    saved = [h for h in root.handlers if getattr(h, "_themask", False)]
    for handler in saved:
        root.removeHandler(handler)
    yield
    for handler in [h for h in root.handlers if getattr(h, "_themask", False)]:
        root.removeHandler(handler)
    for handler in saved:
        root.addHandler(handler)


LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


def _one_line_error(capsys, code):
    """The command's error: exit status 2 and one stderr line besides log records."""
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not LOG_RECORD.match(line)]
    assert len(lines) == 1 and lines[0].startswith("themask "), err
    return lines[0]


def test_export_rejects_weights_that_do_not_load(tmp_path, capsys, fresh_log_handler):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code = main(["export", "--weights", str(bad), "--out", str(tmp_path / "out")])
    assert str(bad) in _one_line_error(capsys, code)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("preset,clip_len", [("mask2former_tiny", 2), ("themask_tiny_t2", 0)])
def test_export_rejects_a_clip_length_the_model_cannot_take(
    tmp_path, capsys, fresh_log_handler, preset, clip_len
):
    weights = tmp_path / "m.safetensors"
    save_model(build_model(preset, num_classes=NUM_CLASSES), weights)
    code = main(
        [
            "export",
            "--weights",
            str(weights),
            "--out",
            str(tmp_path / "out"),
            "--clip-len",
            str(clip_len),
        ]
    )
    assert "--clip-len" in _one_line_error(capsys, code)
    assert not (tmp_path / "out" / "encoder.onnx").exists()


def test_predict_onnx_bad_inputs_are_one_line_errors(exported, tmp_path, capsys, fresh_log_handler):
    _, _, root = exported
    video = tmp_path / "clip.mp4"
    _write_video(video, frames=2)
    out = ["--out", str(tmp_path / "out")]

    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["predict", "--onnx", str(empty), str(video), *out])
    assert str(empty / "manifest.json") in _one_line_error(capsys, code)

    old = tmp_path / "old"
    shutil.copytree(root / "t2", old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": FORMAT + 1}))
    code = main(["predict", "--onnx", str(old), str(video), *out])
    assert "format" in _one_line_error(capsys, code)

    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"\x00 this is not a video" * 50)
    code = main(["predict", "--onnx", str(root / "t2"), str(garbage), *out])
    assert str(garbage) in _one_line_error(capsys, code)

    code = main(["predict", "--onnx", str(root / "t2"), str(video), *out, "--clip-len", "3"])
    assert "--clip-len 3" in _one_line_error(capsys, code)


@pytest.mark.parametrize(
    "flag, value, why",
    [
        ("--config", "toy/themask_toy", "own config"),
        ("--amp", "auto", "fp32"),
        ("--device", "cpu", "CPU"),
    ],
)
def test_predict_onnx_refuses_the_torch_only_flags(
    exported, tmp_path, capsys, fresh_log_handler, flag, value, why
):
    """--config, --amp and --device would be ignored with --onnx: a one-line error instead."""
    _, _, root = exported
    video = tmp_path / "clip.mp4"
    _write_video(video, frames=2)
    out = tmp_path / "out"
    code = main(["predict", "--onnx", str(root / "t2"), str(video), "--out", str(out), flag, value])
    line = _one_line_error(capsys, code)
    assert f"{flag} does not apply to --onnx" in line and why in line
    assert not out.exists()
