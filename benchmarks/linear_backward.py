"""The linear layers' backward products of one training step on this CPU: oneDNN against
``torch.mm``, per shape and summed over the step (what decides ``linear.WEIGHT_GRAD_ON_ONEDNN``).

    python benchmarks/linear_backward.py --preset themask_mit_b0_t2 --size 256 --threads 2

Runs one training step with the oneDNN path on and records every ``_OneDNNLinear`` backward's
shape (rows, in, out) and how often it occurs, then times the input-gradient (gx) and the
weight-gradient (gw) products of each shape both ways, taking turns, and prints the median ms
per shape and the totals per step. Needs an x86 CPU where the oneDNN path is on.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from collections.abc import Callable

import torch

from themask.loss.criterion import SetCriterion, training_loss
from themask.modeling import linear
from themask.modeling.build import build_model, preset_loss_config


def step_shapes(preset: str, size: int) -> collections.Counter:
    """(rows, in, out, input needs grad) → calls, over one training step."""
    shapes: collections.Counter = collections.Counter()
    backward = linear._OneDNNLinear.backward

    def recording(ctx, grad):
        x, weight = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        shapes[(rows, weight.shape[1], weight.shape[0], ctx.needs_input_grad[0])] += 1
        return backward(ctx, grad)

    linear._OneDNNLinear.backward = staticmethod(recording)
    try:
        torch.manual_seed(0)
        model = build_model(preset).train()
        criterion = SetCriterion(preset_loss_config(preset), model.num_classes)
        frames = model.config.num_frames
        clip = torch.randn(1, frames, 3, size, size)
        labels = (torch.arange(size) * 8 // size).expand(1, frames, size, size).clone()
        training_loss(model, clip, labels, criterion)[0].backward()
    finally:
        linear._OneDNNLinear.backward = staticmethod(backward)
    return shapes


def products(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> dict:
    """The input gradient grad @ weight and the weight gradient gradᵀ @ x, on oneDNN (as
    ``_OneDNNLinear`` calls it) and on ``torch.mm``."""
    return {
        "gx_onednn": lambda: linear._product(grad, weight.t()),
        "gx_mm": lambda: grad.mm(weight),
        "gw_onednn": lambda: linear.onednn_weight_grad(x, grad),
        "gw_mm": lambda: grad.t().mm(x),
    }


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="themask_mit_b0_t2")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=7)
    args = parser.parse_args()
    if not linear.ENABLED:
        sys.exit("the oneDNN path is off on this machine (see themask/modeling/linear.py)")
    torch.set_num_threads(args.threads)
    totals: collections.Counter = collections.Counter()
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {capability}, {args.threads} threads")
    for (rows, d_in, d_out, input_grad), calls in sorted(
        step_shapes(args.preset, args.size).items()
    ):
        x, weight, grad = (
            torch.randn(rows, d_in),
            torch.randn(d_out, d_in),
            torch.randn(rows, d_out),
        )
        ways = products(x, weight, grad)
        samples = collections.defaultdict(list)
        for turn in range(args.turns):
            for name, fn in ways.items() if turn % 2 == 0 else reversed(ways.items()):
                samples[name].append(median_ms(fn, 3))
        ms = {name: sorted(s)[len(s) // 2] for name, s in samples.items()}
        for name, value in ms.items():
            if input_grad or name.startswith("gw"):
                totals[name] += calls * value
        row = {"rows": rows, "in": d_in, "out": d_out, "calls": calls}
        print(json.dumps({**row, **{k: round(v, 3) for k, v in ms.items()}}), flush=True)
    print(json.dumps({"per_step_ms": {k: round(v, 1) for k, v in totals.items()}}))


if __name__ == "__main__":
    main()
