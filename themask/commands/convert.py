"""Convert official THE-Mask checkpoints or MiT ImageNet weights to a themask model.

Write DST (.safetensors with the model config inside) from SRC: an official THE-Mask
checkpoint (preset and class count inferred unless given), a themask training checkpoint, or
MiT ImageNet weights (original SegFormer, Hugging Face file or directory, mmseg 1.x), which
become the backbone of a fresh --preset model.
"""

from __future__ import annotations

import argparse

from themask.commands import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "convert", run, __doc__)
    parser.add_argument("src", metavar="SRC", help="weights file (.pth/.pt/.bin/.safetensors)")
    parser.add_argument("dst", metavar="DST", help="output .safetensors file")
    parser.add_argument("--preset", help="model preset (inferred if omitted)")
    parser.add_argument("--num-classes", type=int, help="default: inferred, or 124 for MiT")


def run(args: argparse.Namespace) -> int:
    from themask.config import ConfigError
    from themask.modeling.build import list_presets, preset_config
    from themask.weights import model_from_weights, save_model

    if not str(args.dst).endswith(".safetensors"):
        raise ConfigError(f"DST must end in .safetensors, got {args.dst}")
    model = model_from_weights(args.src, preset=args.preset, num_classes=args.num_classes)
    save_model(model, args.dst)
    config, params = model.config, sum(p.numel() for p in model.parameters()) / 1e6
    kept = {k: getattr(config, k) for k in ("num_classes", "drop_path_rate", "tad_dropout")}
    names = [name for name in list_presets() if preset_config(name, **kept) == config]
    preset = " / ".join(names) or f"custom {config.backbone}-based"  # dropout aside
    size = f"{model.num_classes} classes, {params:.2f} M parameters"
    print(f"wrote {args.dst}: preset {preset}, {size}")
    return 0
