"""``themask bench``: parameters, CPU time per frame and peak memory of presets.

``--mode infer`` (default) times ``model(clip)`` in eval mode; ``--mode train`` times one
training step (``training_loss`` + backward + AdamW step) on one clip whose labels hold 8
classes in vertical bands. Where the brief of the project gives the official code's time for
the same setting on a 2-core machine, the ratio ours / official is printed.

Each (preset, size) runs in a fresh child process so its peak memory is its own: peak memory
is the child's maximum resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and,
separately, its increase over the resident size right after building the model (activations
and workspace of the forward pass). Time: median of ``--runs`` forward passes after
``--warmup`` passes, in ``torch.inference_mode``, on random normalised input; one clip of
T = the preset's ``num_frames`` frames; reported per clip and per frame.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
from pathlib import Path
from typing import Any

DEFAULT_PRESETS = (
    "themask_mit_b0_t1",
    "themask_mit_b0_t2",
    "themask_mit_b1_t1",
    "themask_mit_b1_t2",
)
DEFAULT_SIZES = ("480x480", "480x853")
# Seconds per clip of the official THE-Mask code on a 2-core CPU machine (project brief):
# (mode, preset, size, frames) -> seconds.
OFFICIAL_SECONDS = {
    ("infer", "themask_mit_b0_t1", "480x480", 1): 0.97,
    ("infer", "themask_mit_b1_t1", "480x480", 1): 1.10,
    ("infer", "themask_mit_b0_t2", "480x480", 2): 1.78,
    ("infer", "themask_mit_b1_t2", "480x480", 2): 1.83,
    ("train", "themask_mit_b0_t2", "256x256", 2): 1.96,
}


DESCRIPTION = """\
Measure model presets on this machine's CPU: parameters, time per clip and per frame, and
peak memory.

--mode infer (default) times a forward pass in evaluation mode; --mode train times one
training step (loss, backward pass, AdamW update) on a clip whose labels hold 8 classes in
vertical bands. Each preset and size runs in a fresh child process, so its peak memory is
its own: the child's peak resident memory and its increase over the memory right after the
model is built. Time: median of --runs runs after --warmup runs, on random input; one clip
of T frames (the preset's clip length unless --frames).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="CPU time per frame, peak memory and parameters of presets",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), metavar="NAME")
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=list(DEFAULT_SIZES),
        metavar="HxW",
        help="input sizes (height x width)",
    )
    parser.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frames per clip (default: each preset's num_frames)",
    )
    parser.add_argument(
        "--mode",
        choices=("infer", "train"),
        default="infer",
        help="time inference (eval forward) or one training step (loss, backward, AdamW)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's default)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="also write results here")
    parser.set_defaults(func=run)


def parse_size(text: str) -> tuple[int, int]:
    """'480x853' → (480, 853)."""
    from themask.config import ConfigError

    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--sizes expects HxW such as 480x853, got {text!r}") from None
    return height, width


def _cpu_name() -> str:
    """CPU model from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _rss_mib() -> float:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure(job: dict[str, Any], queue: multiprocessing.Queue[dict[str, Any]]) -> None:
    """Child process: build, warm up, time, report through ``queue``."""
    import resource
    import statistics
    import time

    import torch

    from themask.modeling.build import build_model

    if job["threads"] is not None:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model = build_model(job["preset"])
    frames = job["frames"] or model.config.num_frames
    height, width = job["size"]
    clip = torch.randn(1, frames, 3, height, width)
    rss_after_build = _rss_mib()
    times: list[float] = []
    if job["mode"] == "train":
        from themask.loss.api import training_loss

        model.train()
        bands = torch.arange(width) * 8 // width  # 8 classes in vertical bands
        labels = bands.expand(1, frames, height, width).clone()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = training_loss(model, clip, labels, step=0)
            loss.backward()
            optimizer.step()

    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                model(clip)

    for index in range(job["warmup"] + job["runs"]):
        start = time.perf_counter()
        step()
        if index >= job["warmup"]:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux → MiB
    seconds = statistics.median(times)
    official = OFFICIAL_SECONDS.get((job["mode"], job["preset"], f"{height}x{width}", frames))
    queue.put(
        dict(
            mode=job["mode"],
            preset=job["preset"],
            size=f"{height}x{width}",
            frames=frames,
            parameters_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            ms_per_clip=round(seconds * 1000, 1),
            ms_per_frame=round(seconds * 1000 / frames, 1),
            runs_ms=[round(t * 1000, 1) for t in times],
            peak_rss_mib=round(peak, 1),
            peak_increase_mib=round(peak - rss_after_build, 1),
            threads=torch.get_num_threads(),
            official_ms_per_clip=None if official is None else official * 1000,
            ratio_to_official=None if official is None else round(seconds / official, 2),
        )
    )


def run(args: argparse.Namespace) -> int:
    import torch

    sizes = [parse_size(text) for text in args.sizes]
    header = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        cpu=_cpu_name(),
        cpu_count=os.cpu_count(),
        threads=args.threads or torch.get_num_threads(),
        mode=args.mode,
        runs=args.runs,
        warmup=args.warmup,
        memory="peak RSS of a fresh process per row; increase = over RSS after build",
    )
    print(" ".join(f"{key}={value}" for key, value in header.items()))
    print(
        f"{'preset':<22} {'size':>8} {'T':>2} {'params(M)':>9} {'ms/clip':>9} "
        f"{'ms/frame':>9} {'peak RSS(MiB)':>13} {'+forward(MiB)':>13} {'vs official':>11}"
    )
    context = multiprocessing.get_context("spawn")
    results = []
    for preset in args.presets:
        for size in sizes:
            queue = context.Queue()
            job = dict(
                preset=preset,
                size=size,
                mode=args.mode,
                frames=args.frames,
                runs=args.runs,
                warmup=args.warmup,
                threads=args.threads,
            )
            child = context.Process(target=_measure, args=(job, queue))
            child.start()
            child.join()
            if child.exitcode != 0 or queue.empty():
                print(
                    f"themask bench: {preset} at {size} failed (exit code {child.exitcode})",
                    file=sys.stderr,
                )
                return 1
            row = queue.get()
            results.append(row)
            print(
                f"{row['preset']:<22} {row['size']:>8} {row['frames']:>2} "
                f"{row['parameters_m']:>9.2f} {row['ms_per_clip']:>9.1f} "
                f"{row['ms_per_frame']:>9.1f} {row['peak_rss_mib']:>13.1f} "
                f"{row['peak_increase_mib']:>13.1f} "
                + (
                    f"{row['ratio_to_official']:>10.2f}x"
                    if row["ratio_to_official"]
                    else f"{'-':>11}"
                ),
                flush=True,
            )
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(dict(header, results=results), indent=2) + "\n")
    return 0
