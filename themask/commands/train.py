"""``themask train CONFIG [key=value ...]``: iteration-based training, 1 process or torchrun."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import logging.handlers
import shlex
import signal
import sys
from pathlib import Path

from themask.commands import add_overrides_argument, add_threads_argument

logger = logging.getLogger(__name__)

EPILOG = """\
examples (CONFIG: a YAML file or a shipped config name, see `themask configs`):
  themask train toy/themask_toy data.root=toy_data train.max_steps=100 --out runs/toy
  themask train vspw/themask_mit_b1_t1 pretrained_backbone=mit_b1.pth
  torchrun --nproc-per-node 4 -m themask train vspw/themask_mit_b1_t2
  themask train vspw/themask_mit_b1_t1 --resume   (continue runs/themask_mit_b1_t1)

train.batch_size is the global batch (all processes); each process loads
batch_size / (world_size x train.grad_accum) clips per forward pass.

Ctrl-C or SIGTERM finishes the current step, writes checkpoint.pt and exits with status
128 + the signal number (130, 143); a second Ctrl-C stops at once. --resume continues
exactly; it refuses config changes that would break that (batch, data, model, objective,
seed) and allows intervals, a longer train.max_steps, data.num_workers, data.root, eval.*.
"""


def default_run_dir(config_path: str) -> Path:
    """``runs/<config file stem>``."""
    return Path("runs") / Path(config_path).stem


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a YAML run config",
        description="Train THE-Mask (or the Mask2Former baseline) from a YAML run config. "
        "Writes config.yaml, metrics.jsonl, tensorboard/, checkpoint.pt and model.safetensors "
        "into the run directory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config", metavar="CONFIG", help="YAML run config (overrides of defaults) or shipped name"
    )
    add_overrides_argument(parser, "train.lr=2e-4 data.dilation=[-3]")
    parser.add_argument(
        "--out", metavar="DIR", help="run directory (default: runs/<config file name>)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from DIR/checkpoint.pt exactly where it stopped",
    )
    parser.add_argument(
        "--init-from",
        metavar="W",
        help="weights to start from (sets train.init_from): a stage-1 model for a stage-2 (T = 2) "
        "run, or a model trained on other classes (its class layers are re-initialised)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip periodic and final evaluation")
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from themask import distributed
    from themask.config import load_config
    from themask.engine import CHECKPOINT_NAME, Trainer
    from themask.evaluation.metrics import summarize_metrics
    from themask.logger import setup_logging

    cfg = load_config(args.config, args.overrides)
    if args.init_from:
        train = dataclasses.replace(cfg.train, init_from=args.init_from)
        cfg = dataclasses.replace(cfg, train=train)
    out = Path(args.out) if args.out else default_run_dir(args.config)
    rank = distributed.get_rank_from_env()
    # train.log is opened once the run directory exists (a run that cannot start creates
    # none); the records logged while the trainer is set up are held and then written to it
    held = logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(held)
    try:
        try:
            trainer = Trainer(
                cfg, out, resume=args.resume, device=args.device, evaluate=not args.no_eval
            )
        finally:
            logging.getLogger().removeHandler(held)
        held.setTarget(setup_logging(verbose=args.verbose, rank=rank, log_file=out / "train.log"))
        held.close()  # writes the held records to train.log (drops them on other ranks)
        result = trainer.train()
    finally:
        distributed.cleanup()
    if result.stopped_by is not None:
        if rank == 0:
            words = ["themask", "train", args.config, *args.overrides, "--out", str(out)]
            print(
                f"themask train: stopped by {signal.Signals(result.stopped_by).name} after step "
                f"{result.step} of {cfg.train.max_steps}; {out / CHECKPOINT_NAME} written. "
                f"Resume with: {shlex.join([*words, '--resume'])}",
                file=sys.stderr,
            )
        return 128 + result.stopped_by
    if rank == 0:
        print(f"trained {result.step} steps; weights: {result.weights_path}")
        if result.eval_metrics:
            print(f"eval (%): {summarize_metrics(result.eval_metrics)}")
    return 0
