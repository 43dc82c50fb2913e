"""``python -m themask`` (and ``torchrun -m themask``) entry point."""

from __future__ import annotations

from themask.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
