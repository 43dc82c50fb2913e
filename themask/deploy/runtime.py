"""Torch-free prediction on ONNX Runtime: ``manifest.json``, ``StreamingPredictor``'s windows."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from themask.data.clips import TEST_CLIP_STRIDE, CausalWindows
from themask.data.resize import aligned_size, resize_frame
from themask.data.vspw import TEST_SCALE, DataError
from themask.io import PathLike, atomic_write

FORMAT = 1  # changes whenever the graphs' I/O or a field change meaning
# the encoder maps IMAGE to FEATURES; the decoder maps T frames' FEATURES (stacked) to SCORES
IMAGE = "image"
FEATURES = ("mask_features", "multi_scale_32", "multi_scale_16", "multi_scale_8")
SCORES = "scores"


@dataclass
class Manifest:
    """``manifest.json``. Input (1, 3, H, W): a frame fit to ``scale``, sides up to multiples of
    ``size_divisor``, (x − mean) / std. Output: (T, K, H/4, W/4) scores, to upsample bilinearly."""

    num_classes: int
    clip_len: int
    class_names: list[str]
    palette: list[list[int]]
    mean: list[float]
    std: list[float]
    opset: int
    model: dict[str, Any]
    scale: list[int] = field(default_factory=lambda: list(TEST_SCALE))
    size_divisor: int = 32
    mask_stride: int = 4
    padding: str = "zeros, bottom/right, to a multiple of size_divisor"
    encoder: str = "encoder.onnx"
    decoder: str = "decoder.onnx"
    format: int = FORMAT
    themask_version: str = ""

    def write(self, directory: PathLike) -> None:
        with atomic_write(Path(directory) / "manifest.json") as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1) + "\n")


def read_manifest(directory: PathLike) -> Manifest:
    """The manifest of an export folder; ``DataError`` naming the file for any problem with it."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: no ONNX export manifest here (write one with themask export)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable JSON manifest ({err})") from err
    data = data if isinstance(data, dict) else {}
    if data.get("format") != FORMAT:
        version = data.get("themask_version", "?")
        found = f"{path}: manifest format {data.get('format')!r} (themask {version})"
        raise DataError(f"{found}; this themask reads format {FORMAT}: export the model again")
    names = {f.name for f in fields(Manifest)}
    try:
        manifest = Manifest(**{k: v for k, v in data.items() if k in names})
    except TypeError as err:
        raise DataError(f"{path}: incomplete manifest ({err})") from err
    if not len(manifest.class_names) == manifest.num_classes == len(manifest.palette):
        raise DataError(f"{path}: class_names and palette must hold num_classes entries")
    for graph in (manifest.encoder, manifest.decoder):
        if not (path.parent / graph).is_file():
            raise DataError(f"{path.parent / graph}: graph named by {path} is missing")
    return manifest


def resize_bilinear(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) → (C, H, W) like ``F.interpolate(mode="bilinear", align_corners=False)``."""
    for axis, length in ((1, size[0]), (2, size[1])):
        old = scores.shape[axis]
        if old == length:
            continue
        source = np.maximum((np.arange(length) + 0.5) * (old / length) - 0.5, 0.0)
        low = np.minimum(source.astype(np.int64), old - 1)
        high = np.minimum(low + 1, old - 1)
        weight = (source - low).astype(np.float32).reshape((-1, 1) if axis == 1 else -1)
        scores = np.take(scores, low, axis) * (1 - weight) + np.take(scores, high, axis) * weight
    return scores


class OnnxStreamingPredictor:
    """Causal sliding windows of ``manifest.clip_len`` frames ``step`` apart on ONNX Runtime;
    ``threads``: intra-op threads (default: ``OMP_NUM_THREADS`` if set, else ONNX Runtime's)."""

    def __init__(
        self, model_dir: PathLike, *, step: int = TEST_CLIP_STRIDE, threads: int | None = None
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise DataError("ONNX Runtime is not installed: pip install 'themask[onnx]'") from err
        self.directory = Path(model_dir)
        self.manifest: Manifest = read_manifest(self.directory)
        options = ort.SessionOptions()
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.encoder, self.decoder = (
            ort.InferenceSession(str(self.directory / name), options, providers=providers)
            for name in (self.manifest.encoder, self.manifest.decoder)
        )
        self.windows = CausalWindows(self.manifest.clip_len, step)
        self._padded: tuple[int, int] | None = None  # the stream's network input size

    def push(self, image: np.ndarray) -> np.ndarray:
        """Next frame (3, H, W) float32, normalised → its class scores (K, H, W) float32."""
        height, width = image.shape[-2:]
        padded = aligned_size((height, width), None, self.manifest.size_divisor)
        if self._padded not in (None, padded):
            raise DataError(
                f"frame {self.windows.count}: network input {height}×{width} differs from the "
                "earlier frames' in its window; all frames of a stream must share one size"
            )
        self._padded = padded
        batch = np.zeros((1, 3, *padded), dtype=np.float32)
        batch[0, :, :height, :width] = image
        window = self.windows.push(self.encoder.run(list(FEATURES), {IMAGE: batch}))
        inputs = {name: np.concatenate([f[k] for f in window]) for k, name in enumerate(FEATURES)}
        scores = self.decoder.run(None, inputs)[0][-1]  # (K, H'/4, W'/4) of the newest frame
        return resize_bilinear(scores, padded)[:, :height, :width]


def predict_frames(
    predictor: OnnxStreamingPredictor,
    frames: Iterable[np.ndarray],
    *,
    scale: tuple[int, int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(frame, labels (H, W) int64)`` per (H, W, 3) uint8 RGB frame, in order, resized as
    ``TestTransform(scale)`` does (default: the manifest's scale)."""
    manifest = predictor.manifest
    scale = scale or (manifest.scale[0], manifest.scale[1])
    mean, std = (np.asarray(values, dtype=np.float32) for values in (manifest.mean, manifest.std))
    for frame in frames:
        size = aligned_size(frame.shape[:2], scale, manifest.size_divisor)
        image = (resize_frame(frame, size).astype(np.float32) - mean) / std  # (h, w, 3)
        scores = predictor.push(image.transpose(2, 0, 1))
        yield frame, resize_bilinear(scores, frame.shape[:2]).argmax(axis=0)
