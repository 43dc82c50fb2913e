"""Ablation study of THE-Mask's parts at small scale, over seeds (issue 14).

Trains each variant with each seed on generated videos (``benchmarks/synthetic_videos.py``,
12 classes in the 124-class VSPW label space; the models keep the VSPW class count), evaluates
it on the held-out split and writes, under ``--out``:

* ``runs/<variant>_q<queries>/seed<k>/``: the training runs (config, metrics.jsonl, weights,
  result.json);
* ``ablation.json``: per run and per variant (mean ± std over seeds) mIoU, mIoU_present, WIoU,
  mVC8, mVC16, the matched-query fractions of round 1 and 2 (mean over the last quarter of
  training) and the round-2 supervision statistics of the final model;
* ``ablation.md``: the table; ``ablation.png``: validation mIoU curves (mean over seeds).

Finished runs (``result.json``) are reused, so an interrupted study continues where it stopped.
No pretrained backbone is available offline: every model starts from scratch.

    python benchmarks/ablation.py --out benchmarks/ablation --seeds 0 1 2 --steps 1500 \
        --variants mask2former two_rounds_hard themask --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_videos import make_synthetic_videos  # noqa: E402

logger = logging.getLogger("ablation")


@dataclass
class Variant:
    """A training run recipe: preset + overrides; ``init`` names the variant whose final
    weights (same seed) start this one, whose budget is then ``--stage2-steps``."""

    preset: str
    overrides: list[str] = field(default_factory=list)
    init: str | None = None
    label: str = ""


T1 = ["data.dilation=[0]"]
VARIANTS: dict[str, Variant] = {
    "mask2former": Variant("mask2former_tiny", T1, label="one round, hard (Mask2Former)"),
    "two_rounds_hard": Variant(
        "themask_tiny_t1", [*T1, "model.loss.second_round_loss=hard"], label="two rounds, hard"
    ),
    "themask": Variant("themask_tiny_t1", T1, label="two rounds, hierarchical (THE-Mask T=1)"),
    "themask_warmup": Variant(
        "themask_tiny_t1", [*T1, "model.loss.warmup_steps={warmup}"],
        label="THE-Mask T=1, one-round warm-up",
    ),
    "t1_continued": Variant("themask_tiny_t1", T1, init="themask", label="T=1 continued"),
    "tad_t1": Variant(
        "themask_tiny_t2", ["data.dilation=[0]", "model.num_frames=1"], init="themask",
        label="TAD T=1 from T=1",
    ),
    "tad_t2": Variant("themask_tiny_t2", ["data.dilation=[-3]"], init="themask",
                      label="TAD T=2 from T=1"),
    "tad_t3": Variant(
        "themask_tiny_t2", ["data.dilation=[-6,-3]", "model.num_frames=3"], init="themask",
        label="TAD T=3 from T=1",
    ),
}  # fmt: skip
METRICS = ("mIoU", "mIoU_present", "WIoU", "mVC8", "mVC16")
TABLE_METRICS = ("mIoU", "mIoU_late", "WIoU", "mVC8", "mVC16")
LATE_FRACTION = 0.4  # mIoU_late: mean validation mIoU over the last 40 % of the steps
TRAIN_STATS = ("matched_fraction_round1", "matched_fraction_round2")
ROUND2_STATS = ("round2_empty_fraction", "round2_coverage")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="THE-Mask ablation study on generated videos")
    parser.add_argument("--out", default="benchmarks/ablation", help="output folder")
    parser.add_argument("--data", help="existing VSPW-layout root (default: generate OUT/data)")
    parser.add_argument("--variants", nargs="+", default=["mask2former", "two_rounds_hard",
                        "themask"], choices=sorted(VARIANTS))  # fmt: skip
    parser.add_argument("--queries", nargs="+", type=int, default=[50], help="query counts")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500, help="steps of a run from scratch")
    parser.add_argument("--stage2-steps", type=int, default=500, help="steps of a run with init")
    parser.add_argument("--warmup-fraction", type=float, default=0.25,
                        help="themask_warmup: one round for this fraction of --steps")  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=250, help="validation interval")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--train-videos", type=int, default=150)
    parser.add_argument("--val-videos", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="data loader processes")
    parser.add_argument("--only-finished", action="store_true",
                        help="train nothing: report the runs that have a result.json")  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="for every run")
    return parser.parse_args(argv)


def run_name(variant: str, queries: int) -> str:
    return f"{variant}_q{queries}"


def run_config(args: argparse.Namespace, variant: Variant, queries: int, seed: int, data: Path):
    from themask.config import load_config

    steps = args.stage2_steps if variant.init else args.steps
    warmup = int(args.warmup_fraction * args.steps)
    overrides = [
        f"preset={variant.preset}",
        f"data.root={data}",
        "data.scale=[128,96]",
        f"data.crop_size=[{args.crop},{args.crop}]",
        "data.ratio_range=[0.75,1.25]",
        f"data.num_workers={args.workers}",
        "model.drop_path_rate=0.0",
        f"model.num_queries={queries}",
        f"train.max_steps={steps}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        "train.backbone_lr_mult=1.0",
        f"train.seed={seed}",
        "train.log_interval=10",
        f"train.checkpoint_interval={steps}",
        f"train.eval_interval={min(args.eval_every, steps)}",
        *[o.format(warmup=warmup) for o in variant.overrides],
        *args.overrides,
    ]
    return load_config(None, overrides)


def train_run(cfg: Any, run_dir: Path, init: Path | None) -> dict[str, Any]:
    """Train (from ``init`` weights if given), evaluate; returns the run's result dict."""
    from themask.engine import Trainer, seed_everything
    from themask.logger import read_metrics
    from themask.modeling.build import build_model_from_config
    from themask.warm_start import load_stage1_into_temporal
    from themask.weights.files import read_state_dict

    seed_everything(cfg.train.seed)
    model = build_model_from_config(cfg.model)
    if init is not None:
        state = read_state_dict(str(init))
        if model.is_temporal:
            load_stage1_into_temporal(model, state, head_init=cfg.train.head_init)
        else:
            model.load_state_dict(state)
    start = time.time()
    trainer = Trainer(cfg, run_dir, device="cpu", model=model, progress=False, overwrite=True)
    trainer.train()
    minutes = (time.time() - start) / 60
    evals = read_metrics(run_dir / "metrics.jsonl", tag="eval")
    train = read_metrics(run_dir / "metrics.jsonl", tag="train")
    tail = train[len(train) * 3 // 4 :] or train
    result: dict[str, Any] = {k: evals[-1].get(k, math.nan) for k in METRICS}
    for key in TRAIN_STATS:
        result[key] = statistics.fmean(r.get(key, 0.0) for r in tail)
    result.update(round2_statistics(trainer.model, cfg))
    result["curve"] = [(r["step"], r["mIoU"]) for r in evals]
    result["train_minutes"] = round(minutes, 2)
    return result


def frames_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader ``Batch`` as (normalised frames (B, T, 3, H, W), labels (B, T, H, W))."""
    from themask.data.loader import batch_to_device

    return batch_to_device(batch, torch.device("cpu"))


@torch.no_grad()
def round2_statistics(model: Any, cfg: Any, batches: int = 8) -> dict[str, float]:
    """What round 2 supervises on ``batches`` training batches (final model, train mode):
    the fraction of secondary queries whose soft target (GT ∧ σ(pred) > 0.5, prediction
    upsampled by nearest interpolation) is empty, and the soft target's coverage (its pixels
    over the GT mask's pixels), both per (query, frame), mean over the batches."""
    import torch.nn.functional as F

    from themask.data.loader import build_train_loader
    from themask.loss.criterion import SetCriterion
    from themask.loss.targets import IGNORE_INDEX, build_targets

    if cfg.loss.num_rounds != 2:
        return {k: math.nan for k in ROUND2_STATS}
    matcher = SetCriterion(cfg.loss, model.config.num_classes).matcher
    loader = iter(
        build_train_loader(cfg.data, batch_size=cfg.train.batch_size, num_workers=0, seed=10_000)
    )
    was_training = model.training
    model.train()
    empty, coverage = [], []
    for _ in range(batches):
        frames, labels = frames_and_labels(next(loader))
        predictions = model(frames)
        divisor = model.config.size_divisor
        pad = (0, (-labels.shape[-1]) % divisor, 0, (-labels.shape[-2]) % divisor)
        labels = F.pad(labels, pad, value=IGNORE_INDEX)
        if not model.is_temporal:
            labels = labels.flatten(0, 1).unsqueeze(1)  # (B·T, 1, H, W)
        targets = build_targets(labels, model.config.num_classes)
        final = (predictions.frame or predictions.clip)[-1]
        sets = [(predictions.clip[-1].class_logits, final.mask_logits)]
        result = matcher.match_sets(sets, targets, num_rounds=2)
        for clip, match in enumerate(result.matches[0]):
            queries, rows = match.secondary
            if queries.numel() == 0:
                continue
            classes = torch.as_tensor(result.classes[clip][rows.numpy()], dtype=torch.long)
            for t in range(labels.shape[1]):
                index = torch.full_like(queries, clip), torch.full_like(queries, t)
                gt = targets.masks(*index, classes)  # (R, H, W)
                logits = final.mask_logits[clip, queries, t].unsqueeze(1).float()
                fires = F.interpolate(logits, size=gt.shape[-2:], mode="nearest")[:, 0] > 0
                soft = (gt * fires).flatten(1).sum(1)
                keep = gt.flatten(1).sum(1) > 0  # the class is in this frame
                empty.extend((soft[keep] == 0).float().tolist())
                coverage.extend((soft[keep] / gt.flatten(1).sum(1)[keep]).tolist())
    model.train(was_training)
    mean = statistics.fmean
    return {
        "round2_empty_fraction": mean(empty) if empty else math.nan,
        "round2_coverage": mean(coverage) if coverage else math.nan,
    }


def late_miou(curve: list[tuple[int, float]]) -> float:
    """Mean validation mIoU over the evaluations in the last ``LATE_FRACTION`` of the steps
    (less noisy than the final evaluation alone)."""
    last = curve[-1][0]
    return statistics.fmean(v for s, v in curve if s >= (1 - LATE_FRACTION) * last)


def summarise(results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean and (sample) std over seeds of every scalar, per variant."""
    summary = {}
    for name, by_seed in results.items():
        runs = [{**r, "mIoU_late": late_miou(r["curve"])} if r.get("curve") else r
                for r in by_seed.values()]  # fmt: skip
        row: dict[str, Any] = {"seeds": sorted(by_seed)}
        for key in (*METRICS, "mIoU_late", *TRAIN_STATS, *ROUND2_STATS, "train_minutes"):
            values = [float(r[key]) for r in runs if not math.isnan(float(r.get(key, math.nan)))]
            row[key] = {
                "mean": statistics.fmean(values) if values else math.nan,
                "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else math.nan,
            }
        summary[name] = row
    return summary


def _cell(stat: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    if math.isnan(stat["mean"]):
        return "–"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def markdown_table(summary: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    header = ("run", "seeds", *TABLE_METRICS, "matched r1 %", "matched r2 %", "r2 empty %",
              "r2 coverage %", "min/run")  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in summary.items():
        cells = [labels.get(name, name), str(len(row["seeds"]))]
        cells += [_cell(row[k]) for k in (*TABLE_METRICS, *TRAIN_STATS, *ROUND2_STATS)]
        cells.append(f"{row['train_minutes']['mean']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    """Validation mIoU against step, mean over seeds (shaded: min-max), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, by_seed in results.items():
        curves = [dict(r["curve"]) for r in by_seed.values()]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[100 * c[s] for c in curves] for s in steps]
        ax.plot(steps, [statistics.fmean(v) for v in values], marker="o", ms=3, label=name)
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.15)
    ax.set_xlabel("training step (runs with init: steps after the T=1 run)")
    ax.set_ylabel("validation mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if not (data / "train.txt").is_file():
        logger.info("writing %d + %d generated videos to %s", args.train_videos, args.val_videos,
                    data)  # fmt: skip
        make_synthetic_videos(data, num_train=args.train_videos, num_val=args.val_videos)
    # a variant with init needs its source first
    order = []
    for name in args.variants:
        source = VARIANTS[name].init
        if source and source not in order:
            order.append(source)
        if name not in order:
            order.append(name)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    labels: dict[str, str] = {}
    started = time.time()
    for queries in args.queries:
        for name in order:
            variant = VARIANTS[name]
            key = run_name(name, queries)
            labels[key] = f"{variant.label}, {queries} queries"
            for seed in args.seeds:
                run_dir = out / "runs" / key / f"seed{seed}"
                result_path = run_dir / "result.json"
                if not result_path.is_file() and args.only_finished:
                    continue
                if not result_path.is_file():
                    init = None
                    if variant.init:
                        source = run_name(variant.init, queries)
                        init = out / "runs" / source / f"seed{seed}" / "model.safetensors"
                    logger.info("training %s seed %d", key, seed)
                    cfg = run_config(args, variant, queries, seed, data)
                    result = train_run(cfg, run_dir, init)
                    result_path.write_text(json.dumps(result, indent=1))
                result = json.loads(result_path.read_text())
                logger.info("%s seed %d: mIoU %.3f", key, seed, result["mIoU"])
                if name in args.variants:
                    results.setdefault(key, {})[seed] = result
    summary = summarise(results)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    payload = {
        "command": f"python benchmarks/ablation.py {command}",
        "wall_minutes": round((time.time() - started) / 60, 1),
        "train_minutes_total": round(
            sum(r["train_minutes"] for runs in results.values() for r in runs.values()), 1
        ),
        "torch": torch.__version__,
        "summary": summary,
        "runs": results,
    }
    (out / "ablation.json").write_text(json.dumps(payload, indent=1))
    (out / "ablation.md").write_text(markdown_table(summary, labels))
    plot_curves(results, out / "ablation.png")
    print(markdown_table(summary, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
