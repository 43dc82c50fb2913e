"""``Linear``: ``nn.Linear`` whose float32 products on x86 CPUs run on oneDNN, not on the BLAS
``F.linear`` calls (float32 arithmetic in another order: 2.2× the throughput on the AMD EPYC of
benchmarks/README.md). Elsewhere (CUDA, autocast, float64, export, ``THEMASK_ONEDNN=0``) it is
``F.linear``."""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ENABLED = (
    os.environ.get("THEMASK_ONEDNN", "1") != "0"
    and platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
)


def _product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) @ weight (out, in)ᵀ + bias (out,) → (..., out) on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = _product(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _product(rows.t(), x.reshape(-1, x.shape[-1]).t())  # (out, in)
        grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, on oneDNN for float32 CPU tensors outside autocast and export."""
    if (
        ENABLED
        and x.dtype == weight.dtype == torch.float32
        and x.device.type == "cpu"
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    ):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _OneDNNLinear.apply(x, weight, bias)
        return _product(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) through ``linear``."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
