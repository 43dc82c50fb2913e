"""Sub-commands of the ``themask`` CLI (see ``themask.cli``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def run_with_weights(
    prog: str, args: argparse.Namespace, body: Callable[[argparse.Namespace], int]
) -> int:
    """Run ``body(args)`` for a command that reads ``args.weights``.

    A missing weights file, a config error or a data error becomes one line on stderr naming
    the command, and exit status 2, instead of a traceback.
    """
    from themask.config import ConfigError
    from themask.data.vspw import DataError

    if not Path(args.weights).is_file():
        print(f"{prog}: weights file not found: {args.weights}", file=sys.stderr)
        return 2
    try:
        return body(args)
    except (ConfigError, DataError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
