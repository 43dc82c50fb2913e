"""``themask eval``: score saved weights on a VSPW-format split (mIoU, WIoU, accuracy, mVC)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from themask.commands import add_overrides_argument, add_threads_argument
from themask.precision import AMP_MODES, configure_cuda_math

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Predict every frame of a split with the test-clip protocol (each frame once; clips of T
frames 3 apart for T > 1, as the official THE-Mask test) and report, streaming:
mIoU in both published variants (mmseg: classes with a non-empty union; Evaluator: classes
present in the ground truth), Weighted IoU, pixel and mean class accuracy, per-class IoU, and
the video consistency mVC8 / mVC16 (by default with the rule of the published tables:
videos of at most 16 frames are left out of both; see --vc-rule). In a sparse dataset only
the frames with a mask are scored (the others serve as clip context). Runs on every process
under torchrun (videos are split over the ranks; rank 0 prints and writes).

Example:
  themask eval configs/vspw/themask_mit_b1_t2.yaml --weights run/model.safetensors \\
      --clip-len 2 --json metrics.json data.root=/data/VSPW_480p
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate weights on a split (mIoU, WIoU, accuracy, mVC8/16)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config",
        metavar="CONFIG",
        help="run config YAML or shipped config name (its data and eval sections are used)",
    )
    add_overrides_argument(parser, "data.root=DIR")
    parser.add_argument(
        "--weights",
        required=True,
        help="weights: a themask .safetensors file or an official THE-Mask checkpoint (.pth)",
    )
    parser.add_argument(
        "--clip-len",
        type=int,
        default=None,
        help="frames per test clip (default: data.test_clip_len, else the training clip length)",
    )
    parser.add_argument("--split", default=None, help="split name (default: data.val_split)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the metrics here")
    parser.add_argument(
        "--save-predictions",
        metavar="DIR",
        default=None,
        help="also write VSPW-format prediction PNGs to DIR/<video>/<frame>.png",
    )
    parser.add_argument(
        "--vc-gt",
        choices=("train_id", "raw"),
        default="train_id",
        help="GT values compared by mVC: train ids (0 'others' and 255 'void' merged, as the "
        "CFFM/THE-Mask script) or raw PNG values (as the VSPW authors' script)",
    )
    parser.add_argument(
        "--vc-rule",
        choices=("published", "per_length"),
        default=None,
        help="which videos mVC leaves out (default: eval.vc_rule = published): 'published' "
        "skips videos of <= 16 frames for mVC8 and mVC16, as VSS-CFFM VC_perclip.py behind the "
        "published VSPW tables; 'per_length' skips videos of <= n frames for mVC_n",
    )
    parser.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=None,
        help="autocast for inference (default: eval.amp)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from themask import distributed
    from themask.config import ConfigError, load_config
    from themask.evaluation.evaluate import evaluate_config
    from themask.evaluation.metrics import format_metrics_table, metrics_to_json
    from themask.io import atomic_write
    from themask.weights import model_from_weights

    cfg = load_config(args.config, args.overrides)
    info = distributed.init_distributed(args.device)
    configure_cuda_math(info.device)
    try:
        model = model_from_weights(args.weights).to(info.device)
        description = cfg.data.description
        if model.config.num_classes != description.num_classes:
            raise ConfigError(
                f"{args.weights}: the model predicts {model.config.num_classes} classes but the "
                f"dataset ({description.source}) has {description.num_classes}; fine-tune it "
                f"into this dataset with `themask train CONFIG --init-from {args.weights}`"
            )
        vc_rule = args.vc_rule or cfg.eval.vc_rule
        split = args.split or cfg.data.val_split
        clip_len = args.clip_len or cfg.data.eval_clip_len
        logger.info(
            "evaluating %s on %s/%s, clip length %d", args.weights, cfg.data.root, split, clip_len
        )
        report = evaluate_config(
            model,
            cfg,
            device=info.device,
            split=split,
            clip_len=clip_len,
            write_dir=args.save_predictions,
            amp=args.amp,
            vc_gt=args.vc_gt,
            vc_rule=vc_rule,
        )
        if info.is_main:
            names = list(description.classes)
            print(
                f"{report['num_videos']} videos, {report['num_frames']} frames scored of "
                f"{cfg.data.root} / {split}, clip length {clip_len}, mVC rule {vc_rule}"
            )
            print(format_metrics_table(report, names))
            if args.json_path:
                payload = {
                    "weights": str(args.weights),
                    "split": split,
                    "clip_len": clip_len,
                    "vc_gt": args.vc_gt,
                    "vc_rule": vc_rule,
                    "metrics": metrics_to_json(report, names),
                }
                with atomic_write(args.json_path) as tmp:
                    Path(tmp).write_text(json.dumps(payload, indent=1, allow_nan=False))
                print(f"metrics written to {args.json_path}")
    finally:
        distributed.cleanup()
    return 0
