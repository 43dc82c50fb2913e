"""Numeric precision per device (docs/GPU.md): ``amp`` modes and CUDA math settings.

``amp`` (``train.amp``, ``eval.amp``, ``--amp``): ``auto`` = bf16 autocast on a CUDA device
that supports it, else fp32; ``off``; ``bf16``; ``fp16`` (CUDA only; training adds a grad
scaler). torch is imported inside the functions: ``predict --onnx`` runs without it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    import torch

AMP_MODES = ("auto", "off", "bf16", "fp16")
AmpSpec = Union[str, "torch.dtype", None]


def resolve_amp(amp: AmpSpec, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``; None (also for ``amp=None``): fp32."""
    import torch

    if isinstance(amp, torch.dtype):
        return amp
    if amp is None or amp == "off":
        return None
    if amp == "auto":
        cuda_bf16 = torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if torch.device(device).type != "cuda":
            raise ValueError("amp=fp16 needs a CUDA device; use bf16 or off on CPU")
        return torch.float16
    raise ValueError(f"amp must be one of {list(AMP_MODES)} or a torch dtype, got {amp!r}")


def autocast_context(amp: AmpSpec, device: torch.device | str) -> AbstractContextManager:
    """``torch.autocast`` for ``resolve_amp(amp, device)`` (a no-op context for fp32)."""
    import torch

    dtype = resolve_amp(amp, device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def configure_cuda_math(device: torch.device | str) -> None:
    """On CUDA, process-wide: TF32 matmuls and ``cudnn.benchmark``; a no-op elsewhere."""
    import torch

    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
