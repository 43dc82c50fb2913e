"""``manifest.json``: what the (torch-free) ONNX Runtime predictor needs to run an export."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from themask.data.vspw import TEST_SCALE, DataError
from themask.io import PathLike, atomic_write

FORMAT = 1  # changes whenever the graphs' I/O or a field change meaning
# the encoder maps IMAGE to FEATURES; the decoder maps T frames' FEATURES (stacked) to SCORES
IMAGE = "image"
FEATURES = ("mask_features", "multi_scale_32", "multi_scale_16", "multi_scale_8")
SCORES = "scores"


@dataclass
class Manifest:
    """Contents of ``manifest.json``. Input: an RGB frame resized to fit ``scale`` (long, short),
    sides stretched to multiples of ``size_divisor``, (x − mean) / std, (1, 3, H, W). Output:
    scores (T, K, H/``mask_stride``, W/``mask_stride``), to upsample bilinearly and argmax."""

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

    def write(self, directory: PathLike) -> Path:
        path = Path(directory) / "manifest.json"
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        return path


def read_manifest(directory: PathLike) -> Manifest:
    """The manifest of an export folder; ``DataError`` naming the file when it or a graph it
    names is missing, or it is unreadable, incomplete or of another format."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: no ONNX export manifest here (write one with themask export)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable JSON manifest ({err})") from err
    data = data if isinstance(data, dict) else {}
    if data.get("format") != FORMAT:
        raise DataError(
            f"{path}: manifest format {data.get('format')!r} (themask "
            f"{data.get('themask_version', '?')}); this themask reads format {FORMAT}: export the "
            "model again"
        )
    names = {f.name for f in dataclasses.fields(Manifest)}
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
