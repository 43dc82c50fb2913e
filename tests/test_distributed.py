"""DDP: 2 gloo processes on CPU train exactly like 1 process with the same global batch, and
stop together on a signal that reaches one of them."""

from __future__ import annotations

import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from themask import distributed
from themask.config import load_config
from themask.data.toy import make_toy_dataset
from themask.engine import Trainer

STEPS = 3
GLOBAL_BATCH = 4


def test_single_process_helpers():
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1
    value = torch.tensor([1.0, 2.0], requires_grad=True)
    mean = distributed.all_reduce(value, mean=True)
    assert torch.equal(mean, value.detach()) and not mean.requires_grad
    seeds = {distributed.rank_seed(7, r) for r in range(8)}
    assert len(seeds) == 8 and distributed.rank_seed(7, 0) == 7
    info = distributed.init_distributed("cpu")  # no torchrun variables: single process
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert not distributed.is_initialized()


def _cfg(root, max_steps):
    # no dropout / drop-path: every process must compute the same function
    return load_config(
        None,
        [
            "preset=themask_tiny_t2",
            "model.drop_path_rate=0.0",
            "model.tad_dropout=0.0",
            "loss.num_points=64",
            f"data.root={root}",
            "data.scale=[64, 48]",
            "data.crop_size=[32, 32]",
            "data.num_workers=0",
            f"train.batch_size={GLOBAL_BATCH}",
            f"train.max_steps={max_steps}",
            "train.lr=1e-3",
            "train.log_interval=1",
        ],
    )


def deterministic_loss(model, frames, labels, *, step):
    """A loss without random point sampling that uses every output of the network.

    Per-process means over equal batches: the DDP gradient average equals the global mean.
    """
    predictions = model(frames)
    total = frames.new_zeros(())
    for prediction_set in list(predictions.clip) + list(predictions.frame or []):
        logits = prediction_set.class_logits  # (B, N, K+1) or (B, T, N, K+1)
        masks = prediction_set.mask_logits  # (B, N, T, h, w)
        queries, classes = masks.shape[1], logits.shape[-1]
        class_target = (torch.arange(queries) % classes).expand(logits.shape[:-1])
        total = total + F.cross_entropy(logits.reshape(-1, classes), class_target.reshape(-1))
        small = F.interpolate(labels.float(), size=masks.shape[-2:], mode="nearest")  # (B, T, h, w)
        query_class = (torch.arange(queries) % (classes - 1)).view(1, -1, 1, 1, 1)
        mask_target = (small[:, None] == query_class).float()
        total = total + F.binary_cross_entropy_with_logits(masks, mask_target)
    return total, {}


def _train_with_sigterm_on_rank_1(rank, root, out):
    """Rank 1 alone gets SIGTERM during step 1; with log_interval 2 every rank must stop after
    step 2 (the ranks agree at log intervals)."""

    def loss_and_signal(model, frames, labels, *, step):
        if rank == 1 and step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return deterministic_loss(model, frames, labels, step=step)

    cfg = _cfg(root, 6)
    cfg.train.log_interval, cfg.train.checkpoint_interval = 2, 100
    trainer = Trainer(
        cfg, f"{out}/stop", loss_fn=loss_and_signal, device="cpu", evaluate=False, progress=False
    )
    result = trainer.train()
    return {"step": result.step, "stopped_by": result.stopped_by}


def _worker(rank, world_size, port, root, out):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        trainer = Trainer(
            _cfg(root, STEPS),
            f"{out}/run",
            loss_fn=deterministic_loss,
            device="cpu",
            evaluate=False,
            progress=False,
        )
        assert trainer.per_process_batch == GLOBAL_BATCH // world_size
        result = trainer.train()
        # the real objective (random point sampling, num_masks all-reduced) under DDP
        real = Trainer(_cfg(root, 1), f"{out}/real", device="cpu", evaluate=False, progress=False)
        real_result = real.train()
        stopped = _train_with_sigterm_on_rank_1(rank, root, out)
        torch.save(
            {
                "losses": result.losses,
                "state": trainer.model.state_dict(),
                "real_losses": real_result.losses,
                "real_state": real.model.state_dict(),
                "stopped": stopped,
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        distributed.cleanup()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_gloo_processes_match_one_process(tmp_path):
    root = make_toy_dataset(tmp_path / "toy", num_train=4, num_val=1, num_frames=6, size=(48, 64))
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(root), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]

    single = Trainer(
        _cfg(root, STEPS),
        tmp_path / "single",
        loss_fn=deterministic_loss,
        device="cpu",
        evaluate=False,
        progress=False,
    )
    initial = {k: v.clone() for k, v in single.model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        expected = single.train().losses
    finally:
        torch.set_num_threads(threads)

    assert len(expected) == STEPS and len(set(expected)) == STEPS
    # logged losses are the mean over processes = the global-batch loss. Float summation order
    # differs (2 half batches vs 1 batch); Adam's normalisation amplifies that a little.
    assert ranks[0]["losses"][0] == pytest.approx(expected[0], rel=1e-6)
    for rank in ranks:
        assert rank["losses"] == pytest.approx(expected, rel=2e-4)
    # same weights: the DDP-vs-single difference is tiny next to what training changed
    difference, update = 0.0, 0.0
    for key, value in single.model.state_dict().items():
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
        difference += (ranks[0]["state"][key].double() - value.double()).pow(2).sum().item()
        update += (value.double() - initial[key].double()).pow(2).sum().item()
    assert update > 0 and (difference / update) ** 0.5 < 1e-2

    # real loss: finite, same logged value on both ranks, replicas stay identical
    assert ranks[0]["real_losses"] == ranks[1]["real_losses"]
    assert all(torch.isfinite(torch.tensor(ranks[0]["real_losses"])))
    for key in ranks[0]["real_state"]:
        assert torch.equal(ranks[0]["real_state"][key], ranks[1]["real_state"][key]), key
    # a SIGTERM on rank 1 only: both ranks stop after the same step, with a checkpoint
    assert ranks[0]["stopped"] == ranks[1]["stopped"] == {"step": 2, "stopped_by": 15}
    assert torch.load(out / "stop" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not (out / "stop" / "model.safetensors").exists()
    # only rank 0 writes the run directory
    assert (out / "run" / "checkpoint.pt").is_file()
    assert (out / "run" / "model.safetensors").is_file()
