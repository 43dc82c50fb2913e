"""``themask check-data ROOT``: validate a dataset folder against its ``dataset.yaml``, or
draft that description (``--init-description``)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-data",
        help="validate a dataset folder against its dataset.yaml (or draft one)",
        description="Decode every frame and mask of the dataset at ROOT as its dataset.yaml "
        "describes it (a root without one is read as VSPW): split files, video folders, "
        "frames of one size per video, a mask for every frame unless the dataset is sparse, "
        "single-channel masks of their frame's size holding only class or ignored values. "
        "Prints videos, frames, frame sizes and a class table (masks and pixels per class); "
        "exits with status 1 naming every bad file. --init-description scans the masks of a "
        "folder without dataset.yaml and writes a draft to edit.",
    )
    parser.add_argument("root", metavar="ROOT", help="dataset folder")
    parser.add_argument(
        "--split",
        action="append",
        metavar="NAME",
        help="split to check (repeatable; default: every split of the description)",
    )
    parser.add_argument(
        "--unlabelled",
        action="append",
        default=[],
        metavar="NAME",
        help="split whose videos may lack masks (e.g. --unlabelled test)",
    )
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="processes (default 1)")
    parser.add_argument(
        "--init-description",
        action="store_true",
        help="write a draft ROOT/dataset.yaml from the masks found (placeholder class names)",
    )
    parser.add_argument(
        "--frames",
        metavar="PATTERN",
        help="with --init-description: frame folder pattern, e.g. 'JPEGImages/{video}' "
        "(default: the VSPW or the DAVIS layout, whichever is found)",
    )
    parser.add_argument("--masks", metavar="PATTERN", help="with --init-description: mask folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from themask.data.check import check_dataset, format_report, write_draft_description

    # a DataError becomes one line on stderr and exit status 2 (themask.cli)
    if args.init_description:
        path = write_draft_description(args.root, frames=args.frames, masks=args.masks)
        print(f"draft description written to {path}; edit the class names, then run "
              f"`themask check-data {args.root}`")  # fmt: skip
        return 0
    report = check_dataset(
        args.root, splits=args.split, unlabelled_splits=args.unlabelled, jobs=args.jobs
    )
    print(format_report(report))
    return 0 if report.ok else 1
