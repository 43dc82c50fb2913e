"""Heap kept by oneDNN's and ideep's per-shape caches as one process segments clips of many sizes
(Linux, glibc ≥ 2.33).

    python benchmarks/shape_caches.py                                     # the libraries' default
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=256 LRU_CACHE_CAPACITY=256 python benchmarks/shape_caches.py
    THEMASK_ONEDNN=0 python benchmarks/shape_caches.py                    # products on the BLAS

Runs inference on ``--sizes`` clips of distinct sizes (H = 64 + 32·(i mod 8), W = 64 + 32·(i div
8)) and prints, every 10 sizes, the heap in use beyond what it was after the first call and the
peak RSS, one JSON line each. ``themask eval`` and ``predict`` set both capacities to 256 (unless
set already); the Python API leaves them to you: set them before the first oneDNN op.
"""

from __future__ import annotations

import argparse
import json
import os
import resource

import torch
from heap_layout import libc_with_mallinfo2  # this directory

from themask.cli import SHAPE_CACHES
from themask.modeling.build import build_model
from themask.precision import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="themask_mit_b0_t1")
    parser.add_argument("--sizes", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    libc = libc_with_mallinfo2()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the CLI
    model = build_model(args.preset).eval().requires_grad_(False)
    frames = model.config.num_frames
    settings = {name: os.environ.get(name, "default") for name in (*SHAPE_CACHES, "THEMASK_ONEDNN")}
    start = None
    for i in range(args.sizes):
        height, width = 64 + 32 * (i % 8), 64 + 32 * (i // 8)
        with torch.inference_mode():
            model(torch.randn(1, frames, 3, height, width))
        start = libc.mallinfo2().uordblks if start is None else start
        if (i + 1) % 10 == 0:
            kept = (libc.mallinfo2().uordblks - start) / 2**20
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB
            row = {"sizes": i + 1, "kept_mib": round(kept, 1), "peak_rss_mib": round(peak, 1)}
            print(json.dumps({**row, "preset": args.preset, **settings}), flush=True)


if __name__ == "__main__":
    main()
