import pytest
import torch

from themask.loss.targets import build_targets


def naive_masks(clip, classes):
    frames, height, width = clip.shape
    masks = torch.zeros(len(classes), frames, height, width)
    for i, c in enumerate(classes):
        for t in range(frames):
            for y in range(height):
                for x in range(width):
                    masks[i, t, y, x] = float(int(clip[t, y, x]) == c)
    return masks


def test_classes_and_masks_match_naive_loops():
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (2, 3, 5, 4))
    labels[labels == 5] = 255  # some ignore
    labels[1, :, :, :2] = 255
    targets = build_targets(labels, num_classes=5)
    assert len(targets) == 2
    for b, clip_targets in enumerate(targets):
        present = sorted({int(v) for v in labels[b].flatten()} - {255})
        assert clip_targets.classes.tolist() == present
        assert clip_targets.masks.dtype == torch.float32
        assert torch.equal(clip_targets.masks, naive_masks(labels[b], present))
        assert clip_targets.num_masks == len(present)


def test_ignore_pixels_are_zero_in_every_mask():
    labels = torch.tensor([[[[0, 255], [1, 255]]]])  # (1, 1, 2, 2)
    (clip,) = build_targets(labels, num_classes=3)
    assert clip.classes.tolist() == [0, 1]
    assert clip.masks[:, 0, :, 1].sum() == 0
    assert clip.masks.sum() == 2


def test_frame_targets_keep_absent_classes_with_empty_masks():
    labels = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    labels[0, 0] = 3  # frame 0: only class 3; frame 1: only class 0
    (clip,) = build_targets(labels, num_classes=4)
    assert clip.classes.tolist() == [0, 3]
    frame0, frame1 = clip.frame(0), clip.frame(1)
    assert frame0.classes.tolist() == [0, 3] and frame1.classes.tolist() == [0, 3]
    assert frame0.masks.shape == (2, 1, 2, 2)
    assert frame0.masks[0].sum() == 0 and frame0.masks[1].sum() == 4
    assert frame1.masks[0].sum() == 4 and frame1.masks[1].sum() == 0


def test_all_ignore_clip_has_no_targets():
    labels = torch.full((1, 2, 3, 3), 255)
    (clip,) = build_targets(labels, num_classes=4)
    assert clip.classes.numel() == 0
    assert clip.masks.shape == (0, 2, 3, 3)


@pytest.mark.parametrize("bad", [4, 7, -1])
def test_out_of_range_labels_raise(bad):
    labels = torch.zeros(1, 1, 2, 2, dtype=torch.long)
    labels[0, 0, 1, 1] = bad
    with pytest.raises(ValueError, match=str(bad)):
        build_targets(labels, num_classes=4)


def test_wrong_rank_raises():
    with pytest.raises(ValueError, match="B, T, H, W"):
        build_targets(torch.zeros(2, 3, 3, dtype=torch.long), num_classes=4)


def test_empty_clip_between_others_keeps_clip_alignment():
    labels = torch.full((3, 1, 2, 2), 255)
    labels[0, 0, 0, 0] = 2
    labels[2, 0, 1] = 1
    first, middle, last = build_targets(labels, num_classes=3)
    assert first.classes.tolist() == [2] and first.masks.sum() == 1
    assert middle.classes.numel() == 0 and middle.masks.shape == (0, 1, 2, 2)
    assert last.classes.tolist() == [1] and torch.equal(last.masks[0, 0, 1], torch.ones(2))
