"""Sliding-window prediction with feature reuse (tiny model), visualisation, ``predict`` CLI."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from naive import naive_sliding_windows
from PIL import Image

from themask.evaluation.predict import StreamingPredictor, predict_video
from themask.evaluation.visualize import (
    OverlayVideoWriter,
    colorize,
    draw_legend,
    overlay,
    save_label_png,
)
from themask.modeling.build import build_model

PALETTE = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200], [90, 90, 90], [10, 20, 30]], np.uint8)


def _count_encoded_frames(model):
    counter = {"frames": 0, "calls": 0}
    encode = model.encode

    def counting_encode(frames):
        counter["frames"] += frames.shape[0] * frames.shape[1]
        counter["calls"] += 1
        return encode(frames)

    model.encode = counting_encode
    return counter


@pytest.mark.parametrize("clip_len,step", [(2, 3), (3, 1)])
def test_feature_reuse_equals_recomputing_each_window(clip_len, step):
    torch.manual_seed(0)
    model = build_model("themask_tiny_t2", num_classes=5).eval()
    frames = torch.randn(5, 3, 40, 56)  # not a multiple of 32: padding inside encode
    windows = naive_sliding_windows(5, clip_len, step=step)
    reference = [model(frames[w][None])[0, -1] for w in windows]
    counter = _count_encoded_frames(model)
    predictor = StreamingPredictor(model, clip_len=clip_len, step=step)
    for t in range(len(frames)):
        scores = predictor.push(frames[t])
        assert scores.shape == (5, 40, 56)
        torch.testing.assert_close(scores, reference[t], rtol=1e-4, atol=1e-5)
    assert counter == {"frames": 5, "calls": 5}  # every frame encoded exactly once


def test_single_frame_model_predicts_frames_independently():
    torch.manual_seed(1)
    model = build_model("themask_tiny_t1", num_classes=5).eval()
    frames = torch.randn(3, 3, 32, 32)
    predictor = StreamingPredictor(model, clip_len=4)
    assert predictor.windows.clip_len == 1
    for t in range(3):
        torch.testing.assert_close(
            predictor.push(frames[t]), model(frames[t][None, None])[0, 0], rtol=1e-4, atol=1e-5
        )


def test_predict_video_resizes_scores_to_each_frame():
    torch.manual_seed(2)
    model = build_model("themask_tiny_t2", num_classes=5).train()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, size=(30, 45, 3), dtype=np.uint8) for _ in range(4)]

    def half_size(clip):  # network input at half resolution, as a test transform does
        x = torch.from_numpy(np.stack(clip)).permute(0, 3, 1, 2).float() / 255
        return F.interpolate(x, size=(15, 22), mode="bilinear", align_corners=False)

    results = list(
        predict_video(model, iter(frames), clip_len=2, transform=half_size, device="cpu", step=1)
    )
    assert model.training  # restored
    model.eval()
    inputs = torch.cat([half_size([f]) for f in frames])
    assert len(results) == len(frames)
    for t, (frame, labels) in enumerate(results):
        window = naive_sliding_windows(4, 2, step=1)[t]
        scores = model(inputs[window][None])[0, -1]
        big = F.interpolate(scores[None], size=(30, 45), mode="bilinear", align_corners=False)
        expected = big[0].argmax(dim=0).numpy()
        assert frame is frames[t]
        assert (labels == expected).mean() > 0.999  # float ties aside


def test_colorize_overlay_and_label_png(tmp_path):
    labels = np.array([[0, 1, 255], [4, 2, 3]])
    colours = colorize(labels, PALETTE)
    assert tuple(colorize(np.array([[-1, 5]]), PALETTE, ignore_color=(1, 2, 3))[0, 0]) == (1, 2, 3)
    for y in range(2):
        for x in range(3):
            expected = PALETTE[labels[y, x]] if labels[y, x] < 5 else (0, 0, 0)
            assert tuple(colours[y, x]) == tuple(expected)
    frame = np.full((2, 3, 3), 100, np.uint8)
    blended = overlay(frame, labels, PALETTE, alpha=0.25)
    assert tuple(blended[0, 0]) == (125, 75, 75)  # 0.75·100 + 0.25·(200, 0, 0)
    assert tuple(blended[0, 2]) == (100, 100, 100)  # ignore keeps the frame
    legend = draw_legend(np.zeros((60, 80, 3), np.uint8), [0, 2], list("abcde"), PALETTE)
    assert legend.shape == (60, 80, 3) and (legend == PALETTE[0]).all(axis=-1).any()

    save_label_png(labels[:, :2], tmp_path / "v" / "f.png", PALETTE)
    image = Image.open(tmp_path / "v" / "f.png")
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), labels[:, :2])
    assert image.getpalette()[:6] == [200, 0, 0, 0, 200, 0]


def test_overlay_video_writer_odd_size_roundtrip(tmp_path):
    path = tmp_path / "out.mp4"
    with OverlayVideoWriter(path, fps=10) as writer:
        for value in (0, 128, 255, 64, 32):
            writer.write(np.full((21, 33, 3), value, np.uint8))
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 5
    assert decoded[0].shape == (22, 34, 3)  # padded to even sizes
    assert abs(int(decoded[1].mean()) - 128) <= 3 and abs(int(decoded[2].mean()) - 255) <= 3
    # a later frame of another size is fitted in (aspect kept, centred on black)
    with OverlayVideoWriter(tmp_path / "mixed.mp4") as writer:
        writer.write(np.zeros((32, 32, 3), np.uint8))
        writer.write(np.full((64, 32, 3), 255, np.uint8))  # → 32x16 in the middle
    with av.open(str(tmp_path / "mixed.mp4")) as container:
        second = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)][1]
    assert second.shape == (32, 32, 3)
    assert second[:, 11:21].mean() > 200  # the fitted frame, centred
    assert second[:, :5].mean() < 40 and second[:, 27:].mean() < 40  # black bars


def _tiny_weights(tmp_path, num_classes=8):
    from themask.weights import save_model

    torch.manual_seed(3)
    path = tmp_path / "model.safetensors"
    save_model(build_model("themask_tiny_t2", num_classes=num_classes), path)
    return path


def _check_predict_outputs(out, stems, size_hw):
    labels = sorted((out / "labels").glob("*.png"))
    assert [p.stem for p in labels] == stems
    for p in labels:
        image = Image.open(p)
        assert image.mode == "P" and image.size == (size_hw[1], size_hw[0])
        assert np.asarray(image).max() < 8
    assert sorted(p.stem for p in (out / "overlays").glob("*.png")) == stems
    with av.open(str(out / "overlay.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    # overlay | legend panel
    assert len(frames) == len(stems) and frames[0].shape[0] == size_hw[0]
    assert frames[0].shape[1] > size_hw[1]


def test_predict_cli_on_a_generated_video_and_frame_folder(tmp_path):
    from themask.cli import main

    weights = _tiny_weights(tmp_path)
    rng = np.random.default_rng(0)
    clip = [rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(4)]
    with OverlayVideoWriter(tmp_path / "clip.mp4", fps=5) as writer:
        for frame in clip:
            writer.write(frame)
    args = ["--weights", str(weights), "--scale", "64", "48", "--device", "cpu"]
    assert main(["predict", str(tmp_path / "clip.mp4"), "--out", str(tmp_path / "a"), *args]) == 0
    _check_predict_outputs(tmp_path / "a", [f"{i:08d}" for i in range(4)], (48, 64))

    folder = tmp_path / "frames"
    folder.mkdir()
    stems = ["00000007", "00000008", "00000009"]
    for stem, frame in zip(stems, clip):
        Image.fromarray(frame).save(folder / f"{stem}.png")
    out = tmp_path / "b"
    assert main(["predict", str(folder), "--out", str(out), "--clip-len", "2", *args]) == 0
    _check_predict_outputs(out, stems, (48, 64))
