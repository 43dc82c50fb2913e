"""themask.rng.uniform: torch.rand's values, drawn in parallel pieces, reproducible."""

from __future__ import annotations

import torch

from themask.rng import MIN_SPLIT, PARTS, uniform


def _draw(seed: int, threads: int, shape: tuple[int, ...]) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return uniform(*shape, generator=torch.Generator().manual_seed(seed))
    finally:
        torch.set_num_threads(before)


def test_large_draws_do_not_depend_on_the_thread_count_and_follow_the_seed():
    shape = (3, MIN_SPLIT, 2)
    one, two = _draw(5, 1, shape), _draw(5, 2, shape)
    assert torch.equal(one, two)
    assert not torch.equal(one, _draw(6, 2, shape))
    generator = torch.Generator().manual_seed(5)
    first, second = (uniform(*shape, generator=generator) for _ in range(2))
    assert torch.equal(first, one) and not torch.equal(first, second)  # the generator advances


def test_large_draws_are_uniform_on_torch_rands_lattice_with_independent_pieces():
    values = _draw(1, 2, (PARTS * MIN_SPLIT,))
    assert values.dtype == torch.float32 and values.min() >= 0 and values.max() < 1
    assert torch.equal(values * 2**24, (values * 2**24).round())  # multiples of 2^-24
    pieces = values.view(PARTS, -1)
    for piece in pieces:  # each piece alone: mean 1/2 and variance 1/12 within 5 sigma
        assert abs(piece.mean().item() - 0.5) < 5 * (1 / 12 / len(piece)) ** 0.5
        assert abs(piece.var().item() - 1 / 12) < 5 * (1 / 180 / len(piece)) ** 0.5
    histogram = torch.histc(values, bins=16, min=0, max=1)
    expected = len(values) / 16
    assert ((histogram - expected).abs() < 5 * expected**0.5).all()
    correlation = torch.corrcoef(pieces)  # distinct seeds: no piece repeats another
    assert (correlation - torch.eye(PARTS)).abs().max() < 5 / len(pieces[0]) ** 0.5


def test_small_draws_are_torch_rand_from_the_same_generator():
    drawn = uniform(2, 5, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(3)))
