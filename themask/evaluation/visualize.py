"""Label maps to pictures: palette colouring, overlays, legends, label PNGs and overlay MP4s."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
from av.video.stream import VideoStream
from PIL import Image, ImageDraw

from themask.io import PathLike

logger = logging.getLogger(__name__)

LEGEND_ROW, LEGEND_BOX, LEGEND_PAD = 14, 10, 3
FOLDER_FPS = 15.0  # overlay.mp4 of a frame folder (VSPW's frame rate)
Palette = np.ndarray | Sequence[Sequence[int]]  # (K, 3) RGB


def _palette_array(palette: Palette) -> np.ndarray:
    arr = np.asarray(palette, dtype=np.uint8)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"palette must be (K, 3) RGB values, got shape {arr.shape}")
    return arr


def colorize(
    labels: np.ndarray, palette: Palette, *, ignore_color: Sequence[int] = (0, 0, 0)
) -> np.ndarray:
    """(H, W) integer labels → (H, W, 3) uint8 RGB; labels outside [0, K) get ``ignore_color``."""
    pal = _palette_array(palette)
    lookup = np.concatenate([pal, np.asarray([ignore_color], dtype=np.uint8)])
    labels = np.asarray(labels).astype(np.int64)
    return lookup[np.where((labels >= 0) & (labels < len(pal)), labels, len(pal))]


def overlay(
    frame: np.ndarray, labels: np.ndarray, palette: Palette, *, alpha: float = 0.5
) -> np.ndarray:
    """(1 − alpha)·frame + alpha·colour of (H, W) labels in [0, K) over an (H, W, 3) uint8 frame."""
    labels = np.asarray(labels)
    if frame.shape[:2] != labels.shape:
        raise ValueError(f"overlay: frame {frame.shape[:2]} and labels {labels.shape} differ")
    colours = colorize(labels, palette).astype(np.float32)
    blended = (1.0 - alpha) * frame.astype(np.float32) + alpha * colours
    valid = (labels >= 0) & (labels < len(palette))
    out = np.where(valid[..., None], blended, frame.astype(np.float32))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def draw_legend(
    image: np.ndarray,
    class_ids: Iterable[int],
    class_names: Sequence[str],
    palette: Palette,
    *,
    max_entries: int = 12,
) -> np.ndarray:
    """A copy of the (H, W, 3) image with a legend top left: ≤ ``max_entries`` rows that fit."""
    pal = _palette_array(palette)
    fit = max(0, (image.shape[0] - LEGEND_PAD) // LEGEND_ROW)
    ids = [int(c) for c in class_ids if 0 <= int(c) < len(pal)][: min(max_entries, fit)]
    picture = Image.fromarray(np.ascontiguousarray(image))
    if not ids:
        return np.asarray(picture)
    draw, row, box, pad = ImageDraw.Draw(picture), LEGEND_ROW, LEGEND_BOX, LEGEND_PAD
    width = max(draw.textlength(class_names[c]) for c in ids) + box + 3 * pad
    draw.rectangle([0, 0, int(width), row * len(ids) + pad], fill=(0, 0, 0))
    for i, c in enumerate(ids):
        top = pad + i * row
        draw.rectangle([pad, top, pad + box, top + box], fill=tuple(int(v) for v in pal[c]))
        draw.text((2 * pad + box, top - 1), class_names[c], fill=(255, 255, 255))
    return np.asarray(picture)


def with_legend(
    image: np.ndarray, class_ids: Iterable[int], class_names: Sequence[str], palette: Palette
) -> np.ndarray:
    """(H, W, 3) image → (H, W + L, 3): a legend panel on its right, L fitting the longest name."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = int(max(draw.textlength(name) for name in class_names)) + LEGEND_BOX + 4 * LEGEND_PAD
    canvas = np.zeros((image.shape[0], width, 3), dtype=np.uint8)
    legend = draw_legend(canvas, class_ids, class_names, palette, max_entries=len(class_names))
    return np.concatenate([image, legend], axis=1)


def save_label_png(labels: np.ndarray, path: PathLike, palette: Palette) -> None:
    """Write (H, W) train ids (0 … K−1, < 256) as a palettised 'P' PNG (VSPW prediction format)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"{path}: labels must fit in uint8, got {labels.min()} … {labels.max()}")
    pal = _palette_array(palette)
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: min(256, len(pal))] = pal[:256]
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(flat.reshape(-1).tolist())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


class OverlayVideoWriter(AbstractContextManager):
    """RGB frames to an MP4 (PyAV: H.264, else MPEG-4 part 2) of the first frame's size (even)."""

    def __init__(self, path: PathLike, *, fps: float = 15.0) -> None:
        self.path, self.fps = Path(path), fps
        self._container: av.container.OutputContainer | None = None
        self._stream: VideoStream | None = None
        self._size = (0, 0)  # (H, W) of the first frame

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame."""
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"OverlayVideoWriter: expected (H, W, 3) frames, got {frame.shape}")
        if self._container is None or self._stream is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            codec: Literal["libx264", "mpeg4"] = (
                "libx264" if "libx264" in av.codecs_available else "mpeg4"
            )
            rate = Fraction(self.fps).limit_denominator(1001)
            self._container = av.open(str(self.path), mode="w")
            self._stream = self._container.add_stream(codec, rate=rate)
            self._size = (frame.shape[0], frame.shape[1])
            self._stream.height, self._stream.width = (side + side % 2 for side in self._size)
            self._stream.pix_fmt = "yuv420p"
            logger.debug("writing %s with codec %s at %s fps", self.path, codec, rate)
        if frame.shape[:2] != self._size:  # scaled into it, keeping its aspect ratio, on black
            height, width = self._size
            factor = min(height / frame.shape[0], width / frame.shape[1])
            new_w = max(1, min(width, round(frame.shape[1] * factor)))
            new_h = max(1, min(height, round(frame.shape[0] * factor)))
            scaled = Image.fromarray(frame).resize((new_w, new_h), Image.Resampling.BILINEAR)
            top, left = (height - new_h) // 2, (width - new_w) // 2
            frame = np.zeros((height, width, 3), dtype=np.uint8)
            frame[top : top + new_h, left : left + new_w] = np.asarray(scaled)
        height, width = frame.shape[:2]
        frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)

    def close(self) -> None:
        if self._container is None or self._stream is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None


def write_predictions(
    input_path: PathLike,
    out: PathLike,
    segment: Callable[[Iterator[np.ndarray]], Iterable[tuple[np.ndarray, np.ndarray]]],
    *,
    class_names: Sequence[str],
    palette: Palette,
    fps: float | None = None,
    alpha: float = 0.5,
) -> int:
    """Write ``out/labels/*.png``, ``out/overlays/*.png`` and ``out/overlay.mp4`` (``fps``: else the
    video's, or 15) of a video or frame folder; ``segment``: frames → ``(frame, labels (H, W))``."""
    from tqdm import tqdm

    from themask.data.video_io import iter_input_frames, video_frame_rate

    if fps is None and Path(input_path).is_file():
        fps = video_frame_rate(input_path)
    out = Path(out)
    names: list[str] = []

    def frames() -> Iterator[np.ndarray]:
        for name, frame in iter_input_frames(input_path):
            names.append(name)
            yield frame

    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    with OverlayVideoWriter(out / "overlay.mp4", fps=fps or FOLDER_FPS) as writer:
        for frame, labels in tqdm(segment(frames()), desc="predict", unit="frame", disable=None):
            save_label_png(labels, out / "labels" / f"{names[-1]}.png", palette)
            picture = overlay(frame, labels, palette, alpha=alpha)
            picture = with_legend(picture, np.unique(labels), class_names, palette)
            Image.fromarray(picture).save(out / "overlays" / f"{names[-1]}.png")
            writer.write(picture)
    return len(names)


def comparison_panel(
    frame: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    class_names: Sequence[str],
    palette: Palette,
    *,
    scale: int = 2,
) -> np.ndarray:
    """GT | prediction overlays of an (H, W, 3) frame, upscaled ``scale``× (nearest), a legend."""
    gap = np.full((frame.shape[0], 4, 3), 255, dtype=np.uint8)
    panels = [overlay(frame, gt, palette), gap, overlay(frame, pred, palette)]
    pair = Image.fromarray(np.concatenate(panels, axis=1))
    pair = pair.resize((pair.width * scale, pair.height * scale), Image.Resampling.NEAREST)
    shown = sorted(set(np.unique(gt).tolist()) | set(np.unique(pred).tolist()))
    return with_legend(np.asarray(pair), shown, class_names, palette)


def plot_loss_curve(
    metrics_path: PathLike, png_path: PathLike, *, title: str | None = None
) -> None:
    """PNG of the training loss (and the matched-query fractions) from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from themask.logger import read_metrics

    records = read_metrics(metrics_path, tag="train")
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], color="tab:blue", label="total loss")
    ax.set(xlabel="step", ylabel="loss", title=title or "")
    ax.grid(alpha=0.3)
    keys = ("matched_fraction_round1", "matched_fraction_round2")
    fractions = [k for k in keys if k in records[0]]
    if fractions:
        right = ax.twinx()
        for key, colour in zip(fractions, ("tab:orange", "tab:green")):
            right.plot(steps, [r[key] for r in records], color=colour, lw=1, label=key)
        right.set_ylabel("fraction of queries matched")
        right.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
