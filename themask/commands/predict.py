"""``themask predict``: segment a video file or a folder of frames with saved weights."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from themask.commands import add_threads_argument
from themask.precision import AMP_MODES, configure_cuda_math

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

FOLDER_FPS = 15.0  # overlay.mp4 of a frame folder (VSPW's frame rate)
DEFAULT_SCALE = (853, 480)

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
    parser.add_argument(
        "--clip-len",
        type=int,
        default=None,
        help="frames per window (default: the model's training clip length; 1 for "
        "single-frame models)",
    )
    parser.add_argument("--step", type=int, default=3, help="frame gap inside a window")
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
    parser.add_argument(
        "--fps",
        type=float,
        default=None,
        help=f"frame rate of overlay.mp4 (default: the input video's; {FOLDER_FPS:g} for a "
        "folder of frames)",
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
    if args.onnx:
        from themask.deploy.runtime import predict_to_folder

        return predict_to_folder(args)
    import torch

    from themask.data.transforms import TestTransform
    from themask.data.video_io import iter_input_frames
    from themask.evaluation.inference import predict_video
    from themask.weights import model_from_weights, read_test_scale

    scale, clip_len, data = args.scale, args.clip_len, None
    if args.config:
        from themask.config import load_config

        data = load_config(args.config).data
        scale, clip_len = scale or data.scale, clip_len or data.eval_clip_len
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configure_cuda_math(device)
    model = model_from_weights(args.weights).to(device)
    scale = tuple(scale or read_test_scale(args.weights) or DEFAULT_SCALE)
    names, palette = _class_info(args.weights, data, model.config.num_classes)
    clip_len = clip_len or (model.config.num_frames if model.is_temporal else 1)
    frame_names = []

    def frames():
        for name, frame in iter_input_frames(args.input):
            frame_names.append(name)
            yield frame

    predictions = predict_video(
        model,
        frames(),
        clip_len=clip_len,
        transform=TestTransform(scale=scale, size_divisor=model.config.size_divisor),
        device=device,
        step=args.step,
        amp=args.amp,
    )
    logger.info(
        "predicting %s with windows of %d frames, step %d, test scale %s",
        args.input,
        clip_len,
        args.step,
        scale,
    )
    labelled = ((frame_names[p.index], p.frame, p.labels) for p in predictions)
    return write_predictions(args, labelled, names, palette)


def write_predictions(
    args: argparse.Namespace,
    predictions: Iterable[tuple[str, np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    palette: np.ndarray,
) -> int:
    """Write ``(name, frame (H, W, 3), labels (H, W))`` items into ``args.out``: label PNGs,
    overlay PNGs with the legend beside the frame, and overlay.mp4 at the input's frame rate
    (``--fps``, else the video's, else 15 for a frame folder). Shared with ``--onnx``."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from themask.data.video_io import video_frame_rate
    from themask.evaluation.visualize import (
        OverlayVideoWriter,
        overlay,
        save_label_png,
        with_legend,
    )

    fps = args.fps
    if fps is None and Path(args.input).is_file():
        fps = video_frame_rate(args.input)
    out = Path(args.out)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    count = 0
    with OverlayVideoWriter(out / "overlay.mp4", fps=fps or FOLDER_FPS) as writer:
        for name, frame, labels in tqdm(predictions, desc="predict", unit="frame"):
            save_label_png(labels, out / "labels" / f"{name}.png", palette)
            picture = overlay(frame, labels, palette, alpha=args.alpha)
            picture = with_legend(picture, np.unique(labels), class_names, palette)
            Image.fromarray(picture).save(out / "overlays" / f"{name}.png")
            writer.write(picture)
            count += 1
    print(f"{count} frames: {out / 'labels'}, {out / 'overlays'}, {out / 'overlay.mp4'}")
    return 0
