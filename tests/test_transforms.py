"""Clip transforms: shared geometry, crop retry rule, resize sizes, pad/crop-back round trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from themask.data import transforms as tf
from themask.data.transforms import TestTransform, TrainTransform


def _clip(h=40, w=60, seed=0):
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), dtype=np.uint8)
    label[:, w // 3 :] = 1
    label[h // 2 :, : w // 2] = 2
    label[:3] = 255
    return frame, label


def test_same_geometry_on_every_frame_of_a_clip():
    frame, label = _clip()
    transform = TrainTransform(
        scale=(60, 40), ratio_range=(0.7, 1.6), crop_size=(32, 32), photometric=False
    )
    for seed in range(20):
        frames, labels = transform([frame] * 3, [label] * 3, np.random.default_rng(seed))
        assert frames.shape == (3, 3, 32, 32) and labels.shape == (3, 32, 32)
        assert torch.equal(frames[0], frames[1]) and torch.equal(frames[0], frames[2])
        assert torch.equal(labels[0], labels[1]) and torch.equal(labels[0], labels[2])


def test_photometric_distortion_is_drawn_per_frame_but_labels_stay_shared():
    frame, label = _clip()
    transform = TrainTransform(scale=(60, 40), ratio_range=(1.0, 1.0), crop_size=(32, 32))
    differs = 0
    for seed in range(10):
        frames, labels = transform([frame] * 4, [label] * 4, np.random.default_rng(seed))
        assert all(torch.equal(labels[0], labels[i]) for i in range(4))
        differs += any(not torch.equal(frames[0], frames[i]) for i in range(1, 4))
    assert differs >= 8


def test_flip_and_identity_geometry_match_a_direct_computation():
    frame, label = _clip(h=40, w=60)
    kwargs = dict(scale=(60, 40), ratio_range=(1.0, 1.0), crop_size=(40, 60), photometric=False)
    frames, labels = TrainTransform(flip_prob=0.0, **kwargs)(
        [frame], [label], np.random.default_rng(0)
    )
    assert torch.equal(labels[0], torch.from_numpy(label).long())
    expected = (
        torch.from_numpy(frame).float().permute(2, 0, 1) - torch.tensor(tf.MEAN).view(3, 1, 1)
    ) / torch.tensor(tf.STD).view(3, 1, 1)
    assert torch.allclose(frames[0], expected)
    frames, labels = TrainTransform(flip_prob=1.0, **kwargs)(
        [frame], [label], np.random.default_rng(0)
    )
    assert torch.equal(labels[0], torch.from_numpy(label[:, ::-1].copy()).long())
    assert torch.allclose(frames[0], expected.flip(-1))


def test_resize_never_invents_label_values_and_pads_small_images():
    frame, label = _clip(h=20, w=30)
    transform = TrainTransform(
        scale=(30, 20), ratio_range=(1.0, 1.0), crop_size=(32, 48), photometric=False
    )
    frames, labels = transform([frame], [label], np.random.default_rng(0))
    assert frames.shape == (1, 3, 32, 48)
    assert set(labels.unique().tolist()) <= {0, 1, 2, 255}
    assert torch.all(labels[0, 20:] == 255) and torch.all(labels[0, :, 30:] == 255)
    assert torch.all(frames[0, :, 20:] == 0) and torch.all(frames[0, :, :, 30:] == 0)


def test_crop_acceptance_rule_hand_examples():
    one_class = np.zeros((4, 4), np.uint8)
    assert not tf.crop_is_acceptable(one_class, cat_max_ratio=0.75)
    eighty = np.zeros((5, 4), np.uint8)
    eighty[4] = 1  # 16 vs 4 pixels: 0.8 >= 0.75
    assert not tf.crop_is_acceptable(eighty, cat_max_ratio=0.75)
    sixty = np.zeros((5, 4), np.uint8)
    sixty[3:] = 1  # 12 vs 8: 0.6
    assert tf.crop_is_acceptable(sixty, cat_max_ratio=0.75)
    exactly = np.zeros((4, 4), np.uint8)
    exactly[3] = 1  # 12 vs 4: 0.75 is not < 0.75
    assert not tf.crop_is_acceptable(exactly, cat_max_ratio=0.75)
    ignored = eighty.copy()
    ignored[:2] = 255  # ignore removed: 8 vs 4 -> 0.667
    assert tf.crop_is_acceptable(ignored, cat_max_ratio=0.75)
    only_ignore_and_one = np.full((4, 4), 255, np.uint8)
    only_ignore_and_one[0, 0] = 3
    assert not tf.crop_is_acceptable(only_ignore_and_one, cat_max_ratio=0.75)


class _ScriptedRng:
    """Returns scripted crop corners; counts the draws."""

    def __init__(self, corners):
        self.values = [v for c in corners for v in c]
        self.draws = 0

    def integers(self, low, high):
        value = self.values.pop(0)
        assert low <= value < high
        self.draws += 1
        return value


def _label_with_good_corner():
    label = np.zeros((10, 10), np.uint8)  # only the crop at (5, 5) holds two balanced classes
    label[5:, 5:] = 1
    label[5:7, 5:] = 2
    return label


def test_crop_retry_stops_at_the_first_acceptable_box():
    rng = _ScriptedRng([(0, 0), (1, 0), (5, 5), (2, 2)])
    assert tf.choose_crop(_label_with_good_corner(), (5, 5), rng, retries=10) == (5, 5)
    assert rng.draws == 6  # three boxes


def test_crop_retry_keeps_the_last_draw_after_the_retries():
    corners = [(0, 0)] * 3 + [(1, 1)]
    rng = _ScriptedRng(corners + [(5, 5)])
    assert tf.choose_crop(_label_with_good_corner(), (5, 5), rng, retries=3) == (1, 1)
    assert rng.draws == 8  # 1 first draw + 3 redraws, the last unchecked
    rng = _ScriptedRng([(0, 0), (5, 5)])
    assert tf.choose_crop(_label_with_good_corner(), (5, 5), rng, cat_max_ratio=1.0) == (0, 0)
    assert rng.draws == 2  # ratio 1 disables the check


def test_keep_ratio_and_aligned_test_sizes():
    assert tf.keep_ratio_size((480, 853), (853, 480)) == (480, 853)
    assert tf.keep_ratio_size((720, 1280), (853, 480)) == (480, 853)
    assert tf.keep_ratio_size((1280, 720), (853, 480)) == (853, 480)
    assert tf.keep_ratio_size((480, 480), (853, 480)) == (480, 480)
    assert TestTransform().input_size((480, 853)) == (480, 864)
    assert TestTransform().input_size((480, 640)) == (480, 640)
    assert TestTransform(scale=(128, 96)).input_size((96, 128)) == (96, 128)
    # factor min(200/150, 96/100) = 0.96 -> 96x144 -> width up to 160
    assert TestTransform(scale=(200, 96), size_divisor=32).input_size((100, 150)) == (96, 160)
    assert TestTransform(scale=(128, 96)).input_size((100, 150)) == (96, 128)  # 85x128 -> 96x128


def test_test_transform_output():
    frames = [np.full((45, 70, 3), v, np.uint8) for v in (10, 200)]
    transform = TestTransform(scale=(70, 45), size_divisor=32)
    x = transform(frames)
    assert x.shape == (2, 3, 64, 96)
    assert torch.allclose(x[1, 0], torch.full((64, 96), (200 - tf.MEAN[0]) / tf.STD[0]), atol=1e-5)
    with pytest.raises(ValueError, match="share one size"):
        transform([frames[0], np.zeros((10, 10, 3), np.uint8)])


def test_pad_clip_pads_bottom_right():
    frames = torch.randn(2, 3, 7, 9)
    labels = torch.randint(0, 5, (2, 7, 9))
    padded_f, padded_l = tf.pad_clip(frames, labels, (16, 12))
    assert padded_f.shape == (2, 3, 16, 12) and padded_l.shape == (2, 16, 12)
    assert torch.equal(padded_f[..., :7, :9], frames)
    assert torch.equal(padded_l[..., :7, :9], labels)
    assert padded_f[..., 7:, :].abs().sum() == 0 and padded_f[..., :, 9:].abs().sum() == 0
    assert torch.all(padded_l[:, 7:] == 255) and torch.all(padded_l[:, :, 9:] == 255)
    with pytest.raises(ValueError):
        tf.pad_clip(frames, labels, (6, 9))
    _, custom = tf.pad_clip(frames, labels, (8, 9), ignore_index=77)
    assert torch.all(custom[:, 7] == 77) and torch.equal(custom[:, :7], labels)


def test_normalize_frames_by_hand():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    x = tf.normalize_frames(tf.to_chw(rgb))
    assert x.shape == (2, 3, 5, 6) and x.dtype == torch.float32
    expected = (rgb.astype(np.float64) - np.array(tf.MEAN)) / np.array(tf.STD)
    assert torch.allclose(x, torch.from_numpy(expected).float().permute(0, 3, 1, 2), atol=1e-5)


def test_hsv_adjustment_without_change_is_near_identity_and_hue_shift_rotates():
    frame = np.zeros((2, 2, 3), np.uint8)
    frame[...] = (200, 40, 40)  # red
    assert np.abs(tf._adjust_hsv(frame, 1.0, 0).astype(int) - frame).max() <= 2
    shifted = tf._adjust_hsv(frame, 1.0, 60)  # +120 degrees: red -> green
    assert shifted[0, 0, 1] > shifted[0, 0, 0] and shifted[0, 0, 1] > shifted[0, 0, 2]
