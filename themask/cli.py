"""``themask`` command line: one sub-command per module in ``themask.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# the order of ``themask --help``
COMMAND_MODULES = "demo train check_data make_toy_data eval predict convert export configs".split()
USER_ERRORS = {"ConfigError", "DataError", "WeightsError"}  # themask's own, all ValueError
FILE_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)
SHAPE_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # eval, predict: 256

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="themask",
        description="THE-Mask video semantic segmentation: train, evaluate, predict, convert.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"themask.commands.{name}").register(subparsers)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` words after the options join ``args.overrides``."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    unknown = [w for w in extra if not (takes_overrides and "=" in w and not w.startswith("-"))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def one_line(err: BaseException) -> str:
    """``err``'s message in one line (a DataLoader worker's: its own message only)."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(type(err).__module__) else last
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    from themask.logger import setup_logging
    from themask.precision import keep_freed_memory

    setup_logging(verbose=args.verbose, rank=int(os.environ.get("RANK", "0")))
    keep_freed_memory()
    if args.command in ("eval", "predict"):  # many input sizes: bound oneDNN's per-shape caches
        for cache in SHAPE_CACHES:
            os.environ.setdefault(cache, "256")  # too few for training (ARCHITECTURE.md)
    if getattr(args, "threads", None) and not getattr(args, "onnx", None):
        import torch  # predict --onnx stays torch-free (ONNX Runtime takes args.threads)

        torch.set_num_threads(args.threads)
    prog = f"themask {args.command}"
    try:
        return int(args.func(args) or 0)
    except Exception as err:  # bad input, not a bug: matched by class name (no torch import)
        ours = {cls.__name__ for cls in type(err).__mro__ if cls.__module__.startswith("themask.")}
        if not isinstance(err, (*FILE_ERRORS, NotADirectoryError)) and not ours & USER_ERRORS:
            raise
        if args.verbose:
            logger.exception("%s failed", prog)
        print(f"{prog}: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
