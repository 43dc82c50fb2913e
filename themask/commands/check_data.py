"""Validate a dataset folder against its dataset.yaml (or draft one).

Decode every frame and mask of ROOT as its dataset.yaml (else the VSPW layout) describes them;
print a summary and class table; exit with status 1 naming every bad file. --init-description
drafts ROOT/dataset.yaml from the masks (VSPW or DAVIS layout, or --frames / --masks patterns).
"""

from __future__ import annotations

import argparse

from themask.commands import add_command


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "check-data", run, __doc__)
    parser.add_argument("root", metavar="ROOT", help="dataset folder")
    text = "split to check (repeatable; default: all)"
    parser.add_argument("--split", action="append", metavar="NAME", help=text)
    text = "a split that may lack masks"
    parser.add_argument("--unlabelled", action="append", default=[], metavar="NAME", help=text)
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="processes (default 1)")
    parser.add_argument("--init-description", action="store_true", help="draft ROOT/dataset.yaml")
    parser.add_argument("--frames", metavar="PATTERN", help="e.g. 'JPEGImages/{video}'")
    parser.add_argument("--masks", metavar="PATTERN", help="e.g. 'Annotations/{video}'")


def run(args: argparse.Namespace) -> int:
    from themask.data.check import check_dataset, format_report, write_draft_description

    if args.init_description:
        path = write_draft_description(args.root, frames=args.frames, masks=args.masks)
        print(f"draft written to {path}; edit the class names, then run themask check-data")
        return 0
    report = check_dataset(
        args.root, splits=args.split, unlabelled_splits=args.unlabelled, jobs=args.jobs
    )
    print(format_report(report))
    return 0 if report.ok else 1
