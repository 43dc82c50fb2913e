"""CPU bf16 inference and training-memory measurements (issue 13; results in README.md).

  python benchmarks/amp_memory.py speed [--preset P --size HxW --frames T --runs N]
      fp32 vs ``torch.autocast("cpu", bfloat16)`` time of ``model(clip)``, same process,
      runs interleaved; median and spread.
  python benchmarks/amp_memory.py agreement WEIGHTS DATA_ROOT [--split val]
      argmax agreement of bf16 with fp32 per frame on a trained model (test-clip protocol).
  python benchmarks/amp_memory.py train-memory [--preset P --size HxW --checkpoint]
      peak RSS (ru_maxrss) of training steps in a fresh process, and their median time.
  python benchmarks/amp_memory.py train-time [--preset P --size HxW --runs N]
      plain vs activation-checkpointed training steps, interleaved on one model.

Everything runs on one thread (``torch.set_num_threads(1)``) unless ``--threads`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        import os

        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def speed(args: argparse.Namespace) -> dict:
    from themask import build_model
    from themask.precision import keep_freed_memory

    keep_freed_memory()  # as the CLI
    torch.manual_seed(0)
    model = build_model(args.preset).eval()
    frames = args.frames or model.config.num_frames
    clip = torch.randn(1, frames, 3, *_size(args.size))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.inference_mode():
        for index in range(args.warmup + args.runs):
            for name in times:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                    start = time.perf_counter()
                    scores = model(clip)
                    elapsed = time.perf_counter() - start
                assert scores.dtype == torch.float32
                if index >= args.warmup:
                    times[name].append(elapsed)
    result = {"preset": args.preset, "size": args.size, "frames": frames}
    for name, values in times.items():
        result[f"{name}_ms"] = round(1000 * statistics.median(values), 1)
        result[f"{name}_runs_ms"] = [round(1000 * v, 1) for v in values]
    ratios = [b / f for f, b in zip(times["fp32"], times["bf16"])]
    result["bf16_over_fp32_median"] = round(statistics.median(ratios), 3)
    result["bf16_over_fp32_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    return result


def agreement(args: argparse.Namespace) -> dict:
    from themask import load_model
    from themask.data.clips import test_clips
    from themask.data.transforms import TestTransform
    from themask.data.vspw import VSPWIndex, read_frame

    model = load_model(args.weights).eval()
    transform = TestTransform(scale=tuple(int(v) for v in args.scale.split("x")))
    clip_len = model.config.num_frames if model.is_temporal else 1
    per_frame: list[float] = []
    with torch.inference_mode():
        for video in VSPWIndex(args.data_root, args.split, labelled=False).videos:
            for clip in test_clips(len(video), clip_len):
                inputs = transform([read_frame(video.frame_paths[i]) for i in clip])[None]
                reference = model(inputs).argmax(2)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    fast = model(inputs).argmax(2)
                same = (reference == fast).float().flatten(2).mean(2)[0]
                per_frame.extend(same.tolist())
    return {
        "weights": args.weights,
        "frames": len(per_frame),
        "mean_agreement": round(100 * statistics.fmean(per_frame), 3),
        "worst_frame_agreement": round(100 * min(per_frame), 3),
    }


def train_memory(args: argparse.Namespace) -> dict:
    if not args.child:  # measure in a fresh process: ru_maxrss only grows
        command = [
            sys.executable,
            __file__,
            "--threads",
            str(args.threads),
            "train-memory",
            "--child",
            "--preset",
            args.preset,
            "--size",
            args.size,
            "--steps",
            str(args.steps),
        ] + (["--checkpoint"] if args.checkpoint else [])
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        return json.loads(output.strip().splitlines()[-1])
    from themask import SetCriterion, build_model, training_loss
    from themask.modeling.build import preset_loss_config

    torch.manual_seed(0)
    model = build_model(args.preset, num_classes=8).train()
    criterion = SetCriterion(preset_loss_config(args.preset), 8)
    model.set_activation_checkpointing(args.checkpoint)
    height, width = _size(args.size)
    frames = model.config.num_frames
    clip = torch.randn(1, frames, 3, height, width)
    labels = (torch.arange(width) * 8 // width).expand(1, frames, height, width).clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rss_built = _rss_mib()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = training_loss(model, clip, labels, criterion)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "preset": args.preset,
        "size": args.size,
        "frames": frames,
        "checkpoint_activations": args.checkpoint,
        "peak_rss_mib": round(peak, 1),
        "peak_over_built_mib": round(peak - rss_built, 1),
        "step_ms": round(1000 * statistics.median(times[1:] or times), 1),
        "runs_ms": [round(1000 * t, 1) for t in times],
    }


def train_time(args: argparse.Namespace) -> dict:
    """Plain and checkpointed training steps interleaved on one model (same process)."""
    from themask import SetCriterion, build_model, training_loss
    from themask.modeling.build import preset_loss_config

    torch.manual_seed(0)
    model = build_model(args.preset, num_classes=8).train()
    criterion = SetCriterion(preset_loss_config(args.preset), 8)
    height, width = _size(args.size)
    frames = model.config.num_frames
    clip = torch.randn(1, frames, 3, height, width)
    labels = (torch.arange(width) * 8 // width).expand(1, frames, height, width).clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: dict[bool, list[float]] = {False: [], True: []}
    for index in range(args.warmup + args.runs):
        for flag in times:
            model.set_activation_checkpointing(flag)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss, _ = training_loss(model, clip, labels, criterion)
            loss.backward()
            optimizer.step()
            if index >= args.warmup:
                times[flag].append(time.perf_counter() - start)
    ratios = [c / p for p, c in zip(times[False], times[True])]
    return {
        "preset": args.preset,
        "size": args.size,
        "frames": frames,
        "plain_ms": round(1000 * statistics.median(times[False]), 1),
        "checkpointed_ms": round(1000 * statistics.median(times[True]), 1),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--preset", default="themask_mit_b1_t1")
    p.add_argument("--size", default="480x480")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p = sub.add_parser("agreement")
    p.add_argument("weights")
    p.add_argument("data_root")
    p.add_argument("--split", default="val")
    p.add_argument("--scale", default="128x96", help="test scale (long x short, data.scale)")
    p = sub.add_parser("train-memory")
    p.add_argument("--preset", default="themask_mit_b0_t2")
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--checkpoint", action="store_true", help="checkpoint_activations=True")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p = sub.add_parser("train-time")
    p.add_argument("--preset", default="themask_mit_b0_t2")
    p.add_argument("--size", default="256x256")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = {
        "speed": speed,
        "agreement": agreement,
        "train-memory": train_memory,
        "train-time": train_time,
    }[args.what]
    print(json.dumps({**work(args), "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
