"""Video prediction with an exported model on ONNX Runtime, without torch: the causal sliding
windows of ``StreamingPredictor``, each frame encoded once, scores resized as PyTorch does."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from themask.data.clips import TEST_CLIP_STRIDE, CausalWindows
from themask.data.resize import aligned_size, resize_frame
from themask.data.vspw import DataError
from themask.deploy.manifest import FEATURES, IMAGE, Manifest, read_manifest
from themask.io import PathLike


def resize_bilinear(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, h, w) → (C, H, W) like ``F.interpolate(mode="bilinear", align_corners=False)``."""
    for axis, length in ((1, size[0]), (2, size[1])):
        old = scores.shape[axis]
        if old == length:
            continue
        source = np.maximum((np.arange(length) + 0.5) * (old / length) - 0.5, 0.0)
        low = np.minimum(source.astype(np.int64), old - 1)
        high = np.minimum(low + 1, old - 1)
        shape = [1, 1, 1]
        shape[axis] = length
        weight = (source - low).astype(np.float32).reshape(shape)
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
            raise DataError(
                "ONNX prediction needs onnxruntime: pip install 'themask[onnx]'"
            ) from err
        if step < 1:
            raise DataError(f"--step must be >= 1, got {step}")
        self.directory = Path(model_dir)
        self.manifest: Manifest = read_manifest(self.directory)
        options = ort.SessionOptions()
        threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        self.encoder, self.decoder = (
            ort.InferenceSession(
                str(self.directory / name), options, providers=["CPUExecutionProvider"]
            )
            for name in (self.manifest.encoder, self.manifest.decoder)
        )
        self.windows = CausalWindows(self.manifest.clip_len, step)
        self._padded: tuple[int, int] | None = None  # the stream's network input size

    def push(self, image: np.ndarray) -> np.ndarray:
        """Next frame (3, H, W) float32, normalised → its class scores (K, H, W) float32."""
        height, width = image.shape[-2:]
        divisor = self.manifest.size_divisor
        padded = (-(-height // divisor) * divisor, -(-width // divisor) * divisor)
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


def normalise(frame: np.ndarray, manifest: Manifest) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (3, H, W) float32, (x − mean) / std as in the manifest."""
    mean = np.asarray(manifest.mean, dtype=np.float32)
    std = np.asarray(manifest.std, dtype=np.float32)
    return ((frame.astype(np.float32) - mean) / std).transpose(2, 0, 1)


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
    for frame in frames:
        size = aligned_size(frame.shape[:2], scale, manifest.size_divisor)
        scores = predictor.push(normalise(resize_frame(frame, size), manifest))
        yield frame, resize_bilinear(scores, frame.shape[:2]).argmax(axis=0)
