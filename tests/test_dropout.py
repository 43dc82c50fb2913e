"""The decoders' CPU dropout (masks from themask.rng.uniform) and the explicit attention path
that MultiHeadAttention takes on CPU when its attention weights are dropped."""

from __future__ import annotations

import pytest
import torch
from naive import naive_attention

import themask.modeling.transformer as transformer
from themask.modeling.build import build_model
from themask.modeling.transformer import Dropout, MultiHeadAttention
from themask.rng import uniform

SMALL, LARGE = (3, 7, 5), (2, 100, 2048)  # an odd count (half a 64-bit draw unused), a large one


def _expected_keep(shape, seed):
    """The keep mask the seeded default generator gives (themask.rng.uniform: test_rng.py)."""
    torch.manual_seed(seed)
    return uniform(*shape) >= (0.1 if shape == SMALL else 0.25)


@pytest.mark.parametrize("shape", [SMALL, LARGE])
def test_output_and_gradient_are_x_and_grad_times_the_seeded_mask_over_1_minus_p(shape):
    p = 0.1 if shape == SMALL else 0.25
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator).requires_grad_()
    upstream = torch.randn(shape, generator=generator)
    torch.manual_seed(5)
    out = Dropout(p).train()(x)
    (out * upstream).sum().backward()
    keep = _expected_keep(shape, 5)
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(out, x.detach() * keep / (1 - p), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, upstream * keep / (1 - p), rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_is_1_minus_p_and_kept_values_are_scaled(p):
    torch.manual_seed(0)
    out = Dropout(p).train()(torch.ones(LARGE))
    n = out.numel()
    kept = out != 0
    tolerance = 5 * (p * (1 - p) / n) ** 0.5  # five binomial standard deviations (~0.002)
    assert abs(kept.float().mean().item() - (1 - p)) < tolerance
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 1 / (1 - p)))
    second = Dropout(p).train()(torch.ones(LARGE))  # the generator advanced: another mask
    assert not torch.equal(second != 0, kept)


def test_eval_mode_and_p_zero_are_the_identity_and_draw_nothing(monkeypatch):
    def no_draw(*_, **__):
        raise AssertionError("drew a mask")

    monkeypatch.setattr(transformer, "uniform", no_draw)
    x = torch.randn(4, 6)
    assert torch.equal(Dropout(0.3).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(transformer.dropout(x, 0.0), x)


def test_other_devices_use_torch_dropout(monkeypatch):
    calls = []
    monkeypatch.setattr(transformer, "uniform", lambda *a, **k: calls.append(a))
    out = Dropout(0.2).train()(torch.ones(8, 8, device="meta"))  # meta: no data, no CPU draw
    assert out.device.type == "meta" and out.shape == (8, 8) and calls == []


def test_decoders_use_this_dropout_with_the_same_repr_and_state_dict():
    model = build_model("themask_tiny_t2", num_classes=8, tad_dropout=0.1)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert modules and all(type(m) is Dropout for m in modules.values())
    assert [n for n, m in modules.items() if m.p == 0.1] == [
        f"decoder.temporal.{n}.dropout" if n else "decoder.temporal.dropout"
        for n in ("clip_self_attn", "frame_self_attn", "frame_cross_attn", "frame_ffn", "", "ffn")
    ]
    assert all(repr(m) == f"Dropout(p={m.p}, inplace=False)" for m in modules.values())
    assert all(not m.state_dict() for m in modules.values())


def _attention_inputs(dtype):
    generator = torch.Generator().manual_seed(2)
    query, key, value = torch.randn(3, 2, 6, 8, generator=generator, dtype=dtype).unbind(0)
    allowed = torch.rand(2, 6, 6, generator=generator) > 0.5
    allowed[0, 1] = False  # a row blocked everywhere: SDPA gives zeros there
    allowed[1, :, 0] = True
    return query, key, value, allowed


@pytest.mark.parametrize("with_mask", [False, True])
def test_explicit_attention_path_equals_sdpa_without_its_dropout(monkeypatch, with_mask):
    """Train mode with p > 0 on CPU takes the explicit path; with its dropout replaced by the
    identity it must give SDPA's (eval mode's) values and gradients, fully blocked rows too."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(dim=8, num_heads=2, dropout=0.3).double()
    query, key, value, allowed = _attention_inputs(torch.float64)
    allowed = allowed if with_mask else None
    calls = []
    monkeypatch.setattr(transformer, "dropout", lambda x, p: calls.append(p) or x)

    def run(train):
        attn.train(train)
        attn.zero_grad()
        inputs = [t.clone().requires_grad_() for t in (query, key, value)]
        out = attn(*inputs, allowed)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads = [t.grad for t in inputs] + [p.grad for p in attn.parameters()]
        return out.detach(), grads

    explicit, explicit_grads = run(True)
    assert calls == [0.3]  # the explicit path ran, its dropout on the attention weights
    sdpa, sdpa_grads = run(False)
    assert calls == [0.3]
    torch.testing.assert_close(explicit, sdpa, rtol=1e-12, atol=1e-12)
    for got, expected in zip(explicit_grads, sdpa_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    if with_mask:
        bias = attn.out_proj.bias.detach()
        assert torch.equal(explicit[0, 1], bias)  # blocked row: zero attention, then out_proj


def test_attention_dropout_drops_the_seeded_weights():
    torch.manual_seed(0)
    attn = MultiHeadAttention(dim=8, num_heads=2, dropout=0.3).train()
    query, key, value, allowed = _attention_inputs(torch.float32)
    allowed[0, 1] = True  # naive_attention gives NaN for a row blocked everywhere
    torch.manual_seed(9)
    out = attn(query, key, value, allowed)
    torch.manual_seed(9)
    keep = (uniform(2, 2, 6, 6) >= 0.3) / 0.7  # (B, heads, N, S)
    for b in range(2):
        expected = naive_attention(attn, query[b], key[b], value[b], ~allowed[b], keep[b])
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6)
    no_drop = naive_attention(attn, query[0], key[0], value[0], ~allowed[0])
    assert not torch.allclose(out[0], no_drop, atol=1e-3)
