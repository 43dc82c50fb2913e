"""A THEMask as ``encoder.onnx`` + ``decoder.onnx`` (``torch.export``, dynamic H, W) + manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from themask import __version__
from themask.config import ConfigError
from themask.data.resize import MEAN, STD
from themask.data.vspw import TEST_SCALE
from themask.deploy.runtime import FEATURES, IMAGE, SCORES, Manifest
from themask.io import PathLike
from themask.modeling.themask import FrameFeatures, THEMask

logger = logging.getLogger(__name__)

OPSET = 18  # the lowest the torch.export-based exporter emits (GridSample needs 16)


class _EncoderGraph(nn.Module):
    def __init__(self, model: THEMask) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        features = self.model._encode_images(image)
        return (features.mask_features, *features.multi_scale)


class _DecoderGraph(nn.Module):
    def __init__(self, model: THEMask, clip_len: int) -> None:
        super().__init__()
        self.model, self.clip_len = model, clip_len

    def forward(self, mask_features: Tensor, *multi_scale: Tensor) -> Tensor:
        features = FrameFeatures(mask_features=mask_features, multi_scale=list(multi_scale))
        predictions = self.model.decode(features, batch=1, frames=self.clip_len)
        return self.model.stride4_scores(predictions)[0]


def export_onnx(
    model: THEMask,
    out_dir: PathLike,
    *,
    clip_len: int,
    class_names: Sequence[str],
    palette: np.ndarray | Sequence[Sequence[int]],
    opset: int = OPSET,
    scale: tuple[int, int] = TEST_SCALE,
) -> Manifest:
    """Write both graphs and the manifest of ``model`` to ``out_dir`` (``ConfigError``: cannot)."""
    if opset < OPSET:
        raise ConfigError(f"--opset must be >= {OPSET}, got {opset}")
    model = model.eval().cpu()
    manifest = Manifest(
        num_classes=model.num_classes,
        clip_len=clip_len,
        class_names=[str(name) for name in class_names],
        palette=np.asarray(palette, dtype=np.uint8).tolist(),
        mean=list(MEAN),
        std=list(STD),
        opset=opset,
        model=dataclasses.asdict(model.config),
        scale=[int(scale[0]), int(scale[1])],
        size_divisor=model.config.size_divisor,
        themask_version=__version__,
    )
    out = Path(out_dir)
    export_decoder(model, out / manifest.decoder, clip_len=clip_len, opset=opset)
    _export(
        _EncoderGraph(model),
        (_sample_image(model),),
        out / manifest.encoder,
        opset,
        input_names=[IMAGE],
        output_names=list(FEATURES),
        dynamic_shapes={"image": _size_dims(model, 1)},
    )
    manifest.write(out)
    return manifest


def _sample_image(model: THEMask) -> Tensor:
    """A (1, 3, H, W) trace input unlike any special case (H ≠ W, both > 1 at stride 32)."""
    divisor = model.config.size_divisor
    return torch.randn(1, 3, 3 * divisor, 4 * divisor, generator=torch.Generator().manual_seed(0))


def _size_dims(model: THEMask, stride: int) -> dict[int, object]:
    """Dynamic H and W of a map at ``stride``: multiples of size_divisor / stride."""
    unit = model.config.size_divisor // stride
    return {2: unit * torch.export.Dim("height"), 3: unit * torch.export.Dim("width")}


def export_decoder(model: THEMask, path: PathLike, *, clip_len: int, opset: int = OPSET) -> None:
    """``decoder.onnx``: ``FEATURES`` of ``clip_len`` frames → scores (T, K, H/4, W/4)."""
    if clip_len < 1:
        raise ConfigError(f"--clip-len must be >= 1, got {clip_len}")
    if clip_len > 1 and not model.is_temporal:
        decoder = f"a single-frame ({model.config.decoder}) decoder takes one frame per window"
        raise ConfigError(f"--clip-len {clip_len}: {decoder}; use --clip-len 1")
    with torch.no_grad():
        features = _EncoderGraph(model.eval())(_sample_image(model))
    _export(
        _DecoderGraph(model, clip_len),
        tuple(part.repeat(clip_len, 1, 1, 1) for part in features),
        Path(path),
        opset,
        input_names=list(FEATURES),
        output_names=[SCORES],
        dynamic_shapes={
            "mask_features": _size_dims(model, 4),
            "multi_scale": tuple(_size_dims(model, stride) for stride in (32, 16, 8)),
        },
    )


def _export(module: nn.Module, args: tuple, path: Path, opset: int, **options) -> None:
    logger.info("exporting %s (opset %d)", path, opset)
    path.parent.mkdir(parents=True, exist_ok=True)
    progress = io.StringIO()  # the exporter prints its steps on stdout: kept for -v
    with torch.no_grad(), contextlib.redirect_stdout(progress):
        torch.onnx.export(
            module.eval(), args, path, dynamo=True, opset_version=opset, verbose=False, **options
        )
    logger.debug("%s", progress.getvalue())
