"""The ``megdet`` command.

    megdet doctor                          # one process: what is installed
    horovodrun -np 2 --gloo megdet doctor  # every rank talks to every other, Horovod over Gloo
    mpirun -np 2 megdet doctor             # Horovod over MPI
    srun --ntasks 2 megdet doctor          # Horovod over MPI (PMI) under Slurm
    MEGDET_COMM=torch torchrun --nproc-per-node 2 $(which megdet) doctor

Each command lives in its own module with ``add_arguments(parser)`` and ``run(args) -> exit code``.
Errors in the user's input or environment (``hpc.errors.UserError``) are printed as one line on
every rank with exit status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from hpc.errors import UserError

EXIT_USER_ERROR = 2

# name: (module, one-line help)
COMMANDS = {
    "doctor": ("hpc.doctor", "check the launch: ranks, engine, Horovod build, a world and a group allreduce"),
    "bench": ("megdet.bench", "benchmarks that print ratios measured side by side"),
    "job": ("megdet.job", "write a Slurm or PBS script that trains a preset on N GPUs (checked, resumable)"),
    "synth": ("megdet.data.synth", "write a synthetic COCO data set of shapes (JPEG + instances json), from a seed"),
    "train": ("megdet.engine.train", "train a detector from a preset (under horovodrun, mpirun, srun or alone)"),
    "eval": ("megdet.engine.evaluate", "COCO box AP of a trained model on shards, or of a results file (pycocotools)"),
    "plot": ("megdet.engine.metrics", "draw a run's loss, learning rate, throughput and AP curves, or a benchmark's results, to PNG"),
    "pack": ("megdet.pack", "pack a COCO split into HDF5 shards (alone or under mpirun); export it back"),
    "weights": ("megdet.weights", "list torchvision's ImageNet ResNet weights in torch hub's cache and check their sha256"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megdet", description="Large mini-batch object detection on "
                                     "Horovod, MPI and HDF5 shards (MegDet, LargeDet).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def rank_label() -> str:
    """" (rank R/N)" when a launcher started several processes, else ""."""
    from hpc import launch

    started = launch.detect()
    return f" (rank {started.rank}/{started.size})" if (started.size or 1) > 1 else ""


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
    except UserError as error:
        print(f"megdet {args.command}: error{rank_label()}: {error}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    comm = sys.modules.get("hpc.comm")  # only a command that started one has a communicator to finish
    if comm is not None and status == 0:
        comm.finish()
    return status


if __name__ == "__main__":
    sys.exit(main())
