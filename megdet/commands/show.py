"""``megdet show RUN_DIR|CHECKPOINT [--images N] [--out PNG]``: see ``megdet.engine.show``."""
from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("path", metavar="RUN_DIR|CHECKPOINT", help="a run folder of megdet train, or a checkpoint")
    parser.add_argument("--images", type=int, default=8, help="validation images to draw (default: %(default)s)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="draw detections scoring at least this (default: %(default)s)")
    parser.add_argument("--out", help="PNG to write (default: show.png beside the checkpoint)")


def run(args) -> int:
    from megdet.engine import show

    return show.run_show(Path(args.path), args.out, args.images, args.score_threshold)
