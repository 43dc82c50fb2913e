"""Write the small synthetic toy dataset used by the demo and the tests.

Deterministic videos in the VSPW layout (8 textured classes, moving and occluding objects,
'others' and void pixels) and their dataset.yaml; train on it with data.root=DIR.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from themask.commands import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "make-toy-data", run, __doc__)
    parser.add_argument("out", metavar="DIR", help="output folder (new or empty)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--train-videos", type=int, default=200, help="default 200")
    parser.add_argument("--val-videos", type=int, default=6, help="default 6")
    parser.add_argument("--frames", type=int, default=16, help="max frames a training video")
    parser.add_argument("--val-frames", type=int, default=24, help="max frames a val video")
    parser.add_argument("--height", type=int, default=96, help="frame height (default 96)")
    parser.add_argument("--width", type=int, default=128, help="frame width (default 128)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty DIR")


def run(args: argparse.Namespace) -> int:
    from themask.data.toy import make_toy_dataset

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        what = "is not empty" if out.is_dir() else "is not a folder"
        raise FileExistsError(f"{out} {what}; choose a new folder or pass --force")
    videos = {"seed": args.seed, "num_train": args.train_videos, "num_val": args.val_videos}
    frames = {"num_frames": args.frames, "val_frames": args.val_frames}
    root = make_toy_dataset(out, size=(args.height, args.width), **videos, **frames)
    print(f"toy dataset written to {root} ({args.train_videos} + {args.val_videos} videos)")
    return 0
