"""Training-step time of the demo's model (``themask_tiny_t2``, 8 classes, 4 clips of 2 frames at
96×96, one thread) with 10 and with 50 queries, interleaved in one process so both see the same
machine load. Prints the medians and their ratio.

    python benchmarks/query_step_time.py --repeats 12
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from themask import build_model
from themask.loss.criterion import SetCriterion, training_loss
from themask.modeling.build import preset_loss_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", nargs=2, type=int, default=[10, 50])
    parser.add_argument("--repeats", type=int, default=12, help="steps per model (2 warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    frames = torch.randn(4, 2, 3, 96, 96)
    labels = torch.randint(0, 8, (4, 2, 1, 1)).repeat(1, 1, 96, 96)  # one class per quarter
    labels[..., 48:, :] = (labels[..., 48:, :] + 1) % 8
    labels[..., :, 48:] = (labels[..., :, 48:] + 3) % 8
    models = {q: build_model("themask_tiny_t2", num_classes=8, num_queries=q) for q in args.queries}
    optimizers = {q: torch.optim.AdamW(m.train().parameters(), 1e-3) for q, m in models.items()}
    criterion = SetCriterion(preset_loss_config("themask_tiny_t2"), 8)
    times: dict[int, list[float]] = {q: [] for q in args.queries}
    for repeat in range(args.repeats):
        for q, model in models.items():
            start = time.perf_counter()
            loss, _ = training_loss(model, frames, labels, criterion)
            optimizers[q].zero_grad()
            loss.backward()
            optimizers[q].step()
            if repeat >= 2:
                times[q].append(time.perf_counter() - start)
    medians = {q: statistics.median(t) for q, t in times.items()}
    few, many = args.queries
    print(
        f"median training step: {few} queries {1000 * medians[few]:.0f} ms, {many} queries "
        f"{1000 * medians[many]:.0f} ms, ratio {medians[many] / medians[few]:.2f}"
    )


if __name__ == "__main__":
    main()
