"""``themask make-toy-data DIR``: write the embedded synthetic dataset (VSPW layout)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-toy-data",
        help="write the small synthetic toy dataset used by the demo and the tests",
        description="Write a deterministic synthetic video dataset in the VSPW layout: 8 classes "
        "told apart by texture and shape, camera motion, moving and occluding objects, 'others' "
        "(0) and void (255) pixels. Use data.kind=toy to train on it.",
    )
    parser.add_argument("out", metavar="DIR", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--train-videos",
        type=int,
        default=200,
        help="default 200 (with a few dozen the tiny demo model memorises the videos)",
    )
    parser.add_argument("--val-videos", type=int, default=6, help="default 6")
    parser.add_argument("--frames", type=int, default=16, help="max frames per video (default 16)")
    parser.add_argument("--height", type=int, default=96, help="frame height (default 96)")
    parser.add_argument("--width", type=int, default=128, help="frame width (default 128)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from themask.data.toy import make_toy_dataset

    root = make_toy_dataset(
        args.out,
        seed=args.seed,
        num_train=args.train_videos,
        num_val=args.val_videos,
        num_frames=args.frames,
        size=(args.height, args.width),
    )
    print(
        f"toy dataset written to {root} (train.txt: {args.train_videos} videos, "
        f"val.txt: {args.val_videos} videos)"
    )
    return 0
