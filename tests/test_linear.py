"""``themask.modeling.linear``: float32 CPU products on oneDNN and ``SameConv2d``'s weight
gradient against a float64 reference, the cases that stay on ``F.linear`` / ``nn.Conv2d``, and
the whole model with and without these paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from themask.loss.criterion import SetCriterion, training_loss
from themask.modeling import linear as linear_module
from themask.modeling.build import build_model, preset_loss_config
from themask.modeling.linear import Linear, SameConv2d, bmm, linear

pytestmark = pytest.mark.skipif(not linear_module.ENABLED, reason="oneDNN path off here")


@pytest.fixture
def calls(monkeypatch):
    """Counts the products that run on oneDNN."""
    count = []
    product = linear_module._product

    def counted(*args):
        count.append(1)
        return product(*args)

    monkeypatch.setattr(linear_module, "_product", counted)
    return count


def reference(x, weight, bias):
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


CASES = {
    "2d": lambda g: (torch.randn(70, 48, generator=g), torch.randn(24, 48, generator=g)),
    "3d": lambda g: (torch.randn(2, 35, 48, generator=g), torch.randn(24, 48, generator=g)),
    # a transposed input and a row slice of a larger weight (MultiHeadAttention's in_proj)
    "strided": lambda g: (
        torch.randn(2, 48, 35, generator=g).transpose(1, 2),
        torch.randn(72, 48, generator=g)[24:48],
    ),
}


@pytest.fixture(params=[True, False], ids=["weight_grad_onednn", "weight_grad_mm"])
def weight_grad_on_onednn(request, monkeypatch):
    """Both weight-gradient products (oneDNN on AVX-512, torch.mm on AVX2), on any CPU."""
    monkeypatch.setattr(linear_module, "WEIGHT_GRAD_ON_ONEDNN", request.param)
    return request.param


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_equal_the_float64_product(
    case, with_bias, calls, weight_grad_on_onednn
):
    gen = torch.Generator().manual_seed(0)
    x, weight = CASES[case](gen)
    bias = torch.randn(24, generator=gen) if with_bias else None
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    bias_leaf = bias.clone().requires_grad_() if with_bias else None
    out = linear(*leaves, bias_leaf)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    assert len(calls) == 2 + weight_grad_on_onednn  # forward, input and weight gradients
    torch.testing.assert_close(out.double(), reference(x, weight, bias), rtol=0, atol=1e-5)
    want = [t.double().requires_grad_() for t in (x, weight)]
    want_bias = bias.double().requires_grad_() if with_bias else None
    reference(*want, want_bias).backward(grad.double())
    for got, expected in zip(leaves, want):
        torch.testing.assert_close(got.grad.double(), expected.grad, rtol=0, atol=1e-4)
    if with_bias:
        torch.testing.assert_close(bias_leaf.grad.double(), want_bias.grad, rtol=0, atol=1e-4)


def test_only_the_gradients_asked_for_are_computed(calls, weight_grad_on_onednn):
    x, weight = torch.randn(10, 8), torch.randn(6, 8, requires_grad=True)
    linear(x, weight).sum().backward()
    assert len(calls) == 1 + weight_grad_on_onednn  # no product for x's gradient
    assert weight.grad is not None
    torch.testing.assert_close(weight.grad, torch.ones(10, 6).t() @ x)


@pytest.mark.parametrize("grad", [False, True])
def test_relu_fused_or_after_equals_relu_of_the_product(grad, calls):
    gen = torch.Generator().manual_seed(1)
    x, weight, bias = (torch.randn(*s, generator=gen) for s in ((40, 16), (12, 16), (12,)))
    weight.requires_grad_(grad)
    out = linear(x, weight, bias, relu=True)
    expected = reference(x, weight.detach(), bias).clamp_min(0)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    assert len(calls) == 1 and (out == 0).any()
    if grad:  # the gradient stops where the ReLU clipped
        out.backward(torch.ones_like(out))
        want = ((expected > 0).double().t() @ x.double()).float()
        torch.testing.assert_close(weight.grad, want, rtol=0, atol=1e-4)


def test_a_bias_alone_that_needs_its_gradient_gets_it():
    x, weight, bias = torch.randn(9, 4), torch.randn(3, 4), torch.zeros(3, requires_grad=True)
    linear(x, weight, bias).sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((3,), 9.0))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bmm_values_and_gradients_equal_the_float64_product(layout, calls):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    maps = torch.randn(3, 16, 5, 6, generator=gen).contiguous(memory_format=layout)
    b = maps.requires_grad_().flatten(2)  # (3, 16, 30), rows 30-major when channels-last
    out = bmm(a, b)
    assert len(calls) == 3  # one product per group
    want = a.detach().double() @ b.detach().double()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    torch.testing.assert_close(a.grad, grad @ b.detach().transpose(1, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(maps.grad.flatten(2), a.detach().transpose(1, 2) @ grad)


def _shifted_rows(out: torch.Tensor) -> bool:
    return out.grad_fn is not None and out.grad_fn.name() == "_ShiftedRowsConvBackward"


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(("size", "batch"), [(3, 2), (3, 1), (5, 2)])
def test_same_conv_values_and_gradients_equal_the_float64_convolution(
    layout, size, batch, weight_grad_on_onednn
):
    gen = torch.Generator().manual_seed(3)
    conv = SameConv2d(6, 4, size)
    x = torch.randn(batch, 6, 7, 5, generator=gen).contiguous(memory_format=layout)
    out = conv(x.requires_grad_())
    assert _shifted_rows(out) != weight_grad_on_onednn  # the row products only off AVX-512
    grad = torch.randn(out.shape, generator=gen).contiguous(memory_format=layout)
    out.backward(grad)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, conv.weight))
    want = F.conv2d(x64, w64, padding=size // 2)
    want.backward(grad.double())
    assert conv.padding == (size // 2,) * 2 and conv.bias is None
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad.double(), w64.grad, rtol=0, atol=1e-4)


def test_same_conv_without_a_weight_gradient_is_nn_conv2d(monkeypatch):
    monkeypatch.setattr(linear_module, "WEIGHT_GRAD_ON_ONEDNN", False)
    conv, x = SameConv2d(4, 4, 3), torch.randn(1, 4, 6, 6, requires_grad=True)
    plain = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
    plain.load_state_dict(conv.state_dict())  # the same keys
    assert _shifted_rows(conv(x))
    conv.weight.requires_grad_(False)  # frozen: nothing for the row products to do
    out = conv(x)
    assert not _shifted_rows(out) and torch.equal(out, plain(x))
    conv.weight.requires_grad_(True)
    with torch.no_grad():  # no gradient recorded
        assert torch.equal(conv(x), plain(x))


def test_outside_float32_cpu_it_is_f_linear(calls):
    x, weight, bias = torch.randn(5, 8), torch.randn(3, 8), torch.randn(3)
    assert torch.equal(
        linear(x.double(), weight.double(), bias.double()),
        F.linear(x.double(), weight.double(), bias.double()),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x, weight, bias).dtype == torch.bfloat16
    assert torch.equal(linear(x[:0], weight, bias), F.linear(x[:0], weight, bias))
    assert not calls
    with torch.no_grad():
        linear(x, weight, bias)
    assert len(calls) == 1


def test_repeated_calls_are_bit_identical():
    layer = Linear(64, 32)
    x = torch.randn(300, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x))
    assert list(layer.state_dict()) == ["weight", "bias"]  # nn.Linear's keys


@pytest.mark.parametrize("preset", ["themask_tiny_t2", "mask2former_tiny"])
def test_model_scores_loss_and_gradients_match_the_blas_path(
    preset, monkeypatch, weight_grad_on_onednn
):
    torch.manual_seed(0)
    model = build_model(preset, num_classes=4)
    criterion = SetCriterion(preset_loss_config(preset), num_classes=4)
    clip, labels = torch.randn(1, 2, 3, 64, 64), torch.randint(0, 4, (1, 2, 64, 64))
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(linear_module, "ENABLED", enabled)
        with torch.no_grad():
            scores = model.eval()(clip)
        torch.manual_seed(1)  # the same points and dropout masks
        model.train().zero_grad()
        loss = training_loss(model, clip, labels, criterion)[0]
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((scores, loss.detach(), grads))
    (fast_scores, fast_loss, fast_grads), (scores, loss, grads) = results
    torch.testing.assert_close(fast_scores, scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_loss, loss, rtol=1e-4, atol=0)
    assert len(fast_grads) == len(grads) > 0
    for fast, plain in zip(fast_grads, grads):
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4 * plain.abs().max() + 1e-7)


def test_an_inner_product_that_fails_or_is_missing_turns_the_path_off(monkeypatch):
    assert linear_module._available()

    def broken(*args):
        raise RuntimeError("changed signature")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken)
    assert not linear_module._available()
    monkeypatch.setattr(torch.ops, "mkldnn", object())  # a build without the op
    assert not linear_module._available()
