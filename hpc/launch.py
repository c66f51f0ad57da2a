"""Which launcher started this process, and does the engine agree with it.

Every launcher writes the world size it started into each process's environment. A Horovod built
without MPI that is started by ``mpirun`` or ``srun`` runs every process as a world of size 1,
silently: each rank trains alone on the full learning rate. ``check_world_size`` turns that into
an error that names the fix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from hpc.errors import UserError


class LaunchError(UserError):
    """The launcher and the communication engine disagree; the message names the fix."""


@dataclass(frozen=True)
class Launch:
    """What the environment says about how we were started.

    launcher: "horovodrun", "mpirun" (Open MPI or MPICH/Hydra), "srun", "torchrun" or "none".
    size, rank, local_rank, local_size: as the launcher set them (None when it did not).
    scheduler: "slurm", "pbs" or None (the batch system around the launcher, if any).
    """

    launcher: str
    size: Optional[int]
    rank: Optional[int]
    local_rank: Optional[int]
    local_size: Optional[int]
    scheduler: Optional[str]

    @property
    def is_mpi(self) -> bool:
        """Started by an MPI launcher (mpirun, or srun with Slurm's MPI plugin)."""
        return self.launcher in ("mpirun", "srun")


def _int(env: Mapping[str, str], name: str) -> Optional[int]:
    """The integer in ``env[name]``; None when absent or not a plain integer (e.g. ``"2(x4)"``)."""
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


# (launcher, size, rank, local rank, local size) variables, most specific first. horovodrun sets
# HOROVOD_* on top of any MPI variables; MPICH's mpirun inside a Slurm job starts its proxies with
# srun, so the PMI variables must win over SLURM_STEP_NUM_TASKS (which then counts nodes).
_LAUNCHERS = (
    ("horovodrun", "HOROVOD_SIZE", "HOROVOD_RANK", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
    ("mpirun", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpirun", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("torchrun", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("srun", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
)


def detect(env: Optional[Mapping[str, str]] = None) -> Launch:
    """Read the launcher's own variables from ``env`` (default: ``os.environ``)."""
    env = os.environ if env is None else env
    scheduler = "slurm" if "SLURM_JOB_ID" in env else "pbs" if "PBS_JOBID" in env else None
    for launcher, size, rank, local_rank, local_size in _LAUNCHERS:
        if _int(env, size) is not None:
            return Launch(launcher, _int(env, size), _int(env, rank), _int(env, local_rank),
                          _int(env, local_size), scheduler)
    return Launch("none", None, None, None, None, scheduler)


def check_world_size(launch: Launch, engine: str, engine_size: int, mpi_built: Optional[bool] = None) -> None:
    """Raise ``LaunchError`` when ``engine`` sees a different world than ``launch`` started.

    ``mpi_built`` (Horovod engine only) sharpens the message for the classic failure: a Gloo-only
    Horovod under ``mpirun``/``srun``.
    """
    if launch.size is None or launch.size == engine_size:
        return
    started = f"{launch.launcher} started {launch.size} processes but the {engine} engine sees a world of {engine_size}"
    if engine == "local":
        fix = "set MEGDET_COMM=horovod (or torch) so the ranks talk to each other"
    elif engine == "horovod" and mpi_built is False and launch.is_mpi:
        fix = ("this Horovod was built without MPI: rebuild it with HOROVOD_WITH_MPI=1 "
               "(MEGDET_FORCE_SETUP=1 bash scripts/setup.sh) or launch with 'horovodrun --gloo'")
    elif engine == "horovod":
        fix = ("Horovod and the launcher use different MPI libraries: build Horovod against the mpirun "
               "on PATH (bash scripts/setup.sh), or launch with 'horovodrun --gloo'")
    else:
        fix = "check WORLD_SIZE/RANK/MASTER_ADDR, or launch with torchrun"
    raise LaunchError(f"{started}: {fix}")


def cpus_per_rank(local_size: int, env: Optional[Mapping[str, str]] = None) -> int:
    """CPU cores this rank may use: ``SLURM_CPUS_PER_TASK`` under Slurm (``--cpus-per-task``, which the
    job scripts set), else the cores this process may run on shared out between the ``local_size``
    ranks of its host."""
    env = os.environ if env is None else env
    given = _int(env, "SLURM_CPUS_PER_TASK")
    if given is not None and given > 0:
        return given
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_size))


def threads_per_rank(local_size: int, env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """Compute threads for each of ``local_size`` ranks on this host: ``cpus_per_rank``, or None when
    ``OMP_NUM_THREADS`` is set (the user decided). Without this every rank starts one thread per core,
    and N ranks on N cores run N^2 spinning threads, several times slower."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    return cpus_per_rank(local_size, env)


def loader_workers(local_size: int, env: Optional[Mapping[str, str]] = None) -> int:
    """Data-loading worker processes per rank when the config leaves it to the launcher: one per CPU
    of ``cpus_per_rank``, less the one the training process drives the device from."""
    return cpus_per_rank(local_size, env) - 1
