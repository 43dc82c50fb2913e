"""Which frames form a clip: training clips (dilation offsets), test clips, sliding windows.

All functions work on frame indices ``0..N-1`` of one video sorted by name and return plain
lists, so they are easy to test and to reuse for any frame source.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

# Frame gap of the official multi-frame test clips (matches the training dilation [-3]).
TEST_CLIP_STRIDE = 3


class ClipTooShortError(ValueError):
    """A video has fewer frames than a clip needs."""


def clip_offsets(dilation: Sequence[int]) -> tuple[int, ...]:
    """Offsets of a training clip relative to its target frame, target (0) last.

    ``dilation`` holds non-positive, strictly increasing offsets (``[-9, -6, -3]``, ``[-3]``,
    ``[0]``); the target is appended unless already present (``docs/VSPW.md`` §2.1).
    """
    offsets = [int(d) for d in dilation]
    if not offsets:
        raise ValueError("dilation must hold at least one offset, e.g. [0] or [-3]")
    if any(d > 0 for d in offsets) or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"dilation must be non-positive and strictly increasing, got {offsets}")
    if offsets[-1] != 0:
        offsets.append(0)
    return tuple(offsets)


def clip_span(dilation: Sequence[int]) -> int:
    """Minimum number of frames a video needs for one training clip: ``|d_1| + 1``."""
    return 1 - clip_offsets(dilation)[0]


def train_clip_indices(
    num_frames: int, dilation: Sequence[int], target: int, *, reverse: bool = False
) -> list[int]:
    """Frame indices of the training clip whose target is ``target`` (target last).

    ``target`` counts in the (possibly reversed) frame order and must be a valid target,
    ``|d_1| <= target < num_frames``. With ``reverse`` the video is read backwards, so the
    "past" offsets point at later frames; returned indices are in the original order.
    """
    offsets = clip_offsets(dilation)
    if not -offsets[0] <= target < num_frames:
        raise ValueError(
            f"target {target} is not a valid target for {num_frames} frames and dilation "
            f"{list(dilation)} (valid: {-offsets[0]}..{num_frames - 1})"
        )
    order = [target + d for d in offsets]
    if reverse:
        order = [num_frames - 1 - i for i in order]
    return order


def sample_train_clip(
    num_frames: int,
    dilation: Sequence[int],
    rng: np.random.Generator,
    *,
    reverse_prob: float = 0.5,
    targets: Sequence[int] | None = None,
) -> list[int]:
    """Draw one training clip of a video: reversal with ``reverse_prob``, then a uniform target.

    Targets are drawn from ``{|d_1|, ..., N-1}`` so no offset falls before the first frame;
    ``targets`` (frame indices, e.g. the labelled frames of a sparse video) restricts them
    further, and the other direction is used when the drawn one has no valid target.
    Raises ``ClipTooShortError`` when ``num_frames < clip_span(dilation)`` or no frame of
    ``targets`` can end a clip.
    """
    span = clip_span(dilation)
    if num_frames < span:
        raise ClipTooShortError(
            f"{num_frames} frames, but dilation {list(dilation)} needs at least {span}"
        )
    reverse = bool(rng.random() < reverse_prob)
    if targets is None:
        target = int(rng.integers(span - 1, num_frames))
        return train_clip_indices(num_frames, dilation, target, reverse=reverse)

    def valid(backwards: bool) -> list[int]:  # positions in the read order
        order = sorted(num_frames - 1 - i if backwards else i for i in targets)
        return [t for t in order if t >= span - 1]

    choices = valid(reverse) or valid(not reverse)
    if not choices:
        raise ClipTooShortError(
            f"no frame of {list(targets)} can end a clip of dilation {dilation}"
        )
    if not valid(reverse):
        reverse = not reverse
    target = choices[int(rng.integers(len(choices)))]
    return train_clip_indices(num_frames, dilation, target, reverse=reverse)


def _chunks(indices: Sequence[int], size: int) -> list[list[int]]:
    return [list(indices[i : i + size]) for i in range(0, len(indices), size)]


def test_clips(
    num_frames: int, clip_len: int, *, stride: int = TEST_CLIP_STRIDE
) -> list[list[int]]:
    """Clips that predict every frame of a video exactly once (``docs/VSPW.md`` §2.2).

    Frames are cut into blocks of ``stride * clip_len``; block ``b`` gives the ``stride`` clips
    ``{b + j + stride * i : i < clip_len}`` for ``j < stride`` (T = 2: {b, b+3}, {b+1, b+4},
    {b+2, b+5}; T = 4: blocks of 12), exactly the official grouping for T = 1, 2 and 4, and the
    same rule for any other T. Frames after the last complete block, and all frames of a video
    shorter than one block, are cut into consecutive chunks of ``clip_len`` (the last may be
    shorter). Unlike the official code (Q6 of docs/VSPW.md §4) a short video is still fully covered.
    """
    if clip_len < 1 or stride < 1:
        raise ValueError(f"clip_len and stride must be >= 1, got {clip_len} and {stride}")
    if num_frames < 0:
        raise ValueError(f"num_frames must be >= 0, got {num_frames}")
    block = stride * clip_len
    clips: list[list[int]] = []
    num_blocks = num_frames // block
    for b in range(0, num_blocks * block, block):
        for j in range(stride):
            clips.append([b + j + stride * i for i in range(clip_len)])
    clips.extend(_chunks(range(num_blocks * block, num_frames), clip_len))
    return clips


def causal_window(t: int, clip_len: int, *, step: int = TEST_CLIP_STRIDE) -> list[int]:
    """The causal window that predicts frame ``t`` of a stream: ``[t - (T-1)·step, ...,
    t - step, t]``, indices before the first frame clamped to 0 (the first frame repeats), so
    every window has ``clip_len`` frames and the new frame, whose prediction is kept, last."""
    return [max(0, t - step * (clip_len - 1 - i)) for i in range(clip_len)]


class CausalWindows:
    """The per-frame items (features) of the causal windows of a stream, each held once.

    ``push(item)`` adds the item of the next frame t and returns the items of its
    :func:`causal_window` (oldest first, t last); only the last (T−1)·step + 1 are kept.
    Shared by the PyTorch and the ONNX Runtime streaming predictors.
    """

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


# ``test_clips`` is a library function, not a pytest test, even when imported into a test module.
test_clips.__test__ = False  # type: ignore[attr-defined]
