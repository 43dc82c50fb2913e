from __future__ import annotations

import pytest
import torch

from themask.loss.targets import build_targets, check_invalid


def naive_present(labels, num_classes):
    return [
        [any(int(v) == c for v in clip.flatten()) for c in range(num_classes)] for clip in labels
    ]


def test_present_classes_and_labelled_frames_match_naive_loops():
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (2, 3, 5, 4))
    labels[labels == 5] = 255  # some ignore
    labels[1, :, :, :2] = 255
    labels[1, 2] = 255  # an unlabelled frame
    targets = build_targets(labels, num_classes=5)
    assert targets.present.tolist() == naive_present(labels, 5)
    expected_labelled = [[bool((frame != 255).any()) for frame in clip] for clip in labels]
    assert targets.labelled.tolist() == expected_labelled
    assert expected_labelled[1] == [True, True, False]
    assert targets.invalid[0] == 0


def test_masks_are_label_equals_class_and_ignore_is_zero():
    labels = torch.tensor([[[[0, 255], [1, 255]]], [[[1, 1], [255, 0]]]])  # (2, 1, 2, 2)
    targets = build_targets(labels, num_classes=3)
    clip, frame, cls = torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0]), torch.tensor([0, 1, 1])
    masks = targets.masks(clip, frame, cls)
    assert masks.dtype == torch.float32
    assert masks.tolist() == [[[1, 0], [0, 0]], [[0, 0], [1, 0]], [[1, 1], [0, 0]]]


def test_all_ignore_clip_has_no_classes_and_no_labelled_frame():
    labels = torch.full((2, 2, 3, 3), 255)
    labels[1, 0, 0, 0] = 2
    targets = build_targets(labels, num_classes=4)
    assert targets.present.tolist() == [[False] * 4, [False, False, True, False]]
    assert targets.labelled.tolist() == [[False, False], [True, False]]


@pytest.mark.parametrize("bad", [4, 7, -1])
def test_out_of_range_labels_are_counted_and_named(bad):
    labels = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    labels[0, 0, 1, 1] = bad
    targets = build_targets(labels, num_classes=4)
    count, value = targets.invalid.tolist()
    assert (count, value) == (1, bad)
    assert not targets.present[0, 1:].any()  # the invalid value marks no class present
    with pytest.raises(ValueError, match=str(bad)):
        check_invalid(count, value, 4)


def test_wrong_rank_raises():
    with pytest.raises(ValueError, match="B, T, H, W"):
        build_targets(torch.zeros(2, 3, 3, dtype=torch.long), num_classes=4)
