"""``themask convert SRC DST [--preset NAME]``: any supported weights → our safetensors format."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert official THE-Mask checkpoints or MiT ImageNet weights to a themask model",
        description="Write DST (.safetensors, with the model config inside, loadable by "
        "themask.load_model) from SRC: a checkpoint of the official THE-Mask code (mmseg "
        "layout; preset and class count inferred from the shapes unless given), a themask "
        "training checkpoint, or MiT ImageNet weights in the original SegFormer, Hugging Face "
        "(file or nvidia/mit-b* directory) or mmseg 1.x layout, which become the backbone of "
        "a fresh model of --preset (required then).",
    )
    parser.add_argument(
        "src", metavar="SRC", help="weights file (.pth/.pt/.bin/.safetensors) or HF dir"
    )
    parser.add_argument("dst", metavar="DST", help="output .safetensors file")
    parser.add_argument(
        "--preset", help="model preset (see themask.list_presets()); inferred if omitted"
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        help="number of classes K (default: inferred, or 124 for MiT weights)",
    )
    parser.set_defaults(func=run)


def preset_of(config) -> str:
    """The presets whose network ``config`` (a ``ModelConfig``) is, dropout rates aside (e.g.
    ``mask2former_tiny / themask_tiny_t1``: they share one), else ``"custom <backbone>-based"``."""
    import dataclasses

    from themask.modeling.build import list_presets, preset_config

    names = []
    for name in list_presets():
        preset = preset_config(name, num_classes=config.num_classes)
        ignored = {k: getattr(preset, k) for k in ("drop_path_rate", "tad_dropout")}
        if dataclasses.replace(config, **ignored) == preset:
            names.append(name)
    return " / ".join(names) or f"custom {config.backbone}-based"


def run(args: argparse.Namespace) -> int:
    from themask.config import ConfigError
    from themask.weights import model_from_weights, save_model

    if not str(args.dst).endswith(".safetensors"):
        raise ConfigError(f"DST must end in .safetensors, got {args.dst}")
    model = model_from_weights(args.src, preset=args.preset, num_classes=args.num_classes)
    save_model(model, args.dst)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"wrote {args.dst}: preset {preset_of(model.config)}, {model.num_classes} classes, "
        f"{params:.2f} M parameters"
    )
    return 0
