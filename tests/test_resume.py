"""Checkpoint state, atomic saves and exact resumption of a training run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from naive import load_checkpoint

from themask.config import load_config
from themask.data.loader import build_train_loader
from themask.data.toy import make_toy_dataset
from themask.engine import (
    CHECKPOINT_NAME,
    Trainer,
    get_rng_state,
    save_checkpoint,
    set_rng_state,
)
from themask.logger import read_metrics

STEPS = 4  # 2k with k = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return make_toy_dataset(root, num_train=4, num_val=2, num_frames=6, size=(48, 64))


def _cfg(root):
    # dropout and drop-path stay on: resuming must restore the random streams too
    return load_config(
        None,
        [
            "preset=themask_tiny_t2",
            "model.drop_path_rate=0.1",
            "model.tad_dropout=0.1",
            "loss.num_points=64",
            f"data.root={root}",
            "data.scale=[64, 48]",
            "data.crop_size=[32, 32]",
            "data.num_workers=0",
            "train.batch_size=2",
            f"train.max_steps={STEPS}",
            "train.checkpoint_interval=2",
            "train.log_interval=1",
            "train.lr=1e-3",
        ],
    )


class _Interrupted(Exception):
    pass


def _batches(cfg, stop_after=None):
    """The default training stream; raises after ``stop_after`` batches (a crash)."""

    def make(start_batch):
        loader = build_train_loader(
            cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed, start_batch=start_batch
        )
        for count, batch in enumerate(loader):
            if stop_after is not None and count == stop_after:
                raise _Interrupted
            yield batch

    return make


def test_resume_equals_uninterrupted_run(toy_root, tmp_path):
    cfg = _cfg(toy_root)
    straight = Trainer(cfg, tmp_path / "a", batches=_batches(cfg), evaluate=False, progress=False)
    result_a = straight.train()

    first = Trainer(
        cfg, tmp_path / "b", batches=_batches(cfg, stop_after=2), evaluate=False, progress=False
    )
    with pytest.raises(_Interrupted):
        first.train()  # crashes during step 3, after the checkpoint of step 2
    assert first.step == 2
    losses_before = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl", "train")]
    assert len(losses_before) == 2

    resumed = Trainer(
        cfg, tmp_path / "b", resume=True, batches=_batches(cfg), evaluate=False, progress=False
    )
    assert resumed.step == 2
    result_b = resumed.train()

    assert len(result_a.losses) == STEPS and len(result_b.losses) == STEPS - 2
    assert losses_before + result_b.losses == result_a.losses  # bit-identical
    assert len(set(result_a.losses)) == STEPS  # the losses really change from step to step
    records = read_metrics(tmp_path / "b" / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == result_a.losses

    state_a, state_b = straight.model.state_dict(), resumed.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert (tmp_path / "b" / "model.safetensors").is_file()
    assert (tmp_path / "b" / "config.yaml").is_file()

    # the checkpoint holds the full state and loads with weights_only=True
    state = torch.load(tmp_path / "a" / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert state["step"] == STEPS
    assert state["data"] == {"batches_consumed": STEPS}
    assert set(state["model"]) == set(state_a)
    assert len(state["optimizer"]["state"]) == sum(
        len(g["params"]) for g in straight.optimizer.param_groups
    )
    assert len(state["rng"]) == 1 and set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert state["config"]["train"]["max_steps"] == STEPS


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in NumPy's state
    state = get_rng_state()
    expected = (random.random(), np.random.normal(), np.random.rand(3), torch.rand(3))
    save_checkpoint({"rng": state}, tmp_path / "rng.pt")
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (random.random(), np.random.normal(), np.random.rand(3), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2]) and torch.equal(expected[3], again[3])


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:  # a half-written file ...
            handle.truncate(10)
        raise OSError("disk full")  # ... and the process dies

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temp file left
