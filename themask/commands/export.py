"""``themask export``: saved weights → ONNX graphs + manifest for ``themask predict --onnx``."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Export a model for ONNX Runtime. Writes to OUT:
  encoder.onnx    one normalised frame (1, 3, H, W), H and W any multiples of 32 -> its
                  features (mask features at stride 4, multi-scale maps at strides 32, 16, 8)
  decoder.onnx    the features of a window of T frames -> class scores (T, K, H/4, W/4)
  manifest.json   classes, palette, T, normalisation, resize and padding rule, opset, version

Then `themask predict --onnx OUT VIDEO --out PRED` segments videos with onnxruntime, numpy and
av only (pip install 'themask[onnx]'), reusing each frame's features across windows.

Example:
  themask export --weights run/model.safetensors --out exported/ --clip-len 2
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export weights to ONNX (encoder + decoder graphs, manifest)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--weights", required=True, help="themask .safetensors or official .pth")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--clip-len",
        type=int,
        default=None,
        help="frames per window T (default: the model's training clip length; 1 for "
        "single-frame models)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
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
        help="test resize recorded in the manifest: fit LONG x SHORT keeping the aspect ratio "
        "(default: data.scale of --config, else the scale stored with the weights, else 853 480)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from themask.commands.predict import DEFAULT_SCALE, _class_info
    from themask.deploy.export import export_onnx
    from themask.weights import model_from_weights, read_test_scale

    model = model_from_weights(args.weights)  # bad weights: one line, exit 2 (themask.cli)
    scale, clip_len, data = args.scale, args.clip_len, None
    if args.config:
        from themask.config import load_config

        data = load_config(args.config).data
        scale = scale or data.scale
        clip_len = data.eval_clip_len if clip_len is None else clip_len
    names, palette = _class_info(args.weights, data, model.num_classes)
    if clip_len is None:
        clip_len = model.config.num_frames if model.is_temporal else 1
    manifest = export_onnx(
        model,
        args.out,
        clip_len=clip_len,
        class_names=names,
        palette=palette,
        opset=args.opset,
        scale=tuple(scale or read_test_scale(args.weights) or DEFAULT_SCALE),
    )
    print(f"{args.out}: {manifest.encoder}, {manifest.decoder} (T = {clip_len}), manifest.json")
    return 0
