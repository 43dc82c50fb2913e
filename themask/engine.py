"""Iteration-based training loop (docs/DESIGN.md §6): one ``Trainer`` for 1 process or DDP.

A run directory holds:

* ``config.yaml`` (resolved config) and ``run_info.json`` (git revision, world size);
* ``checkpoint.pt``: the latest full training state, written atomically every
  ``train.checkpoint_interval`` steps (model, optimizer, grad scaler, per-rank RNG states,
  step, data position); it loads with ``torch.load(weights_only=True)``;
* ``metrics.jsonl`` and ``tensorboard/``: train terms every ``log_interval`` steps (means
  over the steps since the previous record; with fp16, steps the grad scaler skipped for
  inf/NaN gradients are left out of the means and counted in ``skipped_steps``), eval metrics
  after each evaluation; ``train.log``;
* ``model.safetensors``: the final weights (``themask.weights.save_model``), with the
  class names, palette and test scale (``data.scale``) in its metadata.

``--resume`` reloads ``checkpoint.pt`` and continues so that the remaining losses and the
final weights equal those of an uninterrupted run (bit for bit on CPU; on CUDA see
docs/GPU.md). The config may change only where that stays true (``RESUMABLE_KEYS``:
intervals, a longer ``max_steps``, workers, ...); such changes are appended to
``resume_changes.jsonl``, ``config.yaml`` keeps the original.

SIGINT/SIGTERM: the current step finishes, a checkpoint is written and ``train`` returns
with ``stopped_by`` set (a second signal stops at once). Temporary files left by a killed
write are removed when the run directory is opened.

The step keeps its scalars (loss terms, grad norm) on the device and reads them back once
per ``log_interval`` steps, so a CUDA step does not wait for the host.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from themask import distributed
from themask.config import FREEZABLE_MODULES, ConfigError, RunConfig, save_config, to_dict
from themask.data.loader import batch_to_device, build_train_loader
from themask.evaluation.evaluate import evaluate_config
from themask.evaluation.metrics import scalar_metrics, summarize_metrics
from themask.io import PathLike, atomic_write
from themask.logger import MetricWriter, git_revision
from themask.loss import SetCriterion, training_loss
from themask.modeling.build import build_model_from_config
from themask.modeling.themask import THEMask
from themask.optim import build_optimizer, poly_lr, set_learning_rate
from themask.precision import autocast_context, configure_cuda_math, grad_scaler, resolve_amp
from themask.warm_start import init_from_weights
from themask.weights import load_backbone_weights, save_model

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
FINAL_WEIGHTS_NAME = "model.safetensors"
RESUME_CHANGES_NAME = "resume_changes.jsonl"
# Under DDP the ranks agree on a stop request (all-reduce) every train.log_interval steps,
# at least every this many.
STOP_CHECK_INTERVAL = 10
# Config keys a resumed run may change: they do not alter the optimisation (data.root: a
# dataset moved to another place is assumed to be the same dataset).
RESUMABLE_KEYS = (
    *(f"train.{k}" for k in ("max_steps", "log_interval", "checkpoint_interval", "init_from")),
    *("train.eval_interval", "train.eval_at_end", "pretrained_backbone", "eval."),
    *(f"data.{k}" for k in ("num_workers", "root", "val_split", "test_clip_len")),
)

# (model, frames (B, T, 3, H, W), labels (B, T, H, W), *, step) -> (total, terms); the terms
# are floats or 0-d tensors
LossFn = Callable[..., tuple[Tensor, dict[str, Any]]]


# ---------------------------------------------------------------------------------------------
# RNG state as plain Python values (loadable with weights_only=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states; NumPy's as lists and ints."""
    py_version, py_state, py_gauss = random.getstate()
    # the global RandomState is an MT19937, whose legacy state is this tuple (never a dict)
    np_state = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(
        (np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss)
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(state: dict[str, Any], path: PathLike) -> None:
    """Write a training state atomically: a crash mid-write keeps the previous file."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read a training state written by ``save_checkpoint`` (tensors and plain values only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files an interrupted ``atomic_write`` (a SIGKILL) left."""
    stale = [p for p in run_dir.glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink()
        logger.info("removed %s, left by an interrupted write", path)
    return stale


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(stored: dict[str, Any], new: dict[str, Any], step: int) -> dict[str, list]:
    """``{key: [stored value, new value]}`` of the config keys a resumed run changes.

    Raises ``ConfigError`` naming the keys when a change would break exact resumption (any
    key outside ``RESUMABLE_KEYS``, or ``train.max_steps`` below the checkpoint's step).
    """
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
        raise ConfigError(
            "--resume: the config differs from the checkpoint's where exact resumption needs "
            f"it unchanged ({'; '.join(refused)}); resume with the original values or start a "
            "new run (--out)"
        )
    return changes


class StopRequest:
    """SIGINT/SIGTERM handling while training: the first signal asks the loop to stop after
    the current step (``signum`` is set); a second one stops at once (``KeyboardInterrupt``).
    Handlers are installed on entering and restored on exit (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(
            "%s: stopping after this step and writing a checkpoint (again to stop at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


# ---------------------------------------------------------------------------------------------
# model set-up helpers


def freeze_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """Stop gradients of ``model.<name>`` for each name; returns the frozen modules."""
    frozen = []
    for name in names:
        if name not in FREEZABLE_MODULES or not hasattr(model, name):
            raise ValueError(f"train.freeze: cannot freeze '{name}'; valid: {FREEZABLE_MODULES}")
        module = getattr(model, name)
        module.requires_grad_(False)
        frozen.append(module)
    return frozen


class StepWindow:
    """Per-step scalars since the last log record, kept where they were made (0-d device
    tensors stay on the device) and read back in one transfer by ``read``."""

    def __init__(self) -> None:
        self.tensor_names: list[str] = []
        self.float_names: list[str] = []
        self.tensor_rows: list[Tensor] = []  # one (n,) float32 vector per step
        self.float_rows: list[list[float]] = []

    def __len__(self) -> int:
        return len(self.tensor_rows)

    def add(self, values: dict[str, Any]) -> None:
        """One step's values (floats or 0-d tensors; the same names and kinds every step)."""
        if not self.tensor_rows:
            self.tensor_names = sorted(k for k, v in values.items() if isinstance(v, Tensor))
            self.float_names = sorted(k for k in values if k not in self.tensor_names)
        self.tensor_rows.append(torch.stack([values[k].float() for k in self.tensor_names]))
        self.float_rows.append([float(values[k]) for k in self.float_names])

    def read(self, *, reduce: bool = False) -> list[dict[str, float]]:
        """The rows as floats (``reduce``: averaged over processes, a collective) and clear."""
        values = torch.stack(self.tensor_rows).double()  # (S, n) on the device
        names = self.tensor_names + self.float_names
        if reduce:
            floats = torch.tensor(self.float_rows, dtype=torch.float64).reshape(len(values), -1)
            both = torch.cat([values, floats.to(values.device)], dim=1)
            rows = distributed.all_reduce(both, mean=True).tolist()
        else:
            rows = [a + b for a, b in zip(values.tolist(), self.float_rows)]
        self.tensor_rows, self.float_rows = [], []
        return [dict(zip(names, row)) for row in rows]


def window_means(rows: list[dict[str, float]], *, count_skipped: bool) -> dict[str, float]:
    """Means of ``rows`` per name. ``count_skipped`` (fp16): rows with a non-finite
    ``grad_norm`` (steps the grad scaler skipped) are left out and counted in ``skipped_steps``."""
    kept = rows
    means: dict[str, float] = {}
    if count_skipped:
        kept = [r for r in rows if math.isfinite(r["grad_norm"])]
        means["skipped_steps"] = float(len(rows) - len(kept))
    for name in rows[0]:
        means[name] = sum(r[name] for r in kept) / len(kept) if kept else math.nan
    return means


# ---------------------------------------------------------------------------------------------
# the trainer


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # mean total loss of each step run here
    eval_metrics: dict[str, float] | None = None
    weights_path: Path | None = None
    stopped_by: int | None = None  # signal number when a SIGINT/SIGTERM stopped the run early


class Trainer:
    """Trains ``cfg`` into ``run_dir``.

    ``model``/``loss_fn``/``batches`` default to those built from ``cfg`` (preset model,
    ``training_loss`` with a ``SetCriterion`` of ``cfg.loss`` built once, the data module's
    infinite train loader);
    passing them in is for tests and custom runs. ``batches(start_batch)`` must return an
    iterator of ``Batch`` for this process that starts after ``start_batch`` consumed batches.
    A new run refuses a directory that holds a checkpoint unless ``overwrite``.
    """

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
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        if not resume and not overwrite and (self.run_dir / CHECKPOINT_NAME).exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a training run ({CHECKPOINT_NAME}); resume it "
                "(--resume) or choose another run directory (--out)"
            )
        stored = self._read_checkpoint(cfg) if resume else None  # refuse early, create nothing
        self.dist = distributed.init_distributed(device)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.per_process_batch = cfg.train.per_process_batch(self.dist.world_size)
        self.evaluate_enabled = evaluate
        self.progress = progress
        if cfg.train.max_steps <= 0:
            raise ValueError(f"train.max_steps must be positive, got {cfg.train.max_steps}")

        seed_everything(distributed.rank_seed(cfg.train.seed, 0))  # same init on every rank
        self.model = model if model is not None else self._build_model()
        if cfg.train.checkpoint_activations:
            self.model.set_activation_checkpointing(True)
        if cfg.train.init_from and not resume:
            init_from_weights(self.model, cfg.train.init_from, head_init=cfg.train.head_init)
            logger.info(
                "initialised from %s (head_init=%s)", cfg.train.init_from, cfg.train.head_init
            )
        self.frozen = freeze_modules(self.model, list(cfg.train.freeze))
        self.model.to(self.device)
        self.optimizer = build_optimizer(
            self.model,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            backbone_lr_mult=cfg.train.backbone_lr_mult,
        )
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        try:
            self.amp_dtype = resolve_amp(cfg.train.amp, self.device)
        except ValueError as err:
            raise ConfigError(f"train.amp: {err}") from None
        configure_cuda_math(self.device)
        self.scaler = grad_scaler(self.device) if self.amp_dtype == torch.float16 else None
        self.ddp_model: nn.Module = self.model
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if loss_fn is None:
            self.criterion = SetCriterion(cfg.loss, cfg.model.num_classes)
            loss_fn = partial(
                training_loss, criterion=self.criterion, size_divisor=cfg.model.size_divisor
            )
        self.loss_fn = loss_fn
        self._batches_fn = batches
        seed_everything(distributed.rank_seed(cfg.train.seed, self.dist.rank))

        self.step = 0
        self._resume_state: dict[str, Any] | None = None
        changes: dict[str, list] = {}
        if stored is not None:
            self._resume_state, changes = stored
            self._apply_resume_state(self._resume_state)
        # the data before the run directory: a run that cannot start leaves nothing behind
        self._loader = self._build_loader() if batches is None else None

        self.writer: MetricWriter | None = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.run_dir)
            if not (self.run_dir / "config.yaml").exists() or not resume:
                save_config(cfg, self.run_dir / "config.yaml")
            if changes:  # config.yaml keeps the original; each resume's changes are appended
                with open(self.run_dir / RESUME_CHANGES_NAME, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"step": self.step, "changes": changes}) + "\n")
                logger.info("resumed with changes %s (see %s)", changes, RESUME_CHANGES_NAME)
            info = {"git_revision": git_revision(), "world_size": self.dist.world_size}
            with atomic_write(self.run_dir / "run_info.json") as tmp:
                tmp.write_text(json.dumps(info, indent=2))
            self.writer = MetricWriter(self.run_dir)
            self.writer.truncate_after(self.step)  # a new run (step 0) starts a new log
            logger.info(
                "git revision %s; run dir %s (resolved config in config.yaml)",
                info["git_revision"],
                self.run_dir,
            )
            logger.debug("config:\n%s", json.dumps(to_dict(cfg), indent=1))

    # -- construction ------------------------------------------------------------------------

    def _build_model(self) -> THEMask:
        model = build_model_from_config(self.cfg.model)
        if self.cfg.pretrained_backbone:
            load_backbone_weights(model.backbone, self.cfg.pretrained_backbone)
            logger.info("backbone weights from %s", self.cfg.pretrained_backbone)
        return model

    def _build_loader(self) -> Any:
        """The train loader of this rank, from the current step (no worker started yet)."""
        return build_train_loader(
            self.cfg.data,
            batch_size=self.per_process_batch,
            seed=self.cfg.train.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            start_batch=self.step * self.cfg.train.grad_accum,  # grad_accum batches per step
            pin_memory=self.device.type == "cuda",
        )

    def _read_checkpoint(self, cfg: RunConfig) -> tuple[dict[str, Any], dict[str, list]]:
        """The checkpoint to resume and the (harmless) config changes since it was written."""
        path = self.run_dir / CHECKPOINT_NAME
        if not path.exists():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT_NAME} in {self.run_dir}")
        state = load_checkpoint(path)
        changes = resume_changes(state["config"], to_dict(cfg), int(state["step"]))
        return state, changes

    def _apply_resume_state(self, state: dict[str, Any]) -> None:
        path = self.run_dir / CHECKPOINT_NAME
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        logger.info("resumed from %s at step %d", path, self.step)

    # -- state -------------------------------------------------------------------------------

    def _gather_rng_states(self) -> list[dict[str, Any]]:
        local = get_rng_state()
        if self.dist.world_size == 1:
            return [local]
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, local)
        return gathered

    def checkpoint_state(self) -> dict[str, Any]:
        """The full training state after ``self.step`` optimizer steps (call on every rank)."""
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": self._gather_rng_states(),
            "data": {"batches_consumed": self.step * self.cfg.train.grad_accum},
            "world_size": self.dist.world_size,
            "config": to_dict(self.cfg),
        }

    def save(self) -> None:
        state = self.checkpoint_state()  # collective: every rank takes part
        if self.is_main:
            save_checkpoint(state, self.run_dir / CHECKPOINT_NAME)
            logger.info("checkpoint at step %d", self.step)
        distributed.barrier()
        self._saved_step = self.step

    def _stop_requested(self, stop: StopRequest) -> int | None:
        """The signal number when the run must stop after this step, the same on every rank.

        One process: the handler's flag (no cost). DDP: the ranks all-reduce (max) their
        flags every ``min(train.log_interval, STOP_CHECK_INTERVAL)`` steps, so they stop
        together.
        """
        if self.dist.world_size == 1:
            return stop.signum
        if self.step % min(self.cfg.train.log_interval, STOP_CHECK_INTERVAL):
            return None
        flag = torch.tensor([stop.signum or 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    # -- training ----------------------------------------------------------------------------

    def _set_train_mode(self) -> None:
        """Train mode; frozen modules stay in eval mode (no stochastic depth in them)."""
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
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        values = {k: v.detach() if isinstance(v, Tensor) else v for k, v in terms.items()}
        values["loss"] = total.detach()
        return values

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

    def _log_window(self, window: StepWindow, result: TrainResult, bar: Any) -> None:
        """Read the window's scalars back (one transfer; a collective under DDP) and log them."""
        rows = window.read(reduce=self.dist.world_size > 1)
        result.losses.extend(row["loss"] for row in rows)
        means = window_means(rows, count_skipped=self.scaler is not None)
        if self.writer is not None:
            self.writer.write(self.step, means)
            logger.debug("step %d loss %.4f lr %.3g", self.step, means["loss"], means["lr"])
        if bar is not None:
            bar.set_postfix(
                loss=f"{means['loss']:.3f}",
                m1=f"{means.get('matched_fraction_round1', math.nan):.3f}",
                m2=f"{means.get('matched_fraction_round2', math.nan):.3f}",
                refresh=False,
            )

    def train(self) -> TrainResult:
        """Run until ``train.max_steps``; returns the losses of the steps run here."""
        tcfg = self.cfg.train
        result = TrainResult(step=self.step)
        if self._loader is not None:
            batches = iter(self._loader)
        else:
            batches = self._batches_fn(self.step * tcfg.grad_accum)  # type: ignore[misc]
        if self._resume_state is not None:
            # after the loader exists (creating it may draw from the RNGs)
            rng = self._resume_state["rng"]
            if len(rng) == self.dist.world_size:
                set_rng_state(rng[self.dist.rank])
            else:
                logger.warning(
                    "checkpoint has RNG states of %d processes, this run has %d: reseeding",
                    len(rng),
                    self.dist.world_size,
                )
                seed_everything(distributed.rank_seed(tcfg.seed + self.step, self.dist.rank))
            self._resume_state = None
        bar = None
        if self.is_main and self.progress:
            # In a log file (no terminal) redraw at most every 30 s instead of every step.
            bar = tqdm(
                total=tcfg.max_steps,
                initial=self.step,
                desc="train",
                dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0,
            )
        self._set_train_mode()
        self._saved_step = -1
        try:
            with StopRequest() as stop:
                result.stopped_by = self._loop(batches, bar, result, stop)
        finally:
            if bar is not None:
                bar.close()
            # end the loader's workers now, whatever still refers to the iterator (a traceback):
            # they ignore SIGTERM, so the interpreter's exit could not stop them
            getattr(batches, "_shutdown_workers", lambda: None)()
            self._loader = None
        result.step = self.step
        if self.is_main and result.stopped_by is None:
            result.weights_path = self.save_final_weights()
        if self.writer is not None:
            self.writer.close()
        distributed.barrier()
        return result

    def _loop(
        self,
        batches: Iterator[Any],
        bar: Any,
        result: TrainResult,
        stop: StopRequest,
    ) -> int | None:
        """The steps up to ``train.max_steps``; returns the signal number if one stopped it
        early (after a checkpoint of the last finished step)."""
        tcfg = self.cfg.train
        window = StepWindow()  # per-step scalars since the last log record
        while self.step < tcfg.max_steps:
            lr = poly_lr(self.step, tcfg.lr, tcfg.max_steps, tcfg.poly_power)
            set_learning_rate(self.optimizer, lr)
            self.optimizer.zero_grad(set_to_none=True)
            sums: dict[str, Any] = {}
            for micro in range(tcfg.grad_accum):
                terms = self._forward_backward(
                    next(batches), self.step, micro == tcfg.grad_accum - 1
                )
                for k, v in terms.items():
                    v = v / tcfg.grad_accum if tcfg.grad_accum > 1 else v
                    sums[k] = sums[k] + v if k in sums else v
            sums["grad_norm"] = self._optimizer_step()
            self.step += 1
            window.add({**sums, "lr": lr})
            if bar is not None:
                bar.update(1)
            if self.step % tcfg.log_interval == 0 or self.step == tcfg.max_steps:
                self._log_window(window, result, bar)
            if self.step % tcfg.checkpoint_interval == 0 or self.step == tcfg.max_steps:
                self.save()
            periodic = tcfg.eval_interval > 0 and self.step % tcfg.eval_interval == 0
            final = self.step == tcfg.max_steps and tcfg.eval_at_end
            if self.evaluate_enabled and (periodic or final):
                result.eval_metrics = self.run_evaluation()
                self._set_train_mode()
            stopped_by = self._stop_requested(stop)
            if stopped_by is not None and self.step < tcfg.max_steps:
                if self._saved_step != self.step:
                    self.save()
                return stopped_by
        return None

    def save_final_weights(self) -> Path:
        path = self.run_dir / FINAL_WEIGHTS_NAME
        description = self.cfg.data.description
        save_model(
            self.model,
            path,
            class_names=description.classes,
            palette=description.palette,
            test_scale=self.cfg.data.scale,
        )
        logger.info("final weights: %s", path)
        return path

    # -- evaluation --------------------------------------------------------------------------

    def run_evaluation(self) -> dict[str, float] | None:
        """Evaluate on ``data.val_split`` (all ranks take part) and log the scalar metrics."""
        rng = get_rng_state()  # evaluation must not change the training random stream
        results = evaluate_config(
            self.model, self.cfg, device=self.device, progress=self.progress and self.is_main
        )
        set_rng_state(rng)
        metrics = scalar_metrics(results)
        if self.writer is not None:
            self.writer.write(self.step, metrics, tag="eval")
        logger.info("eval at step %d (%%): %s", self.step, summarize_metrics(metrics))
        return metrics
