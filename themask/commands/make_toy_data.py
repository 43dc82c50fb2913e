"""``themask make-toy-data DIR``: write the embedded synthetic dataset and its description."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-toy-data",
        help="write the small synthetic toy dataset used by the demo and the tests",
        description="Write a deterministic synthetic video dataset (VSPW layout) and its "
        "dataset.yaml: 8 classes told apart by texture and shape, camera motion, moving and "
        "occluding objects, 'others' (0) and void (255) pixels. Train on it with "
        "data.root=DIR. Refuses a non-empty DIR unless --force.",
    )
    parser.add_argument("out", metavar="DIR", help="output folder (new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--train-videos",
        type=int,
        default=200,
        help="default 200 (with a few dozen the tiny demo model memorises the videos)",
    )
    parser.add_argument("--val-videos", type=int, default=6, help="default 6")
    parser.add_argument(
        "--frames", type=int, default=16, help="max frames per training video (default 16)"
    )
    parser.add_argument(
        "--val-frames", type=int, default=24, help="max frames per validation video (default 24)"
    )
    parser.add_argument("--height", type=int, default=96, help="frame height (default 96)")
    parser.add_argument("--width", type=int, default=128, help="frame width (default 128)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty DIR (same-named files replaced)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from themask.data.toy import make_toy_dataset

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        what = "is not empty" if out.is_dir() else "is not a folder"
        raise FileExistsError(f"{out} {what}; choose a new folder or pass --force")
    root = make_toy_dataset(
        out,
        seed=args.seed,
        num_train=args.train_videos,
        num_val=args.val_videos,
        num_frames=args.frames,
        val_frames=args.val_frames,
        size=(args.height, args.width),
    )
    print(
        f"toy dataset written to {root} (dataset.yaml, train.txt: {args.train_videos} videos, "
        f"val.txt: {args.val_videos} videos)"
    )
    return 0
