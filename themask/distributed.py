"""Thin DDP helpers: set-up from the torchrun environment, rank queries, reductions.

``torchrun --nproc-per-node N -m themask train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; without them everything runs as a single
process and the helpers below are no-ops.
"""

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
    local_rank: int = 0
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


def get_rank_from_env() -> int:
    """This process's rank as set by torchrun (0 without torchrun), before any set-up."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): only this process writes files."""
    return get_rank() == 0


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Initialise the process group from the torchrun environment (if present).

    ``device``: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available). The backend is NCCL
    on CUDA and gloo on CPU; on CUDA each process uses ``cuda:LOCAL_RANK``, also passed to
    NCCL as ``device_id`` so it binds to that device at once.
    """
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, device_id=dev if use_cuda else None
        )
        logger.info("process group: %s, rank %d of %d", backend, rank, world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def rank_seed(seed: int, rank: int) -> int:
    """Per-rank seed: ranks draw different augmentations and dropout masks."""
    return seed + 1000 * rank


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce(value: torch.Tensor, *, mean: bool = False) -> torch.Tensor:
    """Sum (``mean``: average) of ``value`` over the processes, as a new detached tensor on
    its device (a copy in a single-process run); nothing waits for the device. NCCL reduces
    CUDA tensors only, so a CPU tensor travels through the current CUDA device."""
    out = value.detach().clone()
    if get_world_size() == 1:
        return out
    staged = out
    if dist.get_backend() == "nccl" and out.device.type != "cuda":
        staged = out.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(staged)
    if staged is not out:
        out.copy_(staged)
    return out / get_world_size() if mean else out


def cleanup() -> None:
    """Destroy the process group (safe to call when none exists).

    No barrier: commands call this in ``finally``, and after a failure on one rank a barrier
    would keep the others waiting for it until the NCCL timeout. Successful runs synchronise
    before (the trainer's final barrier, the evaluation's reductions).
    """
    if is_initialized():
        dist.destroy_process_group()
