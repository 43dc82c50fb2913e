"""DDP helpers (torchrun environment, rank queries, the one reduction); no-ops in 1 process."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the torchrun process group if any (NCCL on ``cuda:LOCAL_RANK``, else gloo)."""
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, device_id=dev if use_cuda else None
        )
        logger.info("process group: %s, rank %d of %d", backend, rank, world_size)
    return DistInfo(rank=rank, world_size=world_size, device=dev)


def rank_seed(seed: int, rank: int) -> int:
    """Per-rank seed: ranks draw different augmentations and dropout masks."""
    return seed + 1000 * rank


def barrier() -> None:
    if is_initialized():
        dist.barrier()


_LAST_REDUCED: list[torch.Tensor] = []


def all_reduce(value: torch.Tensor, *, mean: bool = False) -> torch.Tensor:
    """Sum (``mean``: average) over the processes as a new detached tensor on ``value``'s device."""
    out = value.detach().clone()
    if get_world_size() == 1:
        return out
    staged = out.cuda() if dist.get_backend() == "nccl" and out.device.type != "cuda" else out
    dist.all_reduce(staged)
    # kept: gloo dropping the last reference can hang destroy_process_group (torch < 2.8, PR 154976)
    _LAST_REDUCED[:] = [*_LAST_REDUCED[-3:], staged]
    out = staged.to(value.device)
    return out / get_world_size() if mean else out


def cleanup() -> None:
    """Destroy the process group, without a barrier (a failed rank would hang it)."""
    if is_initialized():
        dist.destroy_process_group()
