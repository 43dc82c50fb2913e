"""``amp`` modes, CUDA math and CPU memory settings (docs/GPU.md); torch is imported inside."""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
X86 = platform.machine().lower() in ("x86_64", "amd64")
AMP_MODES = ("auto", "off", "bf16", "fp16")
AmpSpec = Union[str, "torch.dtype", None]


def resolve_amp(amp: AmpSpec, device: torch.device | str) -> torch.dtype | None:
    """Autocast dtype of ``amp`` (``auto``: bf16 on CUDA if supported) on ``device``; None: fp32."""
    import torch

    if isinstance(amp, torch.dtype):
        return amp
    cuda = torch.device(device).type == "cuda"
    if amp == "auto":
        amp = "bf16" if cuda and torch.cuda.is_bf16_supported() else "off"
    if amp == "fp16" and not cuda:
        raise ValueError("amp=fp16 needs a CUDA device; use bf16 or off on CPU")
    if amp is not None and amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {list(AMP_MODES)} or a torch dtype, got {amp!r}")
    if amp == "bf16" and not cuda and cpu_bf16_units() is False:
        _warn_emulated_bf16()
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "off")


@functools.cache
def cpu_bf16_units() -> bool | None:
    """Whether this x86 CPU has bf16 matrix units (AVX512-BF16 or AMX), by torch's private
    checks; None where unknown (another architecture, or a torch without the checks)."""
    import torch

    checks = [getattr(torch.cpu, f"_is_{n}_supported", None) for n in ("avx512_bf16", "amx_tile")]
    if not X86 or not all(checks):
        return None
    return any(check() for check in checks if check is not None)


@functools.cache
def _warn_emulated_bf16() -> None:
    logger.warning(
        "amp=bf16: this CPU has no bf16 units (AVX512-BF16, AMX); bf16 is emulated, "
        "several times slower than fp32 (use amp off here)"
    )


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


def keep_freed_memory() -> None:
    """glibc, process-wide (the CLI and training set it): large blocks come from the heap, not
    from mmaps of their own, and stay there when freed (1 GiB kept at most), so a step's or a
    clip's large tensors fault in no fresh pages each time (no-op elsewhere)."""
    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmapped blocks (the heap maps more when it must)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


def in_float32(fn: Callable[..., Any], *tensors: torch.Tensor) -> Any:
    """``fn(*tensors)`` in at least float32 under any autocast (in bf16 the pixel decoder's 1×1
    input projections and the transformer decoder flip the argmax of near-tied pixels)."""
    import torch

    with torch.autocast(tensors[0].device.type, enabled=False):
        return fn(*(t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors))
