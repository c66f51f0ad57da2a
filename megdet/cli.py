"""The ``megdet`` command.

    megdet doctor                          # one process: what is installed
    horovodrun -np 2 --gloo megdet doctor  # every rank talks to every other, Horovod over Gloo
    mpirun -np 2 megdet doctor             # Horovod over MPI
    srun --ntasks 2 megdet doctor          # Horovod over MPI (PMI) under Slurm
    MEGDET_COMM=torch torchrun --nproc-per-node 2 $(which megdet) doctor

Each command lives in its own module with ``add_arguments(parser)`` and ``run(args) -> exit code``.
The parser is built from the names and help strings below; only the chosen command's module is
imported (and, for ``bench``, only the chosen benchmark's), so ``megdet --help``, ``megdet job`` and a
config error answer without importing torch. Errors in the user's input or environment
(``hpc.errors.UserError``) are printed as one line on every rank with exit status 2, and so is a
collective that failed for want of a rank that died, stopped or exited (``hpc.comm.failure_reason``);
anything else is a bug: its traceback, then one line naming the rank that hit it, exit status 1, and the
other ranks ended in seconds (``hpc.comm.stop_others``), as they are after a ``UserError`` that one rank
met alone. A command that succeeded on every rank ends with a barrier (``hpc.comm.finish``) when it
started a communicator.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from hpc import errors, launch_env
from hpc.errors import EXIT_BUG, EXIT_USER_ERROR, UserError

# name: (module, one-line help)
COMMANDS: Dict[str, Tuple[str, str]] = {
    "doctor": ("hpc.doctor", "check the launch: ranks, devices, engine, Horovod build, a world and a group allreduce"),
    "bench": ("megdet.bench", "benchmarks that print ratios measured side by side"),
    "job": ("megdet.job", "write a Slurm or PBS script that trains a preset on N GPUs (checked, resumable)"),
    "synth": ("megdet.data.synth", "write a synthetic COCO data set of shapes (JPEG + instances json), from a seed"),
    "train": ("megdet.commands.train", "train a detector from a preset (under horovodrun, mpirun, srun or alone)"),
    "eval": ("megdet.commands.eval", "COCO box or mask AP of a trained model on shards, or of a results file (pycocotools); "
             "the Open Images challenge mAP@0.5 of a results CSV (--metric open-images)"),
    "plot": ("megdet.commands.plot", "draw a run's loss, learning rate, throughput and AP curves, or a benchmark's results, to PNG"),
    "pack": ("megdet.pack", "pack a COCO split, or Open Images' CSV files in one streaming pass, into HDF5 shards (alone or under mpirun); export it back"),
    "show": ("megdet.commands.show", "draw validation images with their ground truth and a trained model's detections (boxes, classes, scores, masks) into one PNG"),
    "weights": ("megdet.weights", "list and verify the ImageNet backbone weights in torch hub's cache"),
}


def add_commands(parser: argparse.ArgumentParser, registry: Dict[str, Tuple[str, str]], argv: Sequence[str], *,
                 dest: str, metavar: str, common: Optional[Callable] = None) -> None:
    """Subcommands of ``parser`` named in ``registry`` ({name: (module, help)}). Only the first of
    ``argv`` that names one is imported and given its arguments (``common(parser, name)`` first, when
    given); a module that lists ``SUBCOMMANDS`` of its own (``megdet bench``) has them added the same
    way, with its ``add_common_arguments``."""
    argv = list(argv)
    chosen = next((arg for arg in argv if arg in registry), None)
    subparsers = parser.add_subparsers(dest=dest, required=True, metavar=metavar)
    for name, (module_name, help_text) in registry.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        if common is not None:
            common(sub, name)
        module = importlib.import_module(module_name)
        if hasattr(module, "SUBCOMMANDS"):
            add_commands(sub, module.SUBCOMMANDS, argv[argv.index(name) + 1:], dest=f"{name}_name",
                         metavar=module.SUBCOMMAND_METAVAR, common=module.add_common_arguments)
        else:
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megdet", description="Large mini-batch object detection on "
                                     "Horovod, MPI and HDF5 shards (MegDet, LargeDet).")
    add_commands(parser, COMMANDS, argv, dest="command", metavar="COMMAND")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    errors.program = f"megdet {args.command}"
    try:
        status = args.run(args)
    except UserError as error:
        errors.report(str(error))
        comm = sys.modules.get("hpc.comm")  # only a command that started one has a communicator
        if comm is not None and isinstance(error, comm.AgreedError):
            try:
                comm.finish()  # every rank prints it before any exits: a launcher stops the rest at the first exit
            except Exception:  # a rank gone meanwhile (the watchdog names it): this rank's line is out already
                pass
        elif comm is not None:
            comm.stop_others(error)  # this rank's alone: the others would wait for it in their next collective
            if (launch_env.detect().size or 1) > 1:
                # An exit in order would also wait in MPI_Finalize's barrier for ranks that wait for this one:
                # leaving at once is a failure the launcher sees, and it stops the job.
                errors.flush_streams()
                os._exit(EXIT_USER_ERROR)
        return EXIT_USER_ERROR
    except Exception as error:
        comm = sys.modules.get("hpc.comm")
        reason = comm.failure_reason(error) if comm is not None else None
        if reason is not None:
            errors.report(reason)
            return EXIT_USER_ERROR
        errors.report_bug(error)
        if comm is not None:
            comm.stop_others(error)
        return EXIT_BUG
    comm = sys.modules.get("hpc.comm")
    if comm is not None and status == 0:
        comm.finish()
    return status


if __name__ == "__main__":
    sys.exit(main())
