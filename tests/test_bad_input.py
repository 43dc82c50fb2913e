"""Every listed bad input gives an error naming the file and the expectation, or a logged skip."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from themask.cli import main
from themask.data.check import check_dataset
from themask.data.description import VSPW_DESCRIPTION
from themask.data.loader import VSPWTrainDataset
from themask.data.toy import TOY_DESCRIPTION
from themask.data.transforms import TrainTransform
from themask.data.vspw import (
    CorruptFileError,
    DataError,
    VSPWIndex,
    read_frame,
)

H, W = 24, 32


def _write_video(root: Path, name: str, num_frames: int = 5, labels=(1, 2)):
    for t in range(num_frames):
        frame = np.full((H, W, 3), 30 * t % 256, np.uint8)
        mask = np.full((H, W), labels[0], np.uint8)
        mask[:, W // 2 :] = labels[1]
        for sub, path_suffix, array in (("origin", ".jpg", frame), ("mask", ".png", mask)):
            path = root / "data" / name / sub / f"{t:08d}{path_suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


def _dataset(tmp_path: Path, names=("a", "b"), num_frames=5) -> Path:
    for name in names:
        _write_video(tmp_path, name, num_frames)
    (tmp_path / "train.txt").write_text("".join(f"{n}\n" for n in names))
    return tmp_path


def _mask(root, video, t):
    return root / "data" / video / "mask" / f"{t:08d}.png"


def _frame(root, video, t):
    return root / "data" / video / "origin" / f"{t:08d}.jpg"


def _train_set(root, **kwargs):
    transform = TrainTransform(
        scale=(W, H), ratio_range=(1.0, 1.0), crop_size=(H, W), photometric=False
    )
    return VSPWTrainDataset(
        VSPWIndex(root, "train").videos, dilation=[-3], transform=transform, **kwargs
    )


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_unreadable_or_truncated_image(tmp_path, damage):
    root = _dataset(tmp_path)
    path = _frame(root, "a", 2)
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"not a jpeg"}[damage]
    )
    with pytest.raises(CorruptFileError, match=str(path)):
        read_frame(path)
    report = check_dataset(root)
    assert len(report.problems) == 1 and str(path) in report.problems[0]


def test_corrupt_frame_during_training_is_skipped_with_a_logged_count(tmp_path, caplog):
    root = _dataset(tmp_path, names=("a", "b"), num_frames=4)
    bad = _frame(root, "a", 0)
    bad.write_bytes(b"")
    dataset = _train_set(root)
    # With 4 frames and dilation [-3] every clip of "a" holds frame 0.
    with caplog.at_level(logging.WARNING, logger="themask.data.loader"):
        samples = [dataset[(0, i)] for i in range(6)]
    assert all(s.meta.video == "b" for s in samples)
    messages = [
        r.getMessage()
        for r in caplog.records
        if r.name == "themask.data.loader" and r.levelno == logging.WARNING
    ]
    # Each request of "a" is skipped once; a redraw may hit "a" again and is skipped again.
    assert dataset.skipped == len(messages) >= 6
    assert all(str(bad) in m for m in messages)
    assert f"{dataset.skipped} clip(s) skipped" in messages[-1]


def test_missing_mask(tmp_path):
    root = _dataset(tmp_path)
    missing = _mask(root, "b", 3)
    missing.unlink()
    expected = f"{missing}: mask missing for frame 00000003.jpg (dataset is not sparse)"
    with pytest.raises(DataError, match=re.escape(expected)):
        VSPWIndex(root, "train")
    report = check_dataset(root)
    assert [p for p in report.problems] == [expected]


def test_mask_size_differs_from_image_size(tmp_path):
    root = _dataset(tmp_path)
    wrong = _mask(root, "a", 1)
    Image.fromarray(np.ones((H, W + 2), np.uint8)).save(wrong)
    report = check_dataset(root)
    assert len(report.problems) == 1
    assert (
        str(wrong) in report.problems[0]
        and "34x24" in report.problems[0]
        and "32x24" in report.problems[0]
    )
    train = _train_set(root, reverse_prob=0.0)
    with pytest.raises(DataError, match=str(wrong)):
        train[(0, 0)]  # never silently resized or skipped: the target draw may vary, so scan
        for i in range(1, 50):
            train[(0, i)]


@pytest.mark.parametrize("bad_value", [125, 200])
def test_mask_values_outside_the_encoding(tmp_path, bad_value):
    root = _dataset(tmp_path)
    wrong = _mask(root, "b", 0)
    mask = np.ones((H, W), np.uint8)
    mask[0, 0] = bad_value
    Image.fromarray(mask).save(wrong)
    with pytest.raises(
        DataError,
        match=rf"{wrong}: stored values must be classes 1..124 or ignored values \(0, 255\), "
        rf"found {bad_value}",
    ):
        VSPW_DESCRIPTION.read_label(wrong)
    report = check_dataset(root)
    assert len(report.problems) == 1 and str(wrong) in report.problems[0]
    # A value valid for VSPW is invalid for the 8-class toy encoding.
    Image.fromarray(np.full((H, W), 9, np.uint8)).save(wrong)
    with pytest.raises(DataError, match=r"classes 1..8 or ignored values \(0, 255\), found 9"):
        TOY_DESCRIPTION.read_label(wrong)  # 8 classes


def test_rgb_mask(tmp_path):
    root = _dataset(tmp_path)
    wrong = _mask(root, "a", 4)
    Image.fromarray(np.ones((H, W, 3), np.uint8)).save(wrong)
    with pytest.raises(
        DataError, match=rf"{wrong}: expected a single-channel label PNG .* got mode RGB"
    ):
        VSPW_DESCRIPTION.read_label(wrong)
    report = check_dataset(root)
    assert len(report.problems) == 1 and "mode RGB" in report.problems[0]


def test_corrupt_mask(tmp_path):
    root = _dataset(tmp_path)
    wrong = _mask(root, "a", 4)
    wrong.write_bytes(wrong.read_bytes()[:20])
    with pytest.raises(CorruptFileError, match=str(wrong)):
        VSPW_DESCRIPTION.read_label(wrong)


def test_empty_split_file(tmp_path):
    root = _dataset(tmp_path)
    (root / "val.txt").write_text("\n  \n")
    with pytest.raises(DataError, match=r"val.txt: split file is empty"):
        VSPWIndex(root, "val")
    with pytest.raises(DataError, match=r"test.txt: split file not found"):
        VSPWIndex(root, "test")
    assert any("split file is empty" in p for p in check_dataset(root).problems)


def test_split_video_without_folder(tmp_path):
    root = _dataset(tmp_path)
    (root / "train.txt").write_text("a\nghost\nb\n")
    expected = root / "data" / "ghost" / "origin"
    with pytest.raises(
        DataError, match=rf"{expected}: video folder listed in the split does not exist"
    ):
        VSPWIndex(root, "train")
    assert check_dataset(root).problems == [
        f"{expected}: video folder listed in the split does not exist"
    ]


def test_video_shorter_than_the_clip_span(tmp_path):
    root = _dataset(tmp_path, names=("long",), num_frames=12)
    _write_video(root, "short", num_frames=6)
    (root / "train.txt").write_text("long\nshort\n")
    transform = TrainTransform(scale=(W, H), crop_size=(H, W))
    videos = VSPWIndex(root, "train").videos
    with pytest.raises(
        DataError, match=r"needs at least 10 frames per video: .*short/origin \(6 frames\)"
    ):
        VSPWTrainDataset(videos, dilation=[-9, -6, -3], transform=transform)
    assert len(VSPWTrainDataset(videos, dilation=[-3], transform=transform)) == 2


def test_check_data_command_names_every_bad_file_and_fails(tmp_path, capsys):
    root = _dataset(tmp_path, names=("a", "b", "c"))
    _frame(root, "a", 1).write_bytes(b"")
    _mask(root, "b", 2).unlink()
    Image.fromarray(np.ones((H, W, 3), np.uint8)).save(_mask(root, "c", 0))
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out
    for bad in (_frame(root, "a", 1), _mask(root, "b", 2), _mask(root, "c", 0)):
        assert str(bad) in out
    assert "3 problem(s)" in out


def test_check_data_command_passes_a_clean_folder(tmp_path, capsys):
    root = _dataset(tmp_path)
    assert main(["check-data", str(root), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "train: 2 videos, 10 frames, 10 masks" in out and "no problems found" in out
    assert "wall" in out and "ceiling" in out  # raw 1 and 2 by VSPW name


def test_check_data_parallel_and_unlabelled_splits(tmp_path, capsys):
    root = _dataset(tmp_path, names=("a", "b", "c"))
    _frame(root, "a", 1).write_bytes(b"")
    _write_video(root, "t", num_frames=2)
    for mask in (root / "data" / "t" / "mask").iterdir():
        mask.unlink()
    (root / "test.txt").write_text("t\n")
    serial = check_dataset(root, splits=["train", "test"])
    assert len(serial.problems) == 3  # the corrupt frame and the two masks of the test video
    parallel = check_dataset(root, splits=["train", "test"], jobs=2)
    assert parallel.problems == serial.problems
    assert np.array_equal(parallel.histogram, serial.histogram)
    relaxed = check_dataset(root, splits=["train", "test"], unlabelled_splits=["test"])
    assert relaxed.problems == serial.problems[:1]
    assert main(["check-data", str(root), "--split", "test", "--unlabelled", "test"]) == 0
    assert "test: 1 videos, 2 frames, 0 masks" in capsys.readouterr().out
