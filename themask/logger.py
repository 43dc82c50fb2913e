"""Logging set-up and metric writers (JSON lines + TensorBoard), used on rank 0 only."""

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

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(
    *, verbose: bool = False, rank: int = 0, log_file: PathLike | None = None
) -> logging.Handler | None:
    """Configure the root logger once: INFO (DEBUG if ``verbose``) on rank 0, WARNING elsewhere.

    ``log_file`` additionally receives the same records (rank 0 only); its handler is returned.
    """
    level = (logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not any(getattr(h, "_themask", False) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        handler._themask = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    if log_file is not None and rank == 0:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(file_handler)
        return file_handler
    return None


def git_revision(cwd: PathLike | None = None) -> str:
    """``git describe --always --dirty`` of the source tree, or ``"unknown"``."""
    where = Path(cwd) if cwd is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


class MetricWriter:
    """Appends scalar records to ``metrics.jsonl`` and TensorBoard event files in ``run_dir``.

    Each JSON line is ``{"step": int, "tag": str, <name>: float, ...}``; ``tag`` groups the
    records ("train", "eval"). Non-finite numbers are written as ``null``.
    """

    def __init__(self, run_dir: PathLike, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

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
        """Drop JSON records with ``step > step`` (a resumed run rewrites those steps)."""
        if not self.jsonl_path.exists():
            return
        kept = [r for r in read_metrics(self.jsonl_path) if r["step"] <= step]
        with open(self.jsonl_path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in kept)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: PathLike, tag: str | None = None) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (optionally only those with ``tag``)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                if tag is None or record.get("tag") == tag:
                    records.append(record)
    return records
