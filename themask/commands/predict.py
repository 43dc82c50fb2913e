"""Segment a video or a frame folder; write label PNGs, overlays and an MP4.

Frame t is predicted from the causal window t-(T-1)*STEP, ..., t-STEP, t; each frame's features
are computed once. Writes to OUT labels/<frame>.png (train ids), overlays/<frame>.png (with a
legend) and overlay.mp4. Examples:
  themask predict --weights run/model.safetensors clip.mp4 --out pred/ --clip-len 2
  themask predict --onnx exported/ clip.mp4 --out pred/    # after `themask export`
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from themask.commands import add_command, add_inference_arguments

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "predict", run, __doc__)
    parser.add_argument("input", help="video file or folder of frames")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="a themask .safetensors file or an official .pth")
    source.add_argument("--onnx", metavar="DIR", help="a `themask export` folder (no torch)")
    parser.add_argument("--out", required=True, help="output folder")
    add_window_arguments(parser)
    parser.add_argument("--step", type=int, default=3, help="frame gap inside a window")
    parser.add_argument("--fps", type=float, help="overlay.mp4 frame rate (default: the input's)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    add_inference_arguments(parser, amp_default_help="auto")  # --onnx refuses a given --amp


def add_window_arguments(parser: argparse.ArgumentParser) -> None:
    """``--clip-len``, ``--config`` and ``--scale`` (``predict`` and ``export``)."""
    parser.add_argument("--clip-len", type=int, help="frames per window (default: the model's)")
    parser.add_argument("--config", help="run config: default scale, clip length and classes")
    text = "test resize (default: --config's, else the weights', else 853 480)"
    parser.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"), help=text)


def window_settings(args: argparse.Namespace, model: Any) -> tuple[tuple[int, int], int, list, Any]:
    """``(scale, clip_len, class_names, palette)`` of ``--weights`` and the window options; the
    classes: the weights', else the ``--config`` data's, else VSPW's, else numbers."""
    from themask.config import ConfigError, load_config
    from themask.data.description import VSPW_DESCRIPTION, default_palette
    from themask.data.vspw import TEST_SCALE
    from themask.weights import read_class_info, read_test_scale

    scale, clip_len, data = args.scale, args.clip_len, None
    if args.config:
        data = load_config(args.config).data
        scale = scale or data.scale
        clip_len = data.eval_clip_len if clip_len is None else clip_len
    if clip_len is None:
        clip_len = model.config.num_frames if model.is_temporal else 1
    if clip_len < 1:
        raise ConfigError(f"--clip-len must be >= 1, got {clip_len}")
    k, stored = model.config.num_classes, read_class_info(args.weights)
    description = VSPW_DESCRIPTION if data is None else data.description
    if stored is not None:
        names, palette = stored
        palette = default_palette(len(names)) if palette is None else palette
    elif description.num_classes == k:
        names, palette = list(description.classes), description.palette
    elif data is not None:
        dataset = f"the --config dataset ({description.source}) has {description.num_classes}"
        raise ConfigError(f"{args.weights}: the model predicts {k} classes but {dataset}")
    else:
        names, palette = [str(i) for i in range(k)], default_palette(k)
    return tuple(scale or read_test_scale(args.weights) or TEST_SCALE), clip_len, names, palette


def run(args: argparse.Namespace) -> int:
    from themask.config import ConfigError
    from themask.evaluation.visualize import write_predictions

    predict: Callable[[Any], Any]
    if args.step < 1:
        raise ConfigError(f"--step must be >= 1, got {args.step}")
    if args.onnx:  # torch is never imported
        from themask.deploy.runtime import OnnxStreamingPredictor, predict_frames

        for flag in ("config", "amp", "device"):
            if getattr(args, flag) is not None:
                why = "ONNX Runtime runs the export on CPU in fp32"
                why = "the export carries its own config" if flag == "config" else why
                raise ConfigError(f"--{flag} does not apply to --onnx: {why}")
        predictor = OnnxStreamingPredictor(args.onnx, step=args.step, threads=args.threads)
        manifest = predictor.manifest
        if args.clip_len not in (None, manifest.clip_len):
            exported = f"{predictor.directory}: exported for windows of {manifest.clip_len} frames"
            again = f"export again with --clip-len {args.clip_len}"
            raise ConfigError(f"{exported}, not --clip-len {args.clip_len} ({again})")
        names, palette, clip_len = manifest.class_names, manifest.palette, manifest.clip_len
        scale = tuple(args.scale or manifest.scale)
        predict = partial(predict_frames, predictor, scale=scale)
    else:
        import torch

        from themask.data.transforms import TestTransform
        from themask.evaluation.predict import predict_video
        from themask.precision import configure_cuda_math
        from themask.weights import model_from_weights

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        configure_cuda_math(device)
        model = model_from_weights(args.weights).to(device)
        scale, clip_len, names, palette = window_settings(args, model)
        transform = TestTransform(scale=scale, size_divisor=model.config.size_divisor)
        window = {"clip_len": clip_len, "transform": transform, "step": args.step}
        predict = partial(predict_video, model, device=device, amp=args.amp or "auto", **window)

    what = (args.input, clip_len, args.step, scale)
    logger.info("predicting %s: windows of %d frames, step %d, test scale %s", *what)
    drawing = {"class_names": names, "palette": palette, "fps": args.fps, "alpha": args.alpha}
    count = write_predictions(args.input, args.out, predict, **drawing)
    out = Path(args.out)
    print(f"{count} frames: {out / 'labels'}, {out / 'overlays'}, {out / 'overlay.mp4'}")
    return 0
