"""Round-2 supervision over training: trains one ablation variant from scratch (same recipe
and data as ``ablation.py``) and prints, at chosen steps, the fraction of secondary queries
whose soft target is empty and the soft target's coverage of the GT mask.

    python benchmarks/round2_trace.py --variant themask --queries 50 --at 0 5 25 100 400
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="benchmarks/ablation/data")
    parser.add_argument("--variant", default="themask", choices=sorted(ablation.VARIANTS))
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--total-steps", type=int, default=2000, help="of the lr schedule")
    parser.add_argument("--at", nargs="+", type=int, default=[0, 5, 25, 100, 400])
    args = parser.parse_args()
    from themask.data.loader import build_train_loader
    from themask.engine import seed_everything
    from themask.loss.criterion import SetCriterion, training_loss
    from themask.modeling.build import build_model_from_config
    from themask.optim import build_optimizer, poly_lr, set_learning_rate

    torch.set_num_threads(1)
    study = ablation.parse_args(["--steps", str(args.total_steps)])
    variant = ablation.VARIANTS[args.variant]
    cfg = ablation.run_config(study, variant, args.queries, args.seed, Path(args.data))
    seed_everything(args.seed)
    model = build_model_from_config(cfg.model).train()
    tcfg = cfg.train
    optimizer = build_optimizer(model, tcfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loader = iter(build_train_loader(cfg.data, batch_size=tcfg.batch_size, seed=args.seed))
    criterion = SetCriterion(cfg.loss, cfg.model.num_classes)
    for step in range(max(args.at) + 1):
        if step in args.at:
            stats = ablation.round2_statistics(model, cfg)
            print(json.dumps({"step": step, **{k: round(v, 4) for k, v in stats.items()}}))
        if step == max(args.at):
            break
        set_learning_rate(optimizer, poly_lr(step, tcfg.lr, tcfg.max_steps, tcfg.poly_power))
        frames, labels = ablation.frames_and_labels(next(loader))
        loss, _ = training_loss(
            model, frames, labels, criterion, size_divisor=cfg.model.size_divisor, step=step
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.clip_grad_norm)
        optimizer.step()


if __name__ == "__main__":
    main()
