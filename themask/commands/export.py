"""Export weights to ONNX (encoder + decoder graphs, manifest).

Writes to OUT:
  encoder.onnx    a normalised frame (1, 3, H, W), H and W multiples of 32 -> its features
  decoder.onnx    the features of a window of T frames -> class scores (T, K, H/4, W/4)
  manifest.json   classes, palette, T, normalisation, resize and padding rule, opset, version
`themask predict --onnx OUT VIDEO --out PRED` then needs only onnxruntime, numpy and av
(pip install 'themask[onnx]'). Example:
  themask export --weights run/model.safetensors --out exported/ --clip-len 2
"""

from __future__ import annotations

import argparse
from typing import Any

from themask.commands import add_command
from themask.commands.predict import add_window_arguments, window_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "export", run, __doc__)
    parser.add_argument("--weights", required=True, help="themask .safetensors or official .pth")
    parser.add_argument("--out", required=True, help="output folder")
    add_window_arguments(parser)  # --scale: the test resize recorded in the manifest
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")


def run(args: argparse.Namespace) -> int:
    from themask.deploy.export import export_onnx
    from themask.weights import model_from_weights

    model = model_from_weights(args.weights)
    scale, clip_len, names, palette = window_settings(args, model)
    options: dict[str, Any] = {"class_names": names, "palette": palette, "scale": scale}
    manifest = export_onnx(model, args.out, clip_len=clip_len, opset=args.opset, **options)
    print(f"{args.out}: {manifest.encoder}, {manifest.decoder} (T = {clip_len}), manifest.json")
    return 0
