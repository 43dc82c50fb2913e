"""List the shipped run configs (pass one by name as CONFIG; a file of that name wins)."""

from __future__ import annotations

import argparse

from themask.commands import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "configs", run, __doc__)


def run(args: argparse.Namespace) -> int:
    from themask.config import list_shipped_configs

    print("\n".join(list_shipped_configs()))
    return 0
