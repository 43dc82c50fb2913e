"""Uniform draws for the training step's large random tensors. PyTorch's CPU generator fills one
number at a time on one core; here large CPU draws are split into ``PARTS`` pieces, each filled by
its own generator seeded from the caller's, on worker threads: deterministic for a given seed
and shape, whatever the thread count."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

PARTS = 4  # fixed, so that the numbers do not depend on the thread count
MIN_SPLIT = 1 << 16  # smaller draws: one plain ``torch.rand``
_pools: dict[int, ThreadPoolExecutor] = {}  # by worker count (torch.get_num_threads)
os.register_at_fork(after_in_child=_pools.clear)  # a forked child has no pool threads


def uniform(
    *shape: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> Tensor:
    """float32 (*shape) uniform in [0, 1), the same values as ``torch.rand`` takes (multiples of
    2^-24); large CPU draws are filled in parallel, from seeds drawn from ``generator``."""
    device = torch.device(device)
    count = 1
    for size in shape:
        count *= size
    if device.type != "cpu" or count < MIN_SPLIT:
        return torch.rand(*shape, device=device, generator=generator)
    workers = min(PARTS, torch.get_num_threads())
    pool = _pools.setdefault(workers, ThreadPoolExecutor(workers, thread_name_prefix="rng"))
    seeds = torch.randint(1 << 62, (PARTS,), generator=generator).tolist()
    out = torch.empty(shape)
    parts = out.view(-1).chunk(PARTS)
    fills = [
        pool.submit(part.uniform_, generator=torch.Generator().manual_seed(seed))
        for part, seed in zip(parts, seeds)
    ]
    for fill in fills:
        fill.result()
    return out
