"""Train THE-Mask (or the Mask2Former baseline) from a YAML run config.

Writes config.yaml, metrics.jsonl, tensorboard/, checkpoint.pt and model.safetensors into the
run folder. CONFIG: a YAML file or a shipped config name (see `themask configs`), e.g.
  themask train toy/themask_toy data.root=toy_data train.max_steps=100 --out runs/toy
  themask train vspw/themask_mit_b1_t1 pretrained_backbone=mit_b1.pth
  torchrun --nproc-per-node 4 -m themask train vspw/themask_mit_b1_t2
  themask train vspw/themask_mit_b1_t1 --resume   (continue runs/themask_mit_b1_t1)
train.batch_size is the global batch. Ctrl-C or SIGTERM writes checkpoint.pt after the step and
exits with 128 + the signal number (a second Ctrl-C: at once). --resume continues exactly; only
intervals, a longer train.max_steps, data.num_workers, data.root and eval.* may change.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import shlex
import signal
import sys
from pathlib import Path

from themask.commands import add_command, add_overrides_argument, add_threads_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "train", run, __doc__)
    parser.add_argument("config", metavar="CONFIG", help="YAML run config or shipped name")
    add_overrides_argument(parser, "train.lr=2e-4 data.dilation=[-3]")
    parser.add_argument("--out", metavar="DIR", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    text = "train.init_from: a stage-1 model for a T = 2 run, or a model of other classes"
    parser.add_argument("--init-from", metavar="W", help=text)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--no-eval", action="store_true", help="skip periodic and final eval")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    from themask import distributed
    from themask.config import load_config
    from themask.engine import CHECKPOINT_NAME, Trainer
    from themask.evaluation.metrics import summarize_metrics
    from themask.logger import setup_logging

    cfg = load_config(args.config, args.overrides)
    if args.init_from:
        cfg.train.init_from = args.init_from
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    # train.log opens once the run folder exists; the set-up's records are held until then
    held = logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1)
    logging.getLogger().addHandler(held)
    try:
        try:
            trainer = Trainer(
                cfg, out, resume=args.resume, device=args.device, evaluate=not args.no_eval
            )
        finally:
            logging.getLogger().removeHandler(held)
        rank = trainer.dist.rank
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
