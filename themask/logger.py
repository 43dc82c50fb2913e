"""Logging set-up and the metric writer (JSON lines + TensorBoard), used on rank 0 only."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from themask.io import PathLike

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (it may be replaced after set-up)."""

    _themask = True  # marks the handlers setup_logging adds (a later call replaces them)
    stream = property(lambda self: sys.stderr, lambda self, value: None)


class _FileHandler(logging.FileHandler):
    _themask = True


def setup_logging(
    *, verbose: bool = False, rank: int = 0, log_file: PathLike | None = None
) -> logging.Handler | None:
    """Root logger: INFO (``verbose``: DEBUG) on rank 0 (also to ``log_file``), else WARNING;
    the handlers of an earlier call are closed and replaced, the user's own kept."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_themask", False)]:
        root.removeHandler(old)
        old.close()
    root.setLevel((logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    if log_file is None or rank != 0:
        return None
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    file_handler = _FileHandler(log_file, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(file_handler)
    return file_handler


def git_revision() -> str:
    """``git describe --always --dirty`` of the source tree, or ``"unknown"``."""
    command = ["git", "describe", "--always", "--dirty", "--abbrev=12"]
    where = Path(__file__).resolve().parent
    try:
        out = subprocess.run(command, cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


class MetricWriter:
    """``{"step", "tag", <name>: float | null}`` lines in ``metrics.jsonl``, and TensorBoard."""

    def __init__(self, run_dir: PathLike, *, tensorboard: bool = True) -> None:
        self.jsonl_path, self._tb = Path(run_dir) / "metrics.jsonl", None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, values: Mapping[str, float], *, tag: str = "train") -> None:
        record: dict[str, Any] = {"step": int(step), "tag": tag}
        for name, value in values.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else None
            if self._tb is not None:
                self._tb.add_scalar(f"{tag}/{name}", value, step)
        with open(self.jsonl_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run writes those steps again)."""
        if self.jsonl_path.exists():
            kept = [r for r in read_metrics(self.jsonl_path) if r["step"] <= step]
            with open(self.jsonl_path, "w", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in kept)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: PathLike, tag: str | None = None) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (only those of ``tag`` if given)."""
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if tag is None or r.get("tag") == tag]
