"""Training step (``--mode infer``: an inference forward) of two or more code trees, timed in
turn: one worker process per tree, and the workers take strict turns (A, B, B, A, ...), so a
machine whose speed drifts (a shared VM) slows every tree alike. Prints the median step per tree
and the per-turn ratios to the first tree.

    python benchmarks/interleaved.py --trees base=/tmp/base main=. --preset themask_mit_b0_t2 \
        --frames 2 --size 256 --pairs 12

Each tree is a checkout (``git worktree add /tmp/base <commit>``); its own ``themask`` is imported.
A turn runs ``--steps-per-turn`` consecutive steps and reports their median (a step right after
the worker waited is slower). The step is ``bench.py --mode train``'s (``--batch`` clips, 8
classes in bands, AdamW); trees as old as the first release (its
``themask.loss.api.training_loss``) are understood too. ``--mode infer`` times ``model(clip)``
in eval mode under ``torch.inference_mode`` (``--size`` may be ``HxW``), under
``torch.autocast("cpu", torch.bfloat16)`` for the trees named by ``--bf16`` (a tree may be
listed twice under two names, e.g. ``now=. now_bf16=. --bf16 now_bf16``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import sys, time, torch
from themask.modeling.build import build_model
preset, frames, side, batch = (int(a) if a.isdigit() else a for a in sys.argv[1:5])
height, width = (int(a) for a in str(side).split("x")) if "x" in str(side) else (side, side)
torch.set_num_threads(int(sys.argv[5])); torch.manual_seed(0)
model = build_model(preset).train(sys.argv[6] == "train")
clip = torch.randn(batch, frames, 3, height, width)
labels = (torch.arange(width) * 8 // width).expand(batch, frames, height, width).clone()
def train_step_of():
    try:
        from themask.config import TrainConfig
        from themask.loss.criterion import SetCriterion, training_loss
        from themask.modeling.build import preset_loss_config
        from themask.optim import build_optimizer
        criterion = SetCriterion(preset_loss_config(preset), model.num_classes)
        optimizer = build_optimizer(model, TrainConfig(lr=1e-4))
        loss_of = lambda: training_loss(model, clip, labels, criterion)[0]
    except ImportError:  # the first release
        from themask.loss.api import training_loss
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_of = lambda: training_loss(model, clip, labels, step=0)[0]
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_of().backward()
        optimizer.step()
    return step
try:  # the CLI's memory settings, where the tree has them
    from themask.precision import keep_freed_memory
    keep_freed_memory()
except ImportError:
    pass
bf16 = sys.argv[7] == "bf16"
def infer_step():
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        model(clip)
step = train_step_of() if sys.argv[6] == "train" else infer_step
step()
print("ready", flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
    print(sorted(times)[len(times) // 2], flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--preset", default="themask_mit_b0_t2")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--size", default="256", help="square side, or HxW")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--batch", type=int, default=1, help="clips per step")
    parser.add_argument("--pairs", type=int, default=12, help="turns per tree")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--bf16", nargs="*", default=[], metavar="NAME", help="trees that infer under bf16 autocast"
    )
    parser.add_argument(
        "--steps-per-turn", type=int, default=1, help="a turn's time: the median of its steps"
    )
    args = parser.parse_args()
    trees = dict(tree.split("=", 1) for tree in args.trees)
    if unknown := sorted(set(args.bf16) - set(trees)):
        parser.exit(2, f"interleaved.py: --bf16 {' '.join(unknown)}: not a tree of --trees\n")
    workers = {}
    for name, path in trees.items():
        path = os.path.abspath(path)
        sizes = [str(args.frames), str(args.size), str(args.batch)]
        command = [sys.executable, "-c", WORKER, args.preset, *sizes]
        workers[name] = subprocess.Popen(
            [*command, str(args.threads), args.mode, "bf16" if name in args.bf16 else "fp32"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=path,
            env=dict(os.environ, PYTHONPATH=path),
        )
        if workers[name].stdout.readline().strip() != "ready":
            sys.exit(f"{name}: the worker did not start (see its error above)")
    times: dict[str, list[float]] = {name: [] for name in trees}
    names = list(trees)
    for turn in range(args.pairs):
        for name in names if turn % 2 == 0 else names[::-1]:
            workers[name].stdin.write(f"{args.steps_per_turn}\n")
            workers[name].stdin.flush()
            times[name].append(float(workers[name].stdout.readline()))
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    result: dict = {
        "mode": args.mode,
        "preset": args.preset,
        "frames": args.frames,
        "size": args.size,
        "batch": args.batch,
        "pairs": args.pairs,
        "threads": args.threads,
        "steps_per_turn": args.steps_per_turn,
        "bf16": args.bf16,
        "median_ms": {name: round(statistics.median(t) * 1000, 1) for name, t in times.items()},
    }
    for name in names[1:]:
        ratios = sorted(b / a for a, b in zip(times[names[0]], times[name]))
        quartiles = statistics.quantiles(ratios, n=4)
        result[f"{name}/{names[0]}"] = {
            "median": round(statistics.median(ratios), 3),
            "q1": round(quartiles[0], 3),
            "q3": round(quartiles[2], 3),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
