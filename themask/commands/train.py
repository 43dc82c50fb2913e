"""``themask train CONFIG [key=value ...]``: iteration-based training, 1 process or torchrun."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  themask train configs/toy/themask_toy.yaml train.max_steps=100 --out runs/toy
  themask train configs/vspw/themask_mit_b1_t1.yaml pretrained_backbone=mit_b1.pth
  torchrun --nproc-per-node 4 -m themask train configs/vspw/themask_mit_b1_t2.yaml
  themask train configs/vspw/themask_mit_b1_t1.yaml --resume   (continue runs/themask_mit_b1_t1)

train.batch_size is the global batch (all processes); each process loads
batch_size / (world_size x train.grad_accum) clips per forward pass.
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
    parser.add_argument("config", metavar="CONFIG", help="YAML run config (overrides of defaults)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides parsed as YAML scalars, e.g. train.lr=2e-4 data.dilation=[-3] "
        "(right after CONFIG, before the options)",
    )
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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from themask import distributed
    from themask.config import ConfigError, load_config
    from themask.data.vspw import DataError
    from themask.engine import Trainer
    from themask.logger import setup_logging

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, DataError) as err:
        print(f"themask train: {err}", file=sys.stderr)
        return 2
    if args.init_from:
        train = dataclasses.replace(cfg.train, init_from=args.init_from)
        cfg = dataclasses.replace(cfg, train=train)
    out = Path(args.out) if args.out else default_run_dir(args.config)
    rank = distributed.get_rank_from_env()
    setup_logging(verbose=args.verbose, rank=rank, log_file=out / "train.log")
    try:
        try:
            trainer = Trainer(
                cfg, out, resume=args.resume, device=args.device, evaluate=not args.no_eval
            )
        except (FileExistsError, FileNotFoundError, ConfigError) as err:  # run dir, amp vs device
            print(f"themask train: {err}", file=sys.stderr)
            return 2
        result = trainer.train()
    finally:
        distributed.cleanup()
    if rank == 0:
        print(f"trained {result.step} steps; weights: {result.weights_path}")
        if result.eval_metrics:
            summary = ", ".join(f"{k} {v:.4g}" for k, v in result.eval_metrics.items())
            print(f"eval: {summary}")
    return 0
