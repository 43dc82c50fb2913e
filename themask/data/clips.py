"""Which frames (indices 0..N-1 of a video sorted by name) form training, test, causal clips."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

TEST_CLIP_STRIDE = 3  # frame gap of the official multi-frame test clips (training dilation [-3])


class ClipTooShortError(ValueError):
    """A video has fewer frames than a clip needs."""


def clip_offsets(dilation: Sequence[int]) -> tuple[int, ...]:
    """Offsets of a training clip relative to its target, target (0) last (appended unless
    present); ``dilation``: non-positive, strictly increasing (``[-9, -6, -3]``, ``[0]``)."""
    offsets = [int(d) for d in dilation]
    if not offsets or offsets[-1] > 0 or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(
            f"dilation must be non-positive, strictly increasing offsets (e.g. [-3]), got {offsets}"
        )
    return tuple(offsets) if offsets[-1] == 0 else (*offsets, 0)


def clip_span(dilation: Sequence[int]) -> int:
    """Minimum number of frames a video needs for one training clip: ``|d_1| + 1``."""
    return 1 - clip_offsets(dilation)[0]


def train_clip_indices(
    num_frames: int, dilation: Sequence[int], target: int, *, reverse: bool = False
) -> list[int]:
    """Frame indices of the training clip ending on ``target`` (``|d_1| <= target < N``, in
    the read order); ``reverse`` reads the video backwards. Indices are in the stored order."""
    offsets = clip_offsets(dilation)
    if not -offsets[0] <= target < num_frames:
        raise ValueError(
            f"target {target} is not a valid target for {num_frames} frames and dilation "
            f"{list(dilation)} (valid: {-offsets[0]}..{num_frames - 1})"
        )
    order = [target + d for d in offsets]
    return [num_frames - 1 - i for i in order] if reverse else order


def sample_train_clip(
    num_frames: int,
    dilation: Sequence[int],
    rng: np.random.Generator,
    *,
    reverse_prob: float = 0.5,
    targets: Sequence[int] | None = None,
) -> list[int]:
    """One training clip: reversed with ``reverse_prob`` (not if that leaves no target), a uniform
    target among ``targets`` (default: all frames); ``ClipTooShortError`` if none can end one."""
    span, reverse = clip_span(dilation), bool(rng.random() < reverse_prob)
    frames = range(num_frames) if targets is None else targets

    def valid(backwards: bool) -> list[int]:  # positions in the read order
        order = sorted(num_frames - 1 - i if backwards else i for i in frames)
        return [t for t in order if t >= span - 1]

    if not valid(reverse):
        reverse = not reverse
    choices = valid(reverse)
    if not choices:
        why = f"can end a clip: dilation {list(dilation)} needs at least {span} frames"
        raise ClipTooShortError(f"no frame of {list(frames)} ({num_frames} frames) {why}")
    target = choices[int(rng.integers(len(choices)))]
    return train_clip_indices(num_frames, dilation, target, reverse=reverse)


def test_clips(
    num_frames: int, clip_len: int, *, stride: int = TEST_CLIP_STRIDE
) -> list[list[int]]:
    """Clips predicting each frame once (docs/VSPW.md §2.2): ``{b + j + stride·i : i < clip_len}``
    per ``j < stride`` in blocks b of ``stride·clip_len`` frames; the rest consecutive chunks."""
    if clip_len < 1 or stride < 1:
        raise ValueError(f"clip_len and stride must be >= 1, got {clip_len} and {stride}")
    block = stride * clip_len
    end = num_frames // block * block
    clips = [
        list(range(b + j, b + block, stride)) for b in range(0, end, block) for j in range(stride)
    ]
    tail = range(end, num_frames, clip_len)  # consecutive chunks
    return clips + [list(range(s, min(s + clip_len, num_frames))) for s in tail]


def causal_window(t: int, clip_len: int, *, step: int = TEST_CLIP_STRIDE) -> list[int]:
    """The window predicting frame ``t``: ``[t - (T-1)·step, ..., t - step, t]`` clamped at 0."""
    return [max(0, t - step * (clip_len - 1 - i)) for i in range(clip_len)]


class CausalWindows:
    """``push(item)`` of frame t → the items of :func:`causal_window` of t, oldest first."""

    def __init__(self, clip_len: int, step: int = TEST_CLIP_STRIDE) -> None:
        if clip_len < 1 or step < 1:
            raise ValueError(f"clip_len and step must be >= 1, got {clip_len} and {step}")
        self.clip_len, self.step = clip_len, step
        self.history: deque[Any] = deque(maxlen=(clip_len - 1) * step + 1)
        self.count = 0  # frames pushed since the last reset

    def reset(self) -> None:
        """Start a new stream (forget the held items)."""
        self.history.clear()
        self.count = 0

    def push(self, item: Any) -> list[Any]:
        self.history.append(item)
        t, self.count = self.count, self.count + 1
        first = t - len(self.history) + 1  # frame index of history[0]
        return [self.history[i - first] for i in causal_window(t, self.clip_len, step=self.step)]
