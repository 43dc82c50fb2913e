"""Evaluate weights on a split (mIoU, WIoU, accuracy, mVC8/16).

Every frame is predicted once with the official test clips; the report adds both mIoU variants,
per-class IoU and class accuracy (docs/VSPW.md). Under torchrun the ranks share the videos.
Example:
  themask eval vspw/themask_mit_b1_t2 --weights run/model.safetensors --clip-len 2 \\
      --json metrics.json data.root=/data/VSPW_480p
"""

from __future__ import annotations

import argparse
import logging

from themask.commands import add_command, add_inference_arguments, add_overrides_argument

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "eval", run, __doc__)
    parser.add_argument("config", metavar="CONFIG", help="run config (its data and eval sections)")
    add_overrides_argument(parser, "data.root=DIR")
    parser.add_argument("--weights", required=True, help="themask .safetensors or official .pth")
    parser.add_argument("--clip-len", type=int, help="frames per test clip (default: the data's)")
    parser.add_argument("--split", help="split name (default: data.val_split)")
    parser.add_argument("--json", dest="json_path", help="write the metrics here")
    parser.add_argument("--save-predictions", metavar="DIR", help="write label PNGs there too")
    text = "mVC compares train ids (CFFM's script) or raw PNG values (VSPW's)"
    parser.add_argument("--vc-gt", choices=("train_id", "raw"), default="train_id", help=text)
    text = "mVC leaves out videos of <= 16 frames or of <= n (default: eval.vc_rule)"
    parser.add_argument("--vc-rule", choices=("published", "per_length"), help=text)
    add_inference_arguments(parser, amp_default_help="eval.amp")


def run(args: argparse.Namespace) -> int:
    from themask import distributed
    from themask.commands import report_metrics
    from themask.config import ConfigError, load_config
    from themask.evaluation.evaluate import evaluate_config
    from themask.precision import configure_cuda_math
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
        settings = {"split": split, "clip_len": clip_len, "vc_gt": args.vc_gt, "vc_rule": vc_rule}
        logger.info("evaluating %s on %s/%s, T = %d", args.weights, cfg.data.root, split, clip_len)
        options = dict(settings, write_dir=args.save_predictions, amp=args.amp)
        report = evaluate_config(model, cfg, device=info.device, **options)
        if info.is_main:
            scored = f"{report['num_videos']} videos, {report['num_frames']} frames scored of"
            print(f"{scored} {cfg.data.root} / {split}, clip length {clip_len}, mVC rule {vc_rule}")
            names = list(description.classes)
            report_metrics(report, names, args.json_path, weights=str(args.weights), **settings)
            if args.json_path:
                print(f"metrics written to {args.json_path}")
    finally:
        distributed.cleanup()
    return 0
