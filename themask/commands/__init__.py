"""Sub-commands of the ``themask`` CLI (see ``themask.cli``), and options they share."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from themask.io import PathLike, atomic_write


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    doc: str | None,
) -> argparse.ArgumentParser:
    """The parser of ``themask <name>`` calling ``run``, described by ``doc``."""
    summary, formatter = (doc or "").split("\n", 1)[0], argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser(name, help=summary, description=doc, formatter_class=formatter)
    parser.set_defaults(func=run)
    return parser


def add_threads_argument(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    where = "one per core" if default is None else default
    text = f"torch CPU threads (default: {where}; 1 is often faster on a busy machine)"
    parser.add_argument("--threads", type=int, default=default, metavar="N", help=text)


def add_overrides_argument(parser: argparse.ArgumentParser, example: str) -> None:
    text = f"dotted config overrides parsed as YAML, e.g. {example} (anywhere on the line)"
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=text)


def add_inference_arguments(parser: argparse.ArgumentParser, amp_default_help: str) -> None:
    """``--amp`` (None when not given), ``--device`` and ``--threads`` (``eval``, ``predict``)."""
    from themask.precision import AMP_MODES

    text = f"inference autocast (default: {amp_default_help}; auto: bf16 on CUDA)"
    parser.add_argument("--amp", choices=AMP_MODES, default=None, help=text)
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    add_threads_argument(parser)


def report_metrics(
    report: dict[str, Any], names: list[str], json_path: PathLike | None, **fields: Any
) -> None:
    """Print the metric table; ``json_path``: also write ``fields`` and the metrics there."""
    from themask.evaluation.metrics import format_metrics_table, metrics_to_json

    print(format_metrics_table(report, names))
    if json_path:
        payload = {**fields, "metrics": metrics_to_json(report, names)}
        with atomic_write(json_path) as tmp:
            tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))
