"""``themask demo``: the embedded end-to-end run (toy data → train → eval → videos), on CPU
unless ``--device cuda``.

1. writes the toy dataset (``themask.data.toy``; 200 training and 6 validation videos) into
   ``OUT/toy_data``;
2. trains ``configs/toy/themask_toy.yaml`` for its fixed number of steps (reproducible: the
   budget is in steps, not in wall time) into ``OUT/run``;
3. evaluates on the toy validation split, prints the metric table, writes ``OUT/metrics.json``;
4. writes overlays (ground truth | prediction) of a validation video as PNGs and as
   ``OUT/overlay.mp4``, and the loss curve as ``OUT/loss_curve.png``.

``--baseline`` also trains the Mask2Former baseline (``configs/toy/mask2former_toy.yaml``)
with the same budget and prints both results side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from themask.commands import add_threads_argument

logger = logging.getLogger(__name__)

THEMASK_CONFIG = "toy/themask_toy"  # shipped configs (themask/configs), used by name
BASELINE_CONFIG = "toy/mask2former_toy"
# Many short videos: with only a few dozen the tiny model memorises them instead of learning
# textures and shapes (train mIoU > 90 %, validation near chance).
TRAIN_VIDEOS = 200
VAL_VIDEOS = 6


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train and evaluate THE-Mask on the embedded toy videos (CPU, a few minutes)",
        description="Generate the embedded toy dataset, train the toy THE-Mask config on CPU, "
        "evaluate it (metric table + JSON), and write overlays, an overlay MP4 of a validation "
        "video and the loss curve.",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides of the toy config, e.g. train.max_steps=200",
    )
    parser.add_argument("--out", default="demo_out", metavar="DIR", help="output folder")
    parser.add_argument(
        "--config",
        metavar="CONFIG",
        help=f"run config to train (default: the shipped {THEMASK_CONFIG})",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help=f"also train the Mask2Former baseline (shipped {BASELINE_CONFIG})",
    )
    parser.add_argument(
        "--train-videos",
        type=int,
        default=TRAIN_VIDEOS,
        metavar="N",
        help=f"number of generated training videos (default {TRAIN_VIDEOS})",
    )
    add_threads_argument(parser, default=1)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where to train and evaluate (default cpu: the documented, reproducible demo)",
    )
    parser.set_defaults(func=run)


def _count_lines(path: Path) -> int:
    return len(path.read_text().split()) if path.is_file() else 0


def run(args: argparse.Namespace) -> int:
    from themask.data.toy import make_toy_dataset

    if args.device == "cuda":
        import torch

        from themask.config import ConfigError

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
    out = Path(args.out)
    data_root = out / "toy_data"
    written = (data_root / "dataset.yaml").is_file()
    if not written or _count_lines(data_root / "train.txt") != args.train_videos:
        print(f"writing the toy dataset ({args.train_videos} + {VAL_VIDEOS} videos) to {data_root}")
        make_toy_dataset(data_root, seed=0, num_train=args.train_videos, num_val=VAL_VIDEOS)
    config = args.config or THEMASK_CONFIG

    results = {
        "THE-Mask": _train_and_report(config, args.overrides, data_root, out, "run", args.device)
    }
    if args.baseline:
        results["Mask2Former"] = _train_and_report(
            BASELINE_CONFIG, args.overrides, data_root, out / "baseline", "run", args.device
        )
        print("\n" + _comparison(results))
    print(f"\nall outputs in {out}/")
    return 0


def _train_and_report(
    config: str, overrides: list, data_root: Path, out: Path, run_name: str, device: str
) -> dict[str, Any]:
    import torch

    from themask.config import load_config
    from themask.engine import Trainer
    from themask.evaluation.evaluate import evaluate_config
    from themask.evaluation.metrics import format_metrics_table, metrics_to_json
    from themask.evaluation.visualize import plot_loss_curve
    from themask.io import atomic_write

    cfg = load_config(config, [f"data.root={data_root}", *overrides])
    names = list(cfg.data.description.classes)
    where = f"CPU ({torch.get_num_threads()} torch thread(s))" if device == "cpu" else device
    print(
        f"training {cfg.preset} on the toy dataset ({cfg.data.root}): {cfg.train.max_steps} "
        f"steps of {cfg.train.batch_size} clips on {where}"
    )
    start = time.time()
    trainer = Trainer(cfg, out / run_name, device=device, evaluate=False, overwrite=True)
    trainer.train()
    minutes = (time.time() - start) / 60
    print(f"trained in {minutes:.1f} min; weights: {out / run_name / 'model.safetensors'}")

    report = evaluate_config(trainer.model, cfg, device=trainer.device)
    print(
        f"\n{cfg.preset} on the toy validation split ({report['num_videos']} videos, "
        f"{report['num_frames']} frames, test clips of {cfg.data.eval_clip_len}); "
        f"chance level mIoU ≈ {100 / len(names):.1f}"
    )
    print(format_metrics_table(report, names))
    payload = {
        "config": str(config),
        "preset": cfg.preset,
        "steps": cfg.train.max_steps,
        "train_minutes": round(minutes, 2),
        "metrics": metrics_to_json(report, names),
    }
    with atomic_write(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(payload, indent=1, allow_nan=False))

    video = _write_overlays(trainer.model, cfg, out, device=trainer.device)
    plot_loss_curve(out / run_name / "metrics.jsonl", out / "loss_curve.png", title=cfg.preset)
    print(
        f"wrote {out / 'metrics.json'}, overlays of {video} in {out / 'overlays'}, "
        f"{out / 'overlay.mp4'} and {out / 'loss_curve.png'}"
    )
    return report


def _write_overlays(
    model: Any, cfg: Any, out: Path, *, device: Any = "cpu", video_index: int = 0
) -> str:
    """Ground truth | prediction panels of one validation video: PNGs and an MP4."""
    from PIL import Image

    from themask.data.transforms import TestTransform
    from themask.data.vspw import VSPWIndex, read_frame
    from themask.evaluation.predict import predict_video
    from themask.evaluation.visualize import OverlayVideoWriter, comparison_panel

    description = cfg.data.description
    video = VSPWIndex(cfg.data.root, cfg.data.val_split)[video_index]
    transform = TestTransform(scale=cfg.data.scale, size_divisor=cfg.data.size_divisor)
    frames = (read_frame(p) for p in video.frame_paths)
    predictions = predict_video(
        model, frames, clip_len=cfg.data.eval_clip_len, transform=transform, device=device
    )
    folder = out / "overlays" / video.name
    folder.mkdir(parents=True, exist_ok=True)
    with OverlayVideoWriter(out / "overlay.mp4", fps=5.0) as writer:
        assert video.mask_paths is not None  # a val split is labelled
        for path, mask, (frame, labels) in zip(video.frame_paths, video.mask_paths, predictions):
            assert mask is not None
            gt = description.read_label(mask)
            panel = comparison_panel(frame, gt, labels, description.classes, description.palette)
            Image.fromarray(panel).save(folder / f"{path.stem}.png")
            writer.write(panel)
    return video.name


def _comparison(results: dict[str, dict[str, Any]]) -> str:
    from themask.evaluation.metrics import format_percent

    keys = ("mIoU", "WIoU", "aAcc", "mVC8")
    lines = [f"{'model':<12}" + "".join(f"{k:>8}" for k in keys)]
    for name, report in results.items():
        values = "".join(format_percent(report[k], 8) for k in keys if k in report)
        lines.append(f"{name:<12}{values}")
    return "\n".join(lines)
