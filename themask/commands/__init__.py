"""Sub-commands of the ``themask`` CLI (see ``themask.cli``), and options they share."""

from __future__ import annotations

import argparse


def add_threads_argument(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    """``--threads N``: torch CPU threads, set by ``themask.cli.main`` before the command runs."""
    parser.add_argument(
        "--threads",
        type=int,
        default=default,
        metavar="N",
        help="torch CPU threads (default: "
        + ("torch's default, one per core" if default is None else str(default))
        + "; on a busy machine 1 is often much faster)",
    )


def add_overrides_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """Positional ``key=value`` config overrides (accepted anywhere on the line)."""
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"dotted config overrides parsed as YAML scalars, e.g. {example} (anywhere on "
        "the line)",
    )
