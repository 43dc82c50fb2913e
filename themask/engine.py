"""The training loop (docs/DESIGN.md §6), 1 process or DDP; ``--resume`` is bit for bit on CPU."""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from themask import distributed
from themask.config import ConfigError, RunConfig, save_config, to_dict
from themask.data.loader import batch_to_device, build_train_loader
from themask.evaluation.evaluate import evaluate_config
from themask.evaluation.metrics import scalar_metrics, summarize_metrics
from themask.io import PathLike, atomic_write
from themask.logger import MetricWriter, git_revision
from themask.loss.criterion import SetCriterion, training_loss
from themask.modeling.build import build_model_from_config
from themask.modeling.themask import THEMask
from themask.optim import build_optimizer, poly_lr, set_learning_rate
from themask.precision import autocast_context, configure_cuda_math, keep_freed_memory, resolve_amp
from themask.warm_start import init_from_weights
from themask.weights import load_backbone_weights, save_model

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
RESUME_CHANGES_NAME = "resume_changes.jsonl"
BAR_FIELDS = {"loss": "loss", "m1": "matched_fraction_round1", "m2": "matched_fraction_round2"}
STOP_CHECK_INTERVAL = 10  # DDP ranks agree on a stop request at least this often
# keys a resumed run may change without altering the optimisation ("eval.": the section)
RESUMABLE_KEYS = """train.max_steps train.log_interval train.checkpoint_interval train.init_from
    train.eval_interval train.eval_at_end pretrained_backbone eval. data.num_workers data.root
    data.val_split data.test_clip_len""".split()

# (model, frames (B, T, 3, H, W), labels (B, T, H, W), *, step) -> (total, {name: float | 0-d})
LossFn = Callable[..., tuple[Tensor, dict[str, Any]]]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as plain values."""
    np_name, np_keys, *np_rest = cast(tuple, np.random.get_state())  # legacy: a tuple
    return {
        "python": random.getstate(),  # tuples (lists in older checkpoints)
        "numpy": [np_name, np_keys.tolist(), *np_rest],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, *np_rest = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), *np_rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: PathLike) -> None:
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the ``.<name>.*.tmp`` files a killed ``atomic_write`` left."""
    for path in run_dir.glob(".*.tmp"):
        if path.is_file():
            path.unlink()
            logger.info("removed %s, left by an interrupted write", path)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(stored: dict[str, Any], new: dict[str, Any], step: int) -> dict[str, list]:
    """``{key: [stored, new]}`` of the changed keys; ``ConfigError`` if exactness breaks."""
    old_flat, new_flat = _flatten(stored), _flatten(new)
    changes = {
        key: [old_flat.get(key), new_flat.get(key)]
        for key in sorted(set(old_flat) | set(new_flat))
        if old_flat.get(key) != new_flat.get(key)
    }
    refused = [
        f"{key}: {old!r} -> {value!r}"
        for key, (old, value) in changes.items()
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)
    ]
    if "train.max_steps" in changes and new_flat["train.max_steps"] <= step:
        refused.append(f"train.max_steps: {new_flat['train.max_steps']} is not above step {step}")
    if refused:
        differs = "the config differs from the checkpoint's where exact resumption needs"
        advice = "resume with the original values or start a new run (--out)"
        raise ConfigError(f"--resume: {differs} it unchanged ({'; '.join(refused)}); {advice}")
    return changes


class StopRequest:
    """SIGINT/SIGTERM: the first sets ``signum`` (stop after this step), a second raises."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum, name = signum, signal.Signals(signum).name
        logger.warning("%s: checkpoint and stop after this step (again: stop at once)", name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class StepWindow(list[dict[str, Any]]):
    """Per-step scalars (floats, 0-d tensors) since the last log record, read in one transfer."""

    def read(self, *, reduce: bool = False) -> list[dict[str, float]]:
        """The rows as floats (``reduce``: averaged over processes) and clear."""
        tensors = sorted(k for k, v in self[0].items() if isinstance(v, Tensor))
        floats = sorted(k for k in self[0] if k not in tensors)
        stacked = torch.stack([torch.stack([r[k].float() for k in tensors]) for r in self])
        host = torch.tensor([[float(r[k]) for k in floats] for r in self], dtype=torch.float64)
        table = torch.cat([stacked.double().cpu(), host.reshape(len(self), -1)], dim=1)
        if reduce:
            table = distributed.all_reduce(table, mean=True)
        self.clear()
        return [dict(zip(tensors + floats, row)) for row in table.tolist()]


def window_means(rows: list[dict[str, float]], *, count_skipped: bool) -> dict[str, float]:
    """Means per name; ``count_skipped`` (fp16): rows of non-finite ``grad_norm`` only counted."""
    kept = [r for r in rows if math.isfinite(r["grad_norm"])] if count_skipped else rows
    means = {name: sum(r[name] for r in kept) / len(kept) if kept else math.nan for name in rows[0]}
    if count_skipped:
        means["skipped_steps"] = float(len(rows) - len(kept))
    return means


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # mean total loss of each step run here
    eval_metrics: dict[str, float] | None = None
    weights_path: Path | None = None
    stopped_by: int | None = None  # the signal that stopped the run early


class Trainer:
    """Trains ``cfg`` into ``run_dir``; ``model``, ``loss_fn``, ``batches``: tests, custom runs."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: PathLike,
        *,
        resume: bool = False,
        device: str | None = None,
        model: THEMask | None = None,
        loss_fn: LossFn | None = None,
        batches: Callable[[int], Iterator[Any]] | None = None,
        evaluate: bool = True,
        progress: bool = True,
        overwrite: bool = False,
    ) -> None:
        self.cfg, tcfg, self.run_dir = cfg, cfg.train, Path(run_dir)
        checkpoint = self.run_dir / CHECKPOINT_NAME
        if not resume and not overwrite and checkpoint.exists():
            choice = "resume it (--resume) or choose another run directory (--out)"
            held = f"{self.run_dir} already holds a training run ({CHECKPOINT_NAME})"
            raise FileExistsError(f"{held}; {choice}")
        state, changes = None, {}
        if resume:  # refuse early, create nothing
            if not checkpoint.exists():
                raise FileNotFoundError(f"--resume: no {CHECKPOINT_NAME} in {self.run_dir}")
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            changes = resume_changes(state["config"], to_dict(cfg), int(state["step"]))
        self.dist = distributed.init_distributed(device)
        self.device, self.is_main = self.dist.device, self.dist.is_main
        self.per_process_batch = tcfg.per_process_batch(self.dist.world_size)
        self.evaluate_enabled, self.progress = evaluate, progress

        seed_everything(distributed.rank_seed(tcfg.seed, 0))  # same init on every rank
        if model is None:
            model = build_model_from_config(cfg.model)
            if cfg.pretrained_backbone:
                load_backbone_weights(model.backbone, cfg.pretrained_backbone)  # logs the source
        self.model = model
        if tcfg.checkpoint_activations:
            model.set_activation_checkpointing(True)
        if tcfg.init_from and not resume:
            init_from_weights(model, tcfg.init_from, head_init=tcfg.head_init)
            logger.info("initialised from %s (head_init=%s)", tcfg.init_from, tcfg.head_init)
        self.frozen = [getattr(model, name).requires_grad_(False) for name in tcfg.freeze]
        model.to(self.device)
        self.optimizer = build_optimizer(model, tcfg)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        try:
            self.amp_dtype = resolve_amp(tcfg.amp, self.device)
        except ValueError as err:
            raise ConfigError(f"train.amp: {err}") from None
        configure_cuda_math(self.device)
        keep_freed_memory()
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.ddp_model: nn.Module = model
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if loss_fn is None:
            self.criterion = SetCriterion(cfg.loss, cfg.model.num_classes)
            divisor = cfg.model.size_divisor
            loss_fn = partial(training_loss, criterion=self.criterion, size_divisor=divisor)
        self.loss_fn, self._batches_fn = loss_fn, batches
        seed_everything(distributed.rank_seed(tcfg.seed, self.dist.rank))

        self.step, self._resume_state = 0, state
        if state is not None:
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.step = int(state["step"])
            logger.info("resumed from %s at step %d", checkpoint, self.step)
        self._loader = None  # the data before the run directory: a failed start leaves nothing
        if batches is None:
            self._loader = build_train_loader(
                cfg.data,
                batch_size=self.per_process_batch,
                seed=tcfg.seed,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                start_batch=self.step * tcfg.grad_accum,
                pin_memory=self.device.type == "cuda",
            )
        self.writer: MetricWriter | None = None
        if self.is_main:
            self._open_run_dir(resume, changes)

    def _open_run_dir(self, resume: bool, changes: dict[str, list]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.run_dir)
        if not (self.run_dir / "config.yaml").exists() or not resume:
            save_config(self.cfg, self.run_dir / "config.yaml")
        if changes:  # config.yaml keeps the original
            with open(self.run_dir / RESUME_CHANGES_NAME, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": self.step, "changes": changes}) + "\n")
            logger.info("resumed with changes %s (see %s)", changes, RESUME_CHANGES_NAME)
        info = {"git_revision": git_revision(), "world_size": self.dist.world_size}
        with atomic_write(self.run_dir / "run_info.json") as tmp:
            tmp.write_text(json.dumps(info, indent=2))
        self.writer = MetricWriter(self.run_dir)
        self.writer.truncate_after(self.step)  # a new run (step 0) starts a new log
        logger.info("git revision %s; run dir %s", info["git_revision"], self.run_dir)

    def save(self) -> None:
        """Write the full training state (a collective under DDP)."""
        rng: list[Any] = [get_rng_state()]
        if self.dist.world_size > 1:
            rng = [None] * self.dist.world_size
            dist.all_gather_object(rng, get_rng_state())
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": rng,
            "data": {"batches_consumed": self.step * self.cfg.train.grad_accum},
            "world_size": self.dist.world_size,
            "config": to_dict(self.cfg),
        }
        if self.is_main:
            save_checkpoint(state, self.run_dir / CHECKPOINT_NAME)
            logger.info("checkpoint at step %d", self.step)
        distributed.barrier()
        self._saved_step = self.step

    def _stop_requested(self, stop: StopRequest) -> int | None:
        """The stopping signal, the same on every rank (DDP: agreed every few steps)."""
        if self.dist.world_size == 1:
            return stop.signum
        if self.step % min(self.cfg.train.log_interval, STOP_CHECK_INTERVAL):
            return None
        flag = torch.tensor([stop.signum or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def _set_train_mode(self) -> None:
        """Train mode; frozen modules stay in eval mode."""
        self.model.train()
        for module in self.frozen:
            module.eval()

    def _forward_backward(self, batch: Any, step: int, last_micro: bool) -> dict[str, Any]:
        frames, labels = batch_to_device(batch, self.device)
        sync: AbstractContextManager[None] = nullcontext()
        if isinstance(self.ddp_model, nn.parallel.DistributedDataParallel) and not last_micro:
            sync = self.ddp_model.no_sync()
        with sync:
            with autocast_context(self.amp_dtype, self.device):
                total, terms = self.loss_fn(self.ddp_model, frames, labels, step=step)
            loss = total / self.cfg.train.grad_accum
            if self.scaler is not None:
                loss = self.scaler.scale(loss)
            loss.backward()
        values = {**terms, "loss": total}
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in values.items()}

    def _optimizer_step(self) -> Tensor:
        """Clip, step; returns the gradient norm before clipping (a 0-d device tensor)."""
        clip = self.cfg.train.clip_grad_norm
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip if clip > 0 else float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return norm.detach()

    def _log_window(self, window: StepWindow, result: TrainResult, bar: tqdm) -> None:
        rows = window.read(reduce=self.dist.world_size > 1)
        result.losses.extend(row["loss"] for row in rows)
        means = window_means(rows, count_skipped=self.scaler is not None)
        if self.writer is not None:
            self.writer.write(self.step, means)
            logger.debug("step %d loss %.4f lr %.3g", self.step, means["loss"], means["lr"])
        postfix = {k: f"{means.get(name, math.nan):.3f}" for k, name in BAR_FIELDS.items()}
        bar.set_postfix(postfix, refresh=False)

    def train(self) -> TrainResult:
        """Run until ``train.max_steps`` or a signal."""
        tcfg, result = self.cfg.train, TrainResult(step=self.step)
        start = self.step * tcfg.grad_accum
        batches = iter(self._loader) if self._loader is not None else self._batches_fn(start)  # type: ignore[misc]
        if self._resume_state is not None:  # after the loader, which may draw from the RNGs
            rng = self._resume_state["rng"]
            if len(rng) == self.dist.world_size:
                set_rng_state(rng[self.dist.rank])
            else:
                message = "checkpoint has RNG states of %d processes, not %d: reseeding"
                logger.warning(message, len(rng), self.dist.world_size)
                seed_everything(distributed.rank_seed(tcfg.seed + self.step, self.dist.rank))
            self._resume_state = None
        hide = not (self.is_main and self.progress)
        bar = tqdm(
            total=tcfg.max_steps, initial=self.step, desc="train", disable=hide, dynamic_ncols=True
        )
        bar.mininterval = 0.1 if sys.stderr.isatty() else 30.0  # 30 s in a log file
        self._set_train_mode()
        self._saved_step = -1
        try:
            with StopRequest() as stop:
                result.stopped_by = self._loop(batches, bar, result, stop)
        finally:
            bar.close()
            # the workers ignore SIGTERM: end them now, whatever still refers to the iterator
            getattr(batches, "_shutdown_workers", lambda: None)()
            self._loader = None
        result.step = self.step
        if self.is_main and result.stopped_by is None:  # the final weights
            path, data = self.run_dir / "model.safetensors", self.cfg.data
            names, colours = data.description.classes, data.description.palette
            save_model(self.model, path, class_names=names, palette=colours, test_scale=data.scale)
            logger.info("final weights: %s", path)
            result.weights_path = path
        if self.writer is not None:
            self.writer.close()
        distributed.barrier()
        return result

    def _loop(
        self, batches: Iterator[Any], bar: tqdm, result: TrainResult, stop: StopRequest
    ) -> int | None:
        """The steps up to ``max_steps``; the signal that stopped it early, if any."""
        tcfg, window = self.cfg.train, StepWindow()
        while self.step < tcfg.max_steps:
            lr = poly_lr(self.step, tcfg.lr, tcfg.max_steps, tcfg.poly_power)
            set_learning_rate(self.optimizer, lr)
            self.optimizer.zero_grad(set_to_none=True)
            sums: dict[str, Any] = {}
            for micro in range(tcfg.grad_accum):
                last = micro == tcfg.grad_accum - 1
                for k, v in self._forward_backward(next(batches), self.step, last).items():
                    v = v / tcfg.grad_accum if tcfg.grad_accum > 1 else v
                    sums[k] = sums[k] + v if k in sums else v
            sums["grad_norm"] = self._optimizer_step()
            self.step += 1
            window.append({**sums, "lr": lr})
            bar.update(1)
            end = self.step == tcfg.max_steps
            if self.step % tcfg.log_interval == 0 or end:
                self._log_window(window, result, bar)
            if self.step % tcfg.checkpoint_interval == 0 or end:
                self.save()
            periodic = tcfg.eval_interval > 0 and self.step % tcfg.eval_interval == 0
            if self.evaluate_enabled and (periodic or (end and tcfg.eval_at_end)):
                result.eval_metrics = self.run_evaluation()
                self._set_train_mode()
            stopped_by = self._stop_requested(stop)
            if stopped_by is not None and not end:
                if self._saved_step != self.step:
                    self.save()
                return stopped_by
        return None

    def run_evaluation(self) -> dict[str, float]:
        """Evaluate on ``data.val_split`` (all ranks) and log the scalar metrics."""
        rng = get_rng_state()  # evaluation must not change the training random stream
        progress = self.progress and self.is_main
        results = evaluate_config(self.model, self.cfg, device=self.device, progress=progress)
        set_rng_state(rng)
        metrics = scalar_metrics(results)
        if self.writer is not None:
            self.writer.write(self.step, metrics, tag="eval")
        logger.info("eval at step %d (%%): %s", self.step, summarize_metrics(metrics))
        return metrics
