"""``themask`` command line: one sub-command per module in ``themask.commands``.

Each command module defines ``register(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
Command modules import heavy dependencies inside their ``func`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
from collections.abc import Sequence
from typing import Optional

# Order = order in ``themask --help``.
COMMAND_MODULES: tuple = (
    "demo",
    "train",
    "check_data",
    "make_toy_data",
    "eval",
    "predict",
    "convert",
    "export",
    "bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="themask",
        description="THE-Mask video semantic segmentation: train, evaluate, predict, convert.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"themask.commands.{name}").register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from themask.logger import setup_logging

    # torchrun sets RANK: only rank 0 logs below WARNING
    setup_logging(verbose=args.verbose, rank=int(os.environ.get("RANK", "0")))
    return int(args.func(args) or 0)
