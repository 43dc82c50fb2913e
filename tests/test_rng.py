"""themask.rng.uniform: torch.rand's values, two from each 64-bit draw, reproducible."""

from __future__ import annotations

import torch

from themask.rng import uniform


def test_draws_follow_the_generator():
    one = uniform(3, 1001, 2, generator=torch.Generator().manual_seed(5))
    assert one.shape == (3, 1001, 2)
    assert torch.equal(one, uniform(3, 1001, 2, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(one, uniform(3, 1001, 2, generator=torch.Generator().manual_seed(6)))
    generator = torch.Generator().manual_seed(5)
    first, second = (uniform(3, 1001, 2, generator=generator) for _ in range(2))
    assert torch.equal(first, one) and not torch.equal(first, second)  # the generator advances
    torch.manual_seed(7)
    default = uniform(5, 3)
    torch.manual_seed(7)
    assert torch.equal(default, uniform(5, 3))  # the default generator when none is given


def test_values_are_uniform_on_torch_rands_lattice_with_independent_halves():
    values = uniform(1 << 20, generator=torch.Generator().manual_seed(1))
    assert values.dtype == torch.float32 and values.min() >= 0 and values.max() < 1
    assert torch.equal(values * 2**24, (values * 2**24).round())  # multiples of 2^-24
    n = len(values)
    assert abs(values.mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(values.var().item() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5
    histogram = torch.histc(values, bins=64, min=0, max=1)
    assert ((histogram - n / 64).abs() < 5 * (n / 64) ** 0.5).all()
    low, high = values.view(-1, 2).unbind(1)  # the two numbers of one 64-bit draw
    correlation = torch.corrcoef(torch.stack([low, high]))[0, 1].item()
    assert abs(correlation) < 5 / (n / 2) ** 0.5
    for half in (low, high):  # each keeps all 24 bits: every bit is set half of the time
        bits = (half * 2**24).long()
        ones = torch.stack([(bits >> b) & 1 for b in range(24)]).float().mean(1)
        assert ((ones - 0.5).abs() < 5 * (0.25 / len(half)) ** 0.5).all()
