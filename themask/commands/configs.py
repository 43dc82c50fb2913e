"""``themask configs``: list the run configs shipped in the package (usable by name)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "configs",
        help="list the shipped run configs (pass one by name as CONFIG, from any folder)",
        description="List the run configs shipped inside the themask package. Every command "
        "that takes CONFIG accepts one of these names (with or without .yaml), e.g. "
        "`themask train toy/themask_toy data.root=DIR`, from any folder; a file of that name, "
        "when one exists, takes precedence.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from themask.config import list_shipped_configs

    for name in list_shipped_configs():
        print(name)
    return 0
