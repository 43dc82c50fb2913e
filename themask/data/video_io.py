"""Frames for prediction, read lazily as RGB uint8: a frame folder or a video file (PyAV)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from themask.data.vspw import FRAME_SUFFIXES, DataError, PathLike, list_frames, read_frame


def read_video_frames(path: PathLike) -> Iterator[np.ndarray]:
    """Yield the frames of a video file one by one as (H, W, 3) uint8 RGB."""
    import av  # imported lazily: only prediction on video files needs it

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise DataError(f"{path}: cannot open video ({err})") from err
    with container:
        if not container.streams.video:
            raise DataError(f"{path}: the file holds no video stream")
        try:
            for frame in container.decode(container.streams.video[0]):
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as err:
            raise DataError(f"{path}: video decoding failed ({err})") from err


def video_frame_rate(path: PathLike) -> float | None:
    """Frames per second of a video file's first video stream (``None`` if unknown)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.base_rate
    except (av.error.FFmpegError, OSError, IndexError) as err:
        raise DataError(f"{path}: cannot read the video's frame rate ({err})") from err
    return float(rate) if rate else None


def iter_input_frames(path: PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """``(name, frame)`` of a frame folder (names: file stems) or video file (8-digit positions)."""
    path = Path(path)
    if path.is_dir():
        frames = list_frames(path)
        if not frames:
            raise DataError(f"{path}: no images ({', '.join(FRAME_SUFFIXES)}) in the frame folder")
        for frame_path in frames:
            yield frame_path.stem, read_frame(frame_path)
    elif path.is_file():
        for i, frame in enumerate(read_video_frames(path)):
            yield f"{i:08d}", frame
    else:
        raise DataError(f"{path}: expected a folder of frames or a video file, found neither")
