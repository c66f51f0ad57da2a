"""The ranks of one ``megdet pack`` and the few collectives that COCO and Open Images packing share:
every rank reaches each of them, even after its own error, so that a failure stops every rank with the
same line instead of leaving the others waiting.

    world = packing_world()                                  # mpi4py's COMM_WORLD, or one process
    on_rank0_first(world, lambda: prepare_out_dir(out, held))
    results = gathered_or_raise(world, lambda: pack_my_shards(world))
"""
from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

from hpc import launch
from hpc.errors import UserError
from hpc.files import os_error_reason
from hpc.shards import manifest as manifest_mod
from hpc.shards import writer


class OneProcess:
    """The two mpi4py collectives packing uses, for a run without ``mpirun``."""

    rank, size = 0, 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> List[Any]:
        return [obj]


def packing_world():
    """mpi4py's COMM_WORLD when ``mpirun`` (or ``srun`` with an MPI for Slurm) started several
    processes, else a one-process stand-in. Any other launch of several packers is refused: they would
    each pack the whole split into the same folder."""
    started = launch.detect()
    if (started.size or 1) == 1:
        return OneProcess()
    if not started.is_mpi:
        raise UserError(f"{started.launcher} started {started.size} packers, but megdet pack shares the work "
                        f"over MPI only: launch it with 'mpirun -np {started.size} megdet pack ...' (or srun "
                        "--mpi=pmi2), or run it as one process")
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise UserError(f"megdet pack under {started.launcher} needs mpi4py ({error}): pip install mpi4py "
                        "(scripts/setup.sh installs it), or run it as one process") from None
    world = MPI.COMM_WORLD
    if world.Get_size() != started.size:
        raise UserError(f"{started.launcher} started {started.size} packers but MPI sees a world of "
                        f"{world.Get_size()}: launch with the mpirun of the MPI that mpi4py was built for (or "
                        "srun --mpi=pmi2 with an MPI built for Slurm), or run it as one process")
    return world


def log_line(world, message: str) -> None:
    prefix = f"[rank {world.rank}/{world.size}] " if world.size > 1 else ""
    print(f"megdet pack: {prefix}{message}", flush=True)


def on_rank0_first(world, action: Callable[[], Any]) -> Any:
    """``action()`` on rank 0, its result broadcast to every rank; its error raised on every rank."""
    result: Any = None
    failure: Optional[Exception] = None
    if world.rank == 0:
        try:
            result = action()
        except Exception as error:  # the other ranks wait in bcast: they must hear of it
            failure = error
    report = world.bcast((None if failure is None else describe_failure(failure), result), root=0)
    if failure is not None:
        raise failure
    if report[0] is not None:
        raise UserError(report[0])
    return report[1]


def gathered_or_raise(world, work: Callable[[], Any]) -> List[Any]:
    """Every rank's ``work()`` result, in rank order, on every rank; if any rank's failed, every rank
    raises (its own error, or "rank r failed: ..."). Every rank reaches the allgather, even after an
    error, or the others would hang in it."""
    result, failure = None, None
    try:
        result = work()
    except Exception as error:
        failure = error
    reports = world.allgather((None if failure is None else describe_failure(failure), result))
    if failure is not None:
        raise failure
    for rank, (report, _) in enumerate(reports):
        if report is not None:
            raise UserError(f"rank {rank} failed: {report}")
    return [rank_result for _, rank_result in reports]


def prepare_out_dir(out_dir: Path, held: contextlib.ExitStack) -> None:
    """Create ``out_dir``, take its packing lock into ``held``, and remove its manifest: until every
    shard is done the set is incomplete."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(writer.pack_lock(out_dir))
        (out_dir / manifest_mod.MANIFEST_NAME).unlink(missing_ok=True)
    except OSError as error:
        raise UserError(f"Invalid --out: {out_dir} cannot be written ({os_error_reason(error, out_dir)}); choose "
                        f"a writable folder with free space") from None


def describe_failure(error: Exception) -> str:
    """One line for the other ranks: a ``UserError``'s message, or a bug's type, message and place."""
    if isinstance(error, UserError):
        return str(error)
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__}: {error} ({frame.filename}:{frame.lineno}; its traceback is on that rank)"
