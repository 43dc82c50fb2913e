"""Streaming prediction (causal sliding windows, each frame encoded once); shared helpers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from themask.data.clips import TEST_CLIP_STRIDE, CausalWindows
from themask.data.transforms import TestTransform, normalize_frames
from themask.modeling.themask import THEMask
from themask.precision import AmpSpec, autocast_context

logger = logging.getLogger(__name__)

Transform = Callable[[list[np.ndarray]], Tensor]  # list of (H, W, 3) uint8 → (T, 3, h, w)


def upload(x: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory without blocking the host."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def network_input(transform: Transform, frames: list[np.ndarray], device: torch.device) -> Tensor:
    """``transform(frames)`` (T, 3, h, w) on ``device`` (a ``TestTransform``'s normalised there)."""
    if isinstance(transform, TestTransform):
        return normalize_frames(upload(transform.resize(frames), device))
    return upload(transform(frames), device)


def scores_to_labels(scores: Tensor, size: tuple[int, int]) -> Tensor:
    """Class scores (T, K, h, w) → labels (T, H, W) int64, resized bilinearly frame by frame."""
    labels = []
    for frame_scores in scores:
        resized = frame_scores.float()[None]
        if tuple(resized.shape[-2:]) != tuple(size):
            resized = F.interpolate(resized, size=size, mode="bilinear", align_corners=False)
        labels.append(resized[0].argmax(dim=0))
    return torch.stack(labels)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; afterwards every submodule gets its own mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class StreamingPredictor:
    """Causal sliding windows of ``clip_len`` frames (1 for a single-frame model), each frame
    encoded once; the model (not a DDP wrapper) must be in eval mode."""

    def __init__(self, model: THEMask, *, clip_len: int, step: int = TEST_CLIP_STRIDE) -> None:
        self.model = model
        if not getattr(model, "is_temporal", True) and clip_len != 1:
            logger.info("single-frame model: predicting with clip_len 1 instead of %d", clip_len)
            clip_len = 1
        self.windows = CausalWindows(clip_len, step)

    @torch.no_grad()
    def push(self, frame: Tensor) -> Tensor:
        """Add the next frame (3, h, w), normalised; return its class scores (K, h, w)."""
        parts = self.windows.push(self.model.encode(frame[None, None]))  # B = T = 1 each
        features = parts[0].cat(parts) if len(parts) > 1 else parts[0]
        size = (frame.shape[-2], frame.shape[-1])
        return self.model.semantic_scores(self.model.decode(features, 1, len(parts)), size)[0, -1]


def predict_video(
    model: THEMask,
    frames: Iterable[np.ndarray],
    *,
    clip_len: int,
    transform: Transform,
    device: str | torch.device,
    step: int = TEST_CLIP_STRIDE,
    amp: AmpSpec = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(frame, labels (H, W) int64)`` for each (H, W, 3) uint8 RGB frame of a stream, in
    order (``StreamingPredictor``); where the input size changes, the windows start afresh."""
    device = torch.device(device)
    predictor = StreamingPredictor(model, clip_len=clip_len, step=step)
    input_size = None
    with eval_mode(model):
        for frame in frames:
            inputs = network_input(transform, [frame], device)[0]  # (3, h, w)
            if inputs.shape[-2:] != input_size:
                predictor.windows.reset()
                input_size = inputs.shape[-2:]
            with autocast_context(amp, device):
                scores = predictor.push(inputs)
            yield frame, scores_to_labels(scores[None], frame.shape[:2])[0].cpu().numpy()
