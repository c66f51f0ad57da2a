"""``megdet train CONFIG [key=value ...] [--resume [CHECKPOINT]]``: see ``megdet.engine.train``."""
from __future__ import annotations

from megdet import config as config_mod
from megdet.commands import load_config


def add_arguments(parser) -> None:
    parser.add_argument("config", help=f"a preset ({', '.join(config_mod.PRESETS)}) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. solver.max_iter=100 data.train=DIR")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT, or (no value) from the run folder's latest one if any")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from megdet.engine import train

    return train.run(cfg, resume=args.resume)
