"""Clip indices: training clips per dilation, test clips, sliding windows."""

from __future__ import annotations

import numpy as np
import pytest

from themask.data import clips


@pytest.mark.parametrize(
    "dilation, offsets, span",
    [
        ([-9, -6, -3], (-9, -6, -3, 0), 10),
        ([-3], (-3, 0), 4),
        ([0], (0,), 1),
        ([-4, 0], (-4, 0), 5),
    ],
)
def test_clip_offsets_append_the_target_once(dilation, offsets, span):
    assert clips.clip_offsets(dilation) == offsets
    assert clips.clip_span(dilation) == span


@pytest.mark.parametrize("bad", [[], [3], [-3, -6], [-3, -3], [-2, 1]])
def test_clip_offsets_reject_bad_dilations(bad):
    with pytest.raises(ValueError):
        clips.clip_offsets(bad)


def test_train_clip_at_the_start_of_the_video():
    assert clips.train_clip_indices(20, [-9, -6, -3], 9) == [0, 3, 6, 9]
    assert clips.train_clip_indices(20, [-3], 3) == [0, 3]
    assert clips.train_clip_indices(20, [0], 0) == [0]
    with pytest.raises(ValueError):
        clips.train_clip_indices(20, [-9, -6, -3], 8)
    with pytest.raises(ValueError):
        clips.train_clip_indices(20, [-3], 20)


def test_train_clip_reversal_reads_the_video_backwards():
    # Reversed list L' = L[::-1]; clip = [L'[t-3], L'[t]] = [L[19-(t-3)], L[19-t]].
    assert clips.train_clip_indices(20, [-3], 3, reverse=True) == [19, 16]
    assert clips.train_clip_indices(20, [-9, -6, -3], 19, reverse=True) == [9, 6, 3, 0]
    assert clips.train_clip_indices(20, [0], 5, reverse=True) == [14]


@pytest.mark.parametrize("dilation", [[-9, -6, -3], [-3], [0]])
def test_sampled_clips_are_exactly_the_valid_ones(dilation):
    n = 14
    offsets = clips.clip_offsets(dilation)
    forward = {tuple(t + d for d in offsets) for t in range(-offsets[0], n)}
    backward = {tuple(n - 1 - i for i in c) for c in forward}
    rng = np.random.default_rng(0)
    seen = [tuple(clips.sample_train_clip(n, dilation, rng, reverse_prob=0.5)) for _ in range(3000)]
    assert set(seen) == forward | backward  # for [0] the two sets coincide
    if offsets != (0,):
        share_reversed = np.mean([c in backward for c in seen])
        assert 0.45 < share_reversed < 0.55
    rng = np.random.default_rng(1)
    never = {tuple(clips.sample_train_clip(n, dilation, rng, reverse_prob=0.0)) for _ in range(500)}
    assert never <= forward


def test_sampling_a_too_short_video_raises():
    with pytest.raises(clips.ClipTooShortError, match="at least 10"):
        clips.sample_train_clip(9, [-9, -6, -3], np.random.default_rng(0))
    assert clips.sample_train_clip(10, [-9, -6, -3], np.random.default_rng(0)) in (
        [0, 3, 6, 9],
        [9, 6, 3, 0],
    )


def _official_grouping(n, t):
    """Naive re-statement of docs/VSPW.md §2.2 for T in {1, 2, 4}."""
    if t == 1:
        return [[i] for i in range(n)]
    block = 3 * t
    out, b = [], 0
    while b + block - 1 <= n - 1:
        for j in range(3):
            out.append([b + j + 3 * i for i in range(t)])
        b += block
    rest = list(range(b, n))
    out.extend(rest[i : i + t] for i in range(0, len(rest), t))
    return out


@pytest.mark.parametrize("t", [1, 2, 4])
def test_test_clips_reproduce_the_official_grouping(t):
    for n in range(12, 60):  # every VSPW video has >= 11 frames; short ones are tested below
        assert clips.test_clips(n, t) == _official_grouping(n, t)


def test_test_clips_hand_examples():
    assert clips.test_clips(14, 2) == [[0, 3], [1, 4], [2, 5], [6, 9], [7, 10], [8, 11], [12, 13]]
    assert clips.test_clips(13, 4) == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11], [12]]
    assert clips.test_clips(10, 3) == [[0, 3, 6], [1, 4, 7], [2, 5, 8], [9]]
    # Shorter than one block: consecutive chunks (the official code loses these frames, Q6).
    assert clips.test_clips(5, 2) == [[0, 1], [2, 3], [4]]
    assert clips.test_clips(11, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


@pytest.mark.parametrize("t", [1, 2, 3, 4, 7])
def test_test_clips_cover_every_frame_exactly_once(t):
    for n in range(0, 50):
        groups = clips.test_clips(n, t)
        flat = [i for g in groups for i in g]
        assert sorted(flat) == list(range(n))
        assert all(1 <= len(g) <= t for g in groups)
        assert sum(len(g) < t for g in groups) <= 1  # only the last leftover chunk is short


def _windows(num_frames, clip_len, step=3):
    return [clips.causal_window(t, clip_len, step=step) for t in range(num_frames)]


def test_causal_windows_have_the_new_frame_last():
    assert _windows(5, 2, step=3) == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 4]]
    assert _windows(4, 3, step=1) == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3]]
    for t in (1, 2, 4):
        windows = _windows(30, t)
        assert [w[-1] for w in windows] == list(range(30))
        assert all(len(w) == t and 0 <= min(w) and max(w) == w[-1] for w in windows)
        assert all(w == sorted(w) for w in windows)


@pytest.mark.parametrize("clip_len,step", [(1, 3), (2, 3), (3, 1), (4, 2)])
def test_causal_windows_hold_each_item_once_and_return_each_window(clip_len, step):
    windows = clips.CausalWindows(clip_len, step)
    for t, expected in enumerate(_windows(12, clip_len, step)):
        assert windows.push(f"item{t}") == [f"item{i}" for i in expected]
        assert len(windows.history) <= (clip_len - 1) * step + 1
    windows.reset()
    assert windows.push("again") == ["again"] * clip_len
    with pytest.raises(ValueError):
        clips.CausalWindows(0, 1)
