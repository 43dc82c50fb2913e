"""Train and evaluate THE-Mask on the embedded toy videos (CPU, a few minutes).

Writes the toy dataset (OUT/toy_data), the run (OUT/run), the metrics (OUT/metrics.json),
GT | prediction overlays of a validation video (OUT/overlays, OUT/overlay.mp4) and the loss
curve (OUT/loss_curve.png). --baseline also trains Mask2Former with the same budget.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from themask.commands import add_command, add_threads_argument, report_metrics

THEMASK_CONFIG = "toy/themask_toy"  # shipped configs, used by name
BASELINE_CONFIG = "toy/mask2former_toy"
TRAIN_VIDEOS = 200  # with a few dozen, the tiny model memorises them instead of learning
VAL_VIDEOS = 6
COMPARED = ("mIoU", "WIoU", "aAcc", "mVC8")  # the --baseline comparison


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "demo", run, __doc__)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="toy config overrides")
    parser.add_argument("--out", default="demo_out", metavar="DIR", help="output folder")
    parser.add_argument("--config", metavar="CONFIG", help=f"default: {THEMASK_CONFIG}")
    parser.add_argument("--baseline", action="store_true", help=f"also train {BASELINE_CONFIG}")
    text = f"generated training videos (default {TRAIN_VIDEOS})"
    parser.add_argument("--train-videos", type=int, default=TRAIN_VIDEOS, metavar="N", help=text)
    add_threads_argument(parser, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")


def run(args: argparse.Namespace) -> int:
    import torch

    from themask.config import ConfigError
    from themask.data.toy import make_toy_dataset
    from themask.evaluation.metrics import summarize_metrics

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    out = Path(args.out)
    data_root = out / "toy_data"
    train_list = data_root / "train.txt"
    videos = len(train_list.read_text().split()) if train_list.is_file() else 0
    if not (data_root / "dataset.yaml").is_file() or videos != args.train_videos:
        print(f"writing the toy dataset ({args.train_videos} + {VAL_VIDEOS} videos) to {data_root}")
        make_toy_dataset(data_root, seed=0, num_train=args.train_videos, num_val=VAL_VIDEOS)
    results = {"THE-Mask": _train_and_report(args.config or THEMASK_CONFIG, args, data_root, out)}
    if args.baseline:
        report = _train_and_report(BASELINE_CONFIG, args, data_root, out / "baseline")
        results["Mask2Former"] = report
        print()
        for name, report in results.items():
            compared = {k: report[k] for k in COMPARED if k in report}
            print(f"{name:<12} {summarize_metrics(compared)}")
    print(f"\nall outputs in {out}/")
    return 0


def _train_and_report(
    config: str, args: argparse.Namespace, data_root: Path, out: Path
) -> dict[str, Any]:
    import torch

    from themask.config import load_config
    from themask.engine import Trainer
    from themask.evaluation.evaluate import evaluate_config
    from themask.evaluation.visualize import plot_loss_curve

    cfg = load_config(config, [f"data.root={data_root}", *args.overrides])
    names = list(cfg.data.description.classes)
    where = f"CPU ({torch.get_num_threads()} torch thread(s))" if args.device == "cpu" else "cuda"
    steps = f"{cfg.train.max_steps} steps of {cfg.train.batch_size} clips on {where}"
    print(f"training {cfg.preset} on the toy dataset ({cfg.data.root}): {steps}")
    start = time.time()
    trainer = Trainer(cfg, out / "run", device=args.device, evaluate=False, overwrite=True)
    weights = trainer.train().weights_path
    minutes = (time.time() - start) / 60
    print(f"trained in {minutes:.1f} min; weights: {weights}")

    report = evaluate_config(trainer.model, cfg, device=trainer.device)
    counts = f"{report['num_videos']} videos, {report['num_frames']} frames"
    chance = f"chance level mIoU ≈ {100 / len(names):.1f}"
    split = f"toy validation split ({counts}, test clips of {cfg.data.eval_clip_len})"
    print(f"\n{cfg.preset} on the {split}; {chance}")
    fields = {"config": str(config), "preset": cfg.preset, "steps": cfg.train.max_steps}
    report_metrics(report, names, out / "metrics.json", train_minutes=round(minutes, 2), **fields)
    video = _write_overlays(trainer.model, cfg, out, trainer.device)
    plot_loss_curve(out / "run" / "metrics.jsonl", out / "loss_curve.png", title=cfg.preset)
    files = f"{out / 'overlay.mp4'} and {out / 'loss_curve.png'}"
    print(f"wrote {out / 'metrics.json'}, overlays of {video} in {out / 'overlays'}, {files}")
    return report


def _write_overlays(model: Any, cfg: Any, out: Path, device: Any) -> str:
    """GT | prediction panels of the first validation video as PNGs and an MP4."""
    from PIL import Image

    from themask.data.transforms import TestTransform
    from themask.data.vspw import VSPWIndex, read_frame
    from themask.evaluation.predict import predict_video
    from themask.evaluation.visualize import OverlayVideoWriter, comparison_panel

    description = cfg.data.description
    video = VSPWIndex(cfg.data.root, cfg.data.val_split).videos[0]
    transform = TestTransform(scale=cfg.data.scale, size_divisor=cfg.data.size_divisor)
    frames = (read_frame(p) for p in video.frame_paths)
    clip_len = cfg.data.eval_clip_len
    pairs = predict_video(model, frames, clip_len=clip_len, transform=transform, device=device)
    folder = out / "overlays" / video.name
    folder.mkdir(parents=True, exist_ok=True)
    assert video.mask_paths is not None  # a validation split is labelled
    with OverlayVideoWriter(out / "overlay.mp4", fps=5.0) as writer:
        for path, mask, (frame, labels) in zip(video.frame_paths, video.mask_paths, pairs):
            gt = description.read_label(mask)
            panel = comparison_panel(frame, gt, labels, description.classes, description.palette)
            Image.fromarray(panel).save(folder / f"{path.stem}.png")
            writer.write(panel)
    return video.name
