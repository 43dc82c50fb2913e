"""VSPW reader: label mapping, split parsing, folder index, class table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from themask.data.description import VSPW_DESCRIPTION
from themask.data.vspw import (
    CLASS_NAMES,
    PALETTE,
    DataError,
    VSPWIndex,
    map_raw_labels,
    read_frame,
    read_split,
)


def _naive_map(raw, num_classes):
    out = np.empty_like(raw)
    for idx, value in np.ndenumerate(raw):
        if value == 0 or value == 255:
            out[idx] = 255
        else:
            assert 1 <= value <= num_classes
            out[idx] = value - 1
    return out


def test_label_mapping_matches_naive_loop_for_every_valid_value():
    values = np.array(list(range(0, 125)) + [255], dtype=np.uint8)
    raw = np.random.default_rng(0).permutation(np.tile(values, 4)).reshape(8, -1)
    assert np.array_equal(map_raw_labels(raw), _naive_map(raw, 124))


def test_label_mapping_hand_examples():
    raw = np.array([[0, 1, 124], [255, 2, 61]], dtype=np.uint8)
    assert map_raw_labels(raw).tolist() == [[255, 0, 123], [255, 1, 60]]
    assert map_raw_labels(np.array([[0, 8]], dtype=np.uint8), num_classes=8).tolist() == [[255, 7]]


@pytest.mark.parametrize("bad", [125, 200, 254])
def test_label_mapping_rejects_values_outside_the_encoding(bad):
    raw = np.array([[1, bad]], dtype=np.uint8)
    with pytest.raises(DataError, match=str(bad)):
        map_raw_labels(raw, source="x.png")


def test_read_label_uses_raw_palette_indices_not_colours(tmp_path):
    raw = np.array([[0, 1, 2], [124, 255, 30]], dtype=np.uint8)
    image = Image.fromarray(raw).convert("P")
    image.putpalette([v for i in range(256) for v in (255 - i, i, 7)])
    image.putdata(raw.ravel().tolist())
    image.save(tmp_path / "p.png")
    Image.fromarray(raw).save(tmp_path / "l.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    expected = _naive_map(raw, 124)
    assert np.array_equal(VSPW_DESCRIPTION.read_label(tmp_path / "p.png"), expected)
    assert np.array_equal(VSPW_DESCRIPTION.read_label(tmp_path / "l.png"), expected)


def test_read_frame_returns_rgb_uint8(tmp_path):
    rgb = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "f.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    frame = read_frame(tmp_path / "f.png")
    assert frame.shape == (4, 5, 3) and frame.dtype == np.uint8
    assert frame[0, 0].tolist() == [200, 0, 0]
    assert read_frame(tmp_path / "gray.png").shape == (4, 5, 3)


def test_split_file_tolerates_crlf_blank_lines_and_missing_final_newline(tmp_path):
    (tmp_path / "val.txt").write_bytes(b"1001_a-b\r\n\r\n  0_wHveSGjXyDY \r\n12_last")
    assert read_split(tmp_path / "val.txt") == ["1001_a-b", "0_wHveSGjXyDY", "12_last"]


def _write_video(root: Path, name: str, stems, size=(4, 6)):
    for stem in stems:
        for sub, suffix, array in (
            ("origin", ".jpg", np.full((*size, 3), 100, np.uint8)),
            ("mask", ".png", np.ones(size, np.uint8)),
        ):
            path = root / "data" / name / sub / f"{stem}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


def test_index_sorts_frames_by_name_and_pairs_masks_by_stem(tmp_path):
    _write_video(tmp_path, "v1", ["00000302", "00000166", "00000200"])
    _write_video(tmp_path, "v0", ["00000010"])
    (tmp_path / "data" / "v1" / "origin" / "._00000100.jpg").write_bytes(b"mac junk")
    (tmp_path / "train.txt").write_text("v1\nv0\n")
    index = VSPWIndex(tmp_path, "train")
    assert [v.name for v in index.videos] == ["v1", "v0"]
    video = index.videos[0]
    assert [p.stem for p in video.frame_paths] == ["00000166", "00000200", "00000302"]
    assert [p.name for p in video.mask_paths] == ["00000166.png", "00000200.png", "00000302.png"]
    assert all(p.parent.name == "mask" for p in video.mask_paths)
    assert index.num_frames == 4


def test_unlabelled_index_has_no_mask_paths(tmp_path):
    _write_video(tmp_path, "v", ["1", "2"])
    for mask in (tmp_path / "data" / "v" / "mask").iterdir():
        mask.unlink()
    (tmp_path / "test.txt").write_text("v\n")
    with pytest.raises(DataError):
        VSPWIndex(tmp_path, "test")
    assert VSPWIndex(tmp_path, "test", labelled=False).videos[0].mask_paths is None


def test_class_table_matches_the_reference():
    assert len(CLASS_NAMES) == 124 and len(set(CLASS_NAMES)) == 124
    assert CLASS_NAMES[0] == "wall" and CLASS_NAMES[60] == "person" and CLASS_NAMES[123] == "train"
    assert PALETTE.shape == (124, 3) and PALETTE.dtype == np.uint8
    assert PALETTE[0].tolist() == [120, 120, 120] and PALETTE[123].tolist() == [133, 255, 0]
    colours = [tuple(c) for c in PALETTE.tolist()]
    duplicates = [i for i, c in enumerate(colours) if colours.count(c) > 1]
    assert duplicates == [6, 48]


def test_custom_ignore_index_is_used_for_others_and_void():
    raw = np.array([[0, 3, 255]], dtype=np.uint8)
    assert map_raw_labels(raw, num_classes=8, ignore_index=100).tolist() == [[100, 2, 100]]
