"""``themask check-data ROOT [--split NAME]``: validate a VSPW-format folder before training."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-data",
        help="validate a VSPW-format dataset folder and summarise it",
        description="Decode every frame and mask of a VSPW-format folder (split files, "
        "data/<video>/origin/*.jpg, data/<video>/mask/*.png); check that every mask exists, is "
        "single-channel, has its frame's size and holds only values 0..K and 255. Prints videos, "
        "frames, frame sizes and the class histogram; exits with status 1 naming every bad file.",
    )
    parser.add_argument(
        "root", metavar="ROOT", help="dataset folder (holds train.txt, val.txt, data/)"
    )
    parser.add_argument(
        "--split",
        action="append",
        metavar="NAME",
        help="split to check (repeatable; default: every one of train/val/test present)",
    )
    parser.add_argument(
        "--kind",
        choices=("vspw", "toy"),
        default="vspw",
        help="class table: vspw (124 classes) or toy (8 classes); default vspw",
    )
    parser.add_argument(
        "--unlabelled",
        action="append",
        default=[],
        metavar="NAME",
        help="split whose videos may lack masks (e.g. --unlabelled test)",
    )
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="processes (default 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from themask.data.check import check_dataset, format_report
    from themask.data.config import dataset_classes

    names, _ = dataset_classes(args.kind)
    report = check_dataset(
        args.root,
        splits=args.split,
        num_classes=len(names),
        unlabelled_splits=args.unlabelled,
        jobs=args.jobs,
    )
    print(format_report(report, names))
    return 0 if report.ok else 1
