"""``themask configs``: list the run configs shipped in the package (usable by name)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "configs",
        help="list the shipped run configs (pass one by name as CONFIG, from any folder)",
        description="List the shipped run configs; every CONFIG argument accepts these names "
        "(a file of that name takes precedence).",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from themask.config import list_shipped_configs

    print("\n".join(list_shipped_configs()))
    return 0
