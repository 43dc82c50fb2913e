"""The embedded toy dataset: deterministic, valid VSPW layout, and not solvable by colour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from themask.cli import main
from themask.data.check import check_dataset
from themask.data.toy import TOY_CLASS_NAMES, TOY_DESCRIPTION, TOY_PALETTE, make_toy_dataset
from themask.data.vspw import VSPWIndex, read_frame, read_raw_label

SMALL = dict(num_train=6, num_val=2, num_frames=12, val_frames=20, size=(48, 64))


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), seed=0, **SMALL)


def _files(root: Path):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic_by_seed(toy_root, tmp_path):
    again = make_toy_dataset(tmp_path / "again", seed=0, **SMALL)
    other = make_toy_dataset(tmp_path / "other", seed=1, **SMALL)
    first = _files(toy_root)
    assert first == _files(again)
    second = _files(other)
    assert first.keys() != second.keys() or any(first[k] != second[k] for k in first)


def test_generator_output_passes_the_reader_and_the_check(toy_root):
    report = check_dataset(toy_root)
    assert report.ok, report.problems
    assert report.splits == {"train": 6, "val": 2}
    assert set(report.sizes) == {(48, 64)}
    for split, most in (("train", 12), ("val", 20)):
        index = VSPWIndex(toy_root, split)
        for video in index.videos:
            assert most - 3 <= len(video) <= most
            label = TOY_DESCRIPTION.read_label(video.mask_paths[0])
            assert label.shape == read_frame(video.frame_paths[0]).shape[:2]
    values = set(np.flatnonzero(report.histogram).tolist())
    assert values == set(range(0, 9)) | {255}  # every class, others (0) and void (255)


def test_classes_are_absent_from_some_videos_and_the_scene_moves(toy_root):
    index = VSPWIndex(toy_root, "train")
    per_video = []
    for video in index.videos:
        raws = [read_raw_label(p) for p in video.mask_paths]
        per_video.append(set(np.unique(np.stack(raws)).tolist()) - {0, 255})
        assert not np.array_equal(raws[0], raws[-1])  # camera and objects move
    assert all(len(present) < 8 for present in per_video)
    assert set().union(*per_video) == set(range(1, 9))


def test_colour_alone_does_not_identify_the_class(toy_root):
    """Nearest class-mean colour (fit on train, scored on val) must be a poor classifier."""

    def pixels(split):
        xs, ys = [], []
        for video in VSPWIndex(toy_root, split).videos:
            for f, m in zip(video.frame_paths, video.mask_paths):
                raw = read_raw_label(m)
                keep = (raw > 0) & (raw < 255)
                xs.append(read_frame(f)[keep].astype(np.float32))
                ys.append(raw[keep])
        return np.concatenate(xs), np.concatenate(ys)

    x, y = pixels("train")
    means = np.stack([x[y == c].mean(0) for c in range(1, 9)])
    xv, yv = pixels("val")
    guess = 1 + np.argmin(((xv[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (guess == yv).mean() < 0.4


def test_toy_class_table():
    assert len(TOY_CLASS_NAMES) == 8 and len(set(TOY_CLASS_NAMES)) == 8
    assert TOY_PALETTE.shape == (8, 3)


def test_make_toy_data_command_writes_a_dataset(tmp_path):
    out = tmp_path / "cli"
    code = main(
        [
            "make-toy-data",
            str(out),
            "--train-videos",
            "2",
            "--val-videos",
            "1",
            "--frames",
            "6",
            "--height",
            "32",
            "--width",
            "40",
        ]
    )
    assert code == 0
    assert (out / "train.txt").read_text().split() == ["0000_toy0", "0001_toy0"]
    assert VSPWIndex(out, "val").videos[0].name == "0002_toy0"
