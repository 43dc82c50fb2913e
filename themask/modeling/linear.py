"""``Linear``: ``nn.Linear`` with float32 x86 CPU products on oneDNN, not on ``F.linear``'s BLAS
(same arithmetic, other order; 1.0–2.2× the throughput on the EPYCs of benchmarks/README.md), and
``F.linear`` elsewhere (CUDA, autocast, float64, export, ``THEMASK_ONEDNN=0``); ``bmm`` likewise;
``SameConv2d``: a convolution whose weight gradient is products on ``torch.mm`` where faster."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input

from themask.precision import X86


def _available() -> bool:
    """oneDNN's inner product is there and answers as expected (it is not public API)."""
    try:
        one = torch.ones(1, 1)
        return torch.ops.mkldnn._linear_pointwise(one, one, None, "none", [], "").item() == 1.0
    except (AttributeError, RuntimeError, TypeError):
        return False


ENABLED = (
    os.environ.get("THEMASK_ONEDNN", "1") != "0"
    and X86
    and torch.backends.mkldnn.is_available()
    and _available()
)
# the weight gradient's product needs a transposed copy of the input on oneDNN: it pays on
# AVX-512, not on AVX2, where torch.mm is faster for it (benchmarks/README.md)
WEIGHT_GRAD_ON_ONEDNN = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _product(x: Tensor, weight: Tensor, bias: Tensor | None = None, post: str = "none") -> Tensor:
    """x (..., in) @ weight (out, in)ᵀ + bias (out,) → (..., out) on oneDNN, then ``post``
    ("none" or "relu") fused."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], "")


def onednn_weight_grad(x: Tensor, grad: Tensor) -> Tensor:
    """gradᵀ @ x: (N, out), (N, in) → (out, in) on oneDNN, which copies its input and reads the
    weight in place: the narrower matrix goes in as the input."""
    if x.shape[1] < grad.shape[1]:
        return _product(x.t(), grad.t()).t()
    return _product(grad.t(), x.t())


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
        grad_w, flat = None, x.reshape(-1, x.shape[-1])  # (out, in), (N, in)
        if ctx.needs_input_grad[1]:
            grad_w = onednn_weight_grad(flat, rows) if WEIGHT_GRAD_ON_ONEDNN else rows.t().mm(flat)
        grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _on_onednn(x: Tensor, weight: Tensor) -> bool:
    return (
        ENABLED
        and x.dtype == weight.dtype == torch.float32
        and x.device.type == "cpu"
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def _records(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``F.linear`` (then ReLU if ``relu``), on oneDNN for float32 CPU tensors outside autocast
    and export (the ReLU fused in where no gradient is recorded)."""
    if not _on_onednn(x, weight):
        out = F.linear(x, weight, bias)
    elif not _records(x, weight, bias):
        return _product(x, weight, bias, "relu" if relu else "none")
    else:
        out = _OneDNNLinear.apply(x, weight, bias)
    return F.relu(out) if relu else out


class _BatchedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return torch.stack([_product(a_g, b_g.t()) for a_g, b_g in zip(a, b)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, b = ctx.saved_tensors
        grad_a = torch.bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        return grad_a, torch.bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None


def bmm(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm``: a (G, M, K) @ b (G, K, N) → (G, M, N), each product on oneDNN where
    ``linear`` would be (b[g] is read as a weight: fastest with N-major rows, e.g. channels-last
    features); the backward, rarely needed, on ``torch.bmm``."""
    return _BatchedProduct.apply(a, b) if _on_onednn(a, b) else torch.bmm(a, b)


class _ShiftedRowsConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        size, pad = weight.shape[-1], weight.shape[-1] // 2
        grad_x = (
            conv2d_input(x.shape, weight, grad, padding=pad) if ctx.needs_input_grad[0] else None
        )
        # output pixel (h, w) reads padded input pixel (h + i, w + j). On the rows of the padded
        # grid that is row p + i·W' + j for p = h·W' + w, so with the output gradient at row p
        # (zero off the map) tap (i, j)'s weight gradient is one product of two row ranges
        rows = F.pad(x, [pad] * 4).permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (N·H'·W', in)
        grads = F.pad(grad, [0, 2 * pad] * 2).permute(0, 2, 3, 1).reshape(len(rows), -1)
        offsets = [i * (x.shape[-1] + 2 * pad) + j for i in range(size) for j in range(size)]
        taps = [grads[: len(rows) - o].t().mm(rows[o:]) for o in offsets]  # (out, in) each
        return grad_x, torch.stack(taps, -1).view(weight.shape)


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d(in, out, k, padding=k // 2, bias=False)`` (same keys); off AVX-512 its float32
    CPU weight gradient is k² ``torch.mm`` products of row ranges of the padded input (the FPN
    layer's backward 0.55-0.83× the time of ``convolution_backward``, benchmarks/README.md)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )

    def forward(self, x: Tensor) -> Tensor:
        if WEIGHT_GRAD_ON_ONEDNN or not (_on_onednn(x, self.weight) and _records(self.weight)):
            return super().forward(x)
        return _ShiftedRowsConv.apply(x, self.weight)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) through ``linear``."""

    def forward(self, x: Tensor, relu: bool = False) -> Tensor:
        return linear(x, self.weight, self.bias, relu)
