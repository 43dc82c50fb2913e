"""``themask predict``: segment a video file or a folder of frames with saved weights."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from themask.commands import add_threads_argument
from themask.precision import AMP_MODES, configure_cuda_math

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Segment every frame of INPUT (a video file or a folder of frames sorted by name) with causal
sliding windows: frame t is predicted from the clip [t-(T-1)*STEP, ..., t-STEP, t] (frames
before the start repeat the first one). Each frame's backbone and pixel-decoder features are
computed once and reused by every window that contains it.

Frames may differ in size: each is segmented at its own size (the windows start afresh
where the size changes); overlay.mp4 has the first frame's size, later frames are fitted in.
The test resize comes from --scale, else --config, else the weights (the training data's
scale, stored by `themask train`), else 853 x 480.

Writes to OUT:
  labels/<frame>.png     predicted train ids, palettised PNG (VSPW prediction format)
  overlays/<frame>.png   colour overlay on the frame, legend (class names and colours stored
                         in the weights by `themask train`) in a panel to its right
  overlay.mp4            the overlays as a video, at the input video's frame rate

Example:
  themask predict --weights run/model.safetensors clip.mp4 --out pred/ --clip-len 2
  themask predict --onnx exported/ clip.mp4 --out pred/    # after `themask export`
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="segment a video or a frame folder; write label PNGs, overlays and an MP4",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="video file or folder of frames")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--weights",
        help="weights: a themask .safetensors file or an official THE-Mask checkpoint (.pth)",
    )
    source.add_argument(
        "--onnx",
        metavar="DIR",
        help="a `themask export` folder instead of --weights: run on ONNX Runtime without "
        "torch (windows of the exported clip length; --scale defaults to the exported one; "
        "--config, --amp and --device apply to --weights only)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    add_window_arguments(parser)
    parser.add_argument("--step", type=int, default=3, help="frame gap inside a window")
    parser.add_argument(
        "--fps",
        type=float,
        default=None,
        help="frame rate of overlay.mp4 (default: the input video's; 15 for a folder of frames)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    parser.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="auto",
        help="autocast for inference (auto: bf16 on CUDA where supported, else off)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    add_threads_argument(parser)
    parser.set_defaults(func=run)


def add_window_arguments(parser: argparse.ArgumentParser) -> None:
    """``--clip-len``, ``--config`` and ``--scale`` (``predict`` and ``export``)."""
    parser.add_argument(
        "--clip-len",
        type=int,
        default=None,
        help="frames per window T (default: data.test_clip_len of --config, else the model's "
        "training clip length; 1 for single-frame models)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="run config YAML: its data section gives the defaults of --scale and --clip-len, "
        "and its dataset the class names and colours when the weights carry none",
    )
    parser.add_argument(
        "--scale",
        type=int,
        nargs=2,
        metavar=("LONG", "SHORT"),
        default=None,
        help="test resize: fit LONG x SHORT keeping the aspect ratio (default: data.scale of "
        "--config, else the scale stored with the weights, else 853 480)",
    )


def window_settings(args: argparse.Namespace, model: Any) -> tuple[tuple[int, int], int, list, Any]:
    """``(scale, clip_len, class_names, palette)`` of ``--weights`` with ``--scale`` /
    ``--clip-len`` / ``--config`` (see ``add_window_arguments``)."""
    from themask.config import ConfigError
    from themask.data.vspw import TEST_SCALE
    from themask.weights import read_test_scale

    scale, clip_len, data = args.scale, args.clip_len, None
    if args.config:
        from themask.config import load_config

        data = load_config(args.config).data
        scale = scale or data.scale
        clip_len = data.eval_clip_len if clip_len is None else clip_len
    if clip_len is None:
        clip_len = model.config.num_frames if model.is_temporal else 1
    if clip_len < 1:
        raise ConfigError(f"--clip-len must be >= 1, got {clip_len}")
    names, palette = _class_info(args.weights, data, model.config.num_classes)
    scale = tuple(scale or read_test_scale(args.weights) or TEST_SCALE)
    return scale, clip_len, names, palette


def _class_info(weights: str, data, num_classes: int):
    """(names, palette) for the overlays: those stored in the weights, else those of the
    ``--config`` dataset (``data``), else VSPW's for 124 classes, else numbers."""
    from themask.config import ConfigError
    from themask.data.description import VSPW_DESCRIPTION, default_palette
    from themask.weights import read_class_info

    stored = read_class_info(weights)
    if stored is not None:
        names, palette = stored
        return names, default_palette(len(names)) if palette is None else palette
    if data is not None:
        description = data.description
        if description.num_classes != num_classes:
            raise ConfigError(
                f"{weights}: the model predicts {num_classes} classes but the --config dataset "
                f"({description.source}) has {description.num_classes}"
            )
        return list(description.classes), description.palette
    if num_classes == VSPW_DESCRIPTION.num_classes:
        return list(VSPW_DESCRIPTION.classes), VSPW_DESCRIPTION.palette
    return [str(i) for i in range(num_classes)], default_palette(num_classes)


def run(args: argparse.Namespace) -> int:
    """Errors (``DataError``, ``ConfigError``, bad weights) are reported by ``themask.cli``."""
    return _predict_onnx(args) if args.onnx else _predict(args)


def _report(count: int, out: str) -> int:
    folder = Path(out)
    print(f"{count} frames: {folder / 'labels'}, {folder / 'overlays'}, {folder / 'overlay.mp4'}")
    return 0


def _predict_onnx(args: argparse.Namespace) -> int:
    """``--onnx DIR``: the exported model on ONNX Runtime; torch is never imported."""
    from themask.data.vspw import DataError
    from themask.deploy.runtime import OnnxStreamingPredictor, predict_frames
    from themask.evaluation.visualize import write_predictions

    predictor = OnnxStreamingPredictor(args.onnx, step=args.step, threads=args.threads)
    manifest = predictor.manifest
    if args.clip_len not in (None, manifest.clip_len):
        raise DataError(
            f"{predictor.directory}: exported for windows of {manifest.clip_len} frames, "
            f"not --clip-len {args.clip_len} (export again with --clip-len {args.clip_len})"
        )
    logger.info(
        "predicting %s with %s, windows of %d frames", args.input, args.onnx, manifest.clip_len
    )
    count = write_predictions(
        args.input,
        args.out,
        lambda frames: predict_frames(predictor, frames, scale=args.scale),
        class_names=manifest.class_names,
        palette=manifest.palette,
        fps=args.fps,
        alpha=args.alpha,
    )
    return _report(count, args.out)


def _predict(args: argparse.Namespace) -> int:
    import torch

    from themask.data.transforms import TestTransform
    from themask.evaluation.predict import predict_video
    from themask.evaluation.visualize import write_predictions
    from themask.weights import model_from_weights

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configure_cuda_math(device)
    model = model_from_weights(args.weights).to(device)
    scale, clip_len, names, palette = window_settings(args, model)
    transform = TestTransform(scale=scale, size_divisor=model.config.size_divisor)
    logger.info(
        "predicting %s with windows of %d frames, step %d, test scale %s",
        args.input,
        clip_len,
        args.step,
        scale,
    )
    count = write_predictions(
        args.input,
        args.out,
        lambda frames: predict_video(
            model, frames, clip_len=clip_len, transform=transform, device=device, step=args.step,
            amp=args.amp,
        ),
        class_names=names,
        palette=palette,
        fps=args.fps,
        alpha=args.alpha,
    )
    return _report(count, args.out)
