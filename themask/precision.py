"""Numeric precision per device: ``amp`` modes, the fp16 grad scaler, CUDA math settings.

``amp`` (``train.amp``, ``eval.amp``, ``--amp``): ``auto`` (default) = bf16 autocast on a CUDA
device that supports it, fp32 elsewhere; ``off``; ``bf16``; ``fp16`` (CUDA only; training adds a
grad scaler). The criterion and matcher cast to fp32 themselves. See docs/GPU.md.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import torch
# torch is imported inside the functions: the command modules import AMP_MODES when the CLI
# is built, and `themask predict --onnx` must run without torch.

__all__ = [
    "AMP_MODES",
    "AmpSpec",
    "autocast_context",
    "configure_cuda_math",
    "grad_scaler",
    "resolve_amp",
]

AMP_MODES = ("auto", "off", "bf16", "fp16")
AmpSpec = Union[str, "torch.dtype", None]


def resolve_amp(amp: AmpSpec, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (None: fp32). ``None`` means ``"off"``."""
    import torch

    device = torch.device(device)
    if isinstance(amp, torch.dtype):
        return amp
    if amp is None or amp == "off":
        return None
    if amp == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("amp=fp16 needs a CUDA device; use bf16 or off on CPU")
        return torch.float16
    raise ValueError(f"amp must be one of {list(AMP_MODES)} or a torch dtype, got {amp!r}")


def autocast_context(amp: AmpSpec, device: torch.device | str) -> AbstractContextManager:
    """``torch.autocast`` for ``resolve_amp(amp, device)`` (a no-op context for fp32)."""
    import torch

    device = torch.device(device)
    dtype = resolve_amp(amp, device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device) -> Any:
    """A dynamic loss scaler for fp16 training (``torch.amp.GradScaler``)."""
    import torch

    return torch.amp.GradScaler(device.type)


def configure_cuda_math(device: torch.device | str) -> None:
    """On CUDA: TF32 for fp32 matmuls and ``cudnn.benchmark`` (process-wide); no-op elsewhere.

    TF32 keeps fp32's range with a 10-bit mantissa in matmul inputs: fine for training and
    evaluation, set ``torch.set_float32_matmul_precision("highest")`` after this to undo it.
    """
    import torch

    if torch.device(device).type != "cuda":
        return
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
