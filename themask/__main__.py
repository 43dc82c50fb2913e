"""``python -m themask`` (and ``torchrun -m themask``) entry point."""

from themask.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
