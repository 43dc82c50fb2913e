"""Time per frame, counted FLOPs, efficiency and peak memory of presets (benchmarks/README.md).

python benchmarks/bench.py [--mode infer|train|stream] [--presets ...] [--sizes HxW ...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_PRESETS = (
    "themask_mit_b0_t1",
    "themask_mit_b0_t2",
    "themask_mit_b1_t1",
    "themask_mit_b1_t2",
)
DEFAULT_SIZES = ("480x480", "480x853")
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}


DESCRIPTION = """\
Measure model presets on this machine: time per clip and per frame, counted FLOPs, efficiency
and peak memory.

--mode infer (default) times a forward pass in evaluation mode; --mode train times one
training step (loss, backward pass, AdamW update) on a clip whose labels hold 8 classes in
vertical bands; --mode stream times streaming prediction (one frame pushed into causal
sliding windows, features reused) with PyTorch and, on CPU, with ONNX Runtime on the graphs
written by `themask export`.

Each row counts the FLOPs of what it times (matrix products, convolutions, attention) and
divides the achieved FLOP/s by this machine's own matrix-multiply speed, measured in the same
run, so the efficiency column compares across machines. Each row runs in a fresh child
process, so its peak memory is its own (CPU: peak resident memory and its increase after the
model is built; CUDA: peak allocated memory). Time: median of --runs runs after --warmup
runs, on random input; one clip of T frames (the preset's clip length unless --frames).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
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
        choices=("infer", "train", "stream"),
        default="infer",
        help="time inference (eval forward), one training step (loss, backward, AdamW) or "
        "streaming prediction per frame (PyTorch and ONNX Runtime)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--runs", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch (and ONNX Runtime) intra-op threads (default: torch's default)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="also write results here")
    return parser


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


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux → MiB


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matrix products, convolutions, attention; 2 per multiply-add), oneDNN's inner product
    (themask's linear layers on CPU) included."""
    import math

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def inner_product(x_shape, w_shape, *_, **__) -> int:
        return 2 * math.prod(x_shape) * w_shape[0]

    extra = {}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        extra[torch.ops.mkldnn._linear_pointwise] = inner_product
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    with counter:
        fn()
    return int(counter.get_total_flops())


def bf16_matmul_supported(device: str) -> bool:
    """True where bf16 matrix products run on native units (CUDA bf16, CPU AVX512-BF16/AMX)."""
    import torch

    from themask.precision import cpu_bf16_units

    return torch.cuda.is_bf16_supported() if device == "cuda" else bool(cpu_bf16_units())


def matmul_flops_per_second(dtype, device: str, *, size: int | None = None, runs: int = 3) -> float:
    """Best of ``runs`` timed ``size``² matrix products: 2·size³ / seconds. On CPU the best of
    ``torch.mm`` (the BLAS) and oneDNN's inner product, which themask's layers use (on some
    CPUs the BLAS reaches half of oneDNN's fp32 rate: the fastest product is the peak)."""
    import time

    import torch

    size = size or MATMUL_SIZE[device]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    from themask.modeling import linear

    products = [lambda: torch.mm(a, b)]
    if device == "cpu" and linear.ENABLED:  # a @ bᵀ, the same FLOPs
        products.append(lambda: linear._product(a, b))
    best = float("inf")
    for product in products:
        for _ in range(runs + 1):  # the first call warms up
            _sync(device)
            start = time.perf_counter()
            product()
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _torch_step(job: dict[str, Any], model, clip) -> Callable[[], object]:
    """The timed call of ``job['mode']`` (one clip, or one streamed frame), with the process's
    memory settings of the ``themask`` CLI (``keep_freed_memory``)."""
    import torch

    from themask.precision import keep_freed_memory

    keep_freed_memory()
    if job["mode"] == "train":
        from themask.config import TrainConfig
        from themask.loss.criterion import SetCriterion, training_loss
        from themask.modeling.build import preset_loss_config
        from themask.optim import build_optimizer

        criterion = SetCriterion(preset_loss_config(job["preset"]), model.num_classes)
        model.train()
        frames, height, width = clip.shape[1], clip.shape[-2], clip.shape[-1]
        bands = torch.arange(width, device=clip.device) * 8 // width  # 8 classes in bands
        labels = bands.expand(1, frames, height, width).clone()
        optimizer = build_optimizer(model, TrainConfig(lr=1e-4))  # as `themask train`

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss, _ = training_loss(model, clip, labels, criterion)
            loss.backward()
            optimizer.step()

        return step
    # frozen: FlopCounterMode's module tracker fails on parameters passed to a submodule
    model.eval().requires_grad_(False)
    if job["mode"] == "infer":

        def forward() -> None:
            with torch.inference_mode():
                model(clip)

        return forward
    from themask.evaluation.predict import StreamingPredictor

    predictor = StreamingPredictor(model, clip_len=clip.shape[1])
    pushed = iter(range(10**9))

    def push() -> None:
        with torch.inference_mode():
            predictor.push(clip[0, next(pushed) % clip.shape[1]])

    return push


def _measure(job: dict[str, Any], queue: multiprocessing.Queue[dict[str, Any]]) -> None:
    """Child process: build, count, warm up, time, report through ``queue``."""
    import torch

    from themask.modeling.build import build_model

    if job["threads"] is not None:
        torch.set_num_threads(job["threads"])
    device = job["device"]
    torch.manual_seed(0)
    model = build_model(job["preset"]).to(device)
    frames = job["frames"] or model.config.num_frames
    if job["mode"] == "stream" and not model.is_temporal:
        frames = 1  # a single-frame decoder streams windows of one frame
    clip = torch.randn(1, frames, 3, *job["size"], device=device)
    rss_after_build = _rss_mib()
    step = _torch_step(job, model, clip)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _time(step, job, device)
    # peak memory of the timed calls only: FLOP counting (module hooks, recorded ops) and the
    # matmul probes below raise the process's peak far above what the model itself needs
    if device == "cuda":
        peak, increase = torch.cuda.max_memory_allocated() / 2**20, None
    else:
        peak = _peak_rss_mib()
        increase = peak - rss_after_build
    flops = count_flops(step)
    peaks = {"fp32": matmul_flops_per_second(torch.float32, device)}
    if bf16_matmul_supported(device):
        peaks["bf16"] = matmul_flops_per_second(torch.bfloat16, device)
    per_call = frames if job["mode"] != "stream" else 1
    row = _row(job, "torch", frames, flops, peaks, times, per_call, peak, increase)
    row["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    if job["mode"] == "stream" and device == "cpu":
        from themask.deploy.export import export_onnx

        row["onnx_dir"] = job["onnx_dir"]
        export_onnx(
            model,
            job["onnx_dir"],
            clip_len=frames,
            class_names=[str(k) for k in range(model.num_classes)],
            palette=[[0, 0, 0]] * model.num_classes,
        )
    queue.put(row)


def _measure_onnxruntime(job: dict[str, Any], queue: multiprocessing.Queue[dict[str, Any]]) -> None:
    """Child process without torch: stream random frames through the exported graphs."""
    import numpy as np

    from themask.deploy.runtime import OnnxStreamingPredictor

    predictor = OnnxStreamingPredictor(job["onnx_dir"], threads=job["threads"])
    rss_after_build = _rss_mib()
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((predictor.windows.clip_len, 3, *job["size"]), dtype=np.float32)
    pushed = iter(range(10**9))

    def push() -> None:
        predictor.push(frames[next(pushed) % len(frames)])

    push()  # like the counted call of the torch row
    times = _time(push, job, "cpu")
    peak = _peak_rss_mib()
    flops, peaks = job["torch_row"]["gflop"] * 1e9, job["torch_row"]["matmul_gflops"]
    peaks = {k: v * 1e9 for k, v in peaks.items()}
    clip_len = predictor.windows.clip_len
    row = _row(job, "onnxruntime", clip_len, flops, peaks, times, 1, peak, peak - rss_after_build)
    row["parameters_m"] = job["torch_row"]["parameters_m"]
    queue.put(row)


def _time(step: Callable[[], object], job: dict[str, Any], device: str) -> list[float]:
    import time

    times = []
    for index in range(job["warmup"] + job["runs"]):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        if index >= job["warmup"]:
            times.append(time.perf_counter() - start)
    return times


def _row(job, engine, frames, flops, peaks, times, frames_per_call, peak, increase) -> dict:
    import statistics

    seconds = statistics.median(times)
    achieved = flops / seconds
    return dict(
        mode=job["mode"],
        engine=engine,
        device=job["device"],
        preset=job["preset"],
        size="x".join(str(s) for s in job["size"]),
        frames=frames,
        ms_per_call=round(seconds * 1000, 1),
        ms_per_frame=round(seconds * 1000 / frames_per_call, 1),
        runs_ms=[round(t * 1000, 1) for t in times],
        gflop=round(flops / 1e9, 3),
        gflops_per_s=round(achieved / 1e9, 2),
        matmul_gflops={k: round(v / 1e9, 1) for k, v in peaks.items()},
        fraction_of_matmul={k: round(achieved / v, 3) for k, v in peaks.items()},
        peak_mib=round(peak, 1),
        peak_increase_mib=None if increase is None else round(increase, 1),
        threads=job["threads_used"],
    )


def _run_child(context, target, job: dict[str, Any]) -> dict[str, Any] | None:
    queue = context.Queue()
    child = context.Process(target=target, args=(job, queue))
    child.start()
    row = queue.get() if child.join() is None and child.exitcode == 0 else None
    if row is None:
        print(
            f"bench: {job['preset']} at {job['size']} failed (exit code {child.exitcode})",
            file=sys.stderr,
        )
    return row


def _print_row(row: dict[str, Any]) -> None:
    fractions = row["fraction_of_matmul"]
    bf16 = f"{100 * fractions['bf16']:>7.1f}%" if "bf16" in fractions else f"{'-':>8}"
    increase = row["peak_increase_mib"]
    print(
        f"{row['engine']:<11} {row['preset']:<22} {row['size']:>8} {row['frames']:>2} "
        f"{row['parameters_m']:>9.2f} {row['ms_per_call']:>9.1f} {row['ms_per_frame']:>9.1f} "
        f"{row['gflop']:>8.2f} {row['gflops_per_s']:>8.1f} {100 * fractions['fp32']:>7.1f}% "
        f"{bf16} {row['peak_mib']:>10.1f} "
        + (f"{increase:>10.1f}" if increase is not None else f"{'-':>10}"),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import torch

    from themask.config import ConfigError

    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        sizes = [parse_size(text) for text in args.sizes]
    except ConfigError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    threads = args.threads or torch.get_num_threads()
    header = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        cpu=_cpu_name(),
        cpu_count=os.cpu_count(),
        device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        threads=threads,
        mode=args.mode,
        runs=args.runs,
        warmup=args.warmup,
        memory="CPU: peak RSS of a fresh process per row, increase = over RSS after build; "
        "CUDA: max_memory_allocated",
    )
    print(" ".join(f"{key}={value}" for key, value in header.items()))
    print(
        f"{'engine':<11} {'preset':<22} {'size':>8} {'T':>2} {'params(M)':>9} {'ms/call':>9} "
        f"{'ms/frame':>9} {'GFLOP':>8} {'GFLOP/s':>8} {'of fp32':>8} {'of bf16':>8} "
        f"{'peak(MiB)':>10} {'+run(MiB)':>10}"
    )
    context = multiprocessing.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory(prefix="themask-bench-") as scratch:
        for preset in args.presets:
            for index, size in enumerate(sizes):
                job = dict(vars(args), preset=preset, size=size, threads_used=threads)
                job["onnx_dir"] = str(Path(scratch) / f"{preset}-{index}")
                rows = [_run_child(context, _measure, job)]
                if rows[0] is not None and "onnx_dir" in rows[0]:
                    job.update(threads=threads, torch_row=rows[0])
                    rows.append(_run_child(context, _measure_onnxruntime, job))
                complete = [row for row in rows if row is not None]
                if len(complete) < len(rows):
                    return 1
                for row in complete:
                    row.pop("onnx_dir", None)
                    _print_row(row)
                results.extend(complete)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(dict(header, results=results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
