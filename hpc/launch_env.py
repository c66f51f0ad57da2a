"""Which launcher started this process, read from the variables each launcher sets: the one module
below both ``hpc.errors`` (whose lines name the rank) and ``hpc.launch`` (which checks the launch).

    started = detect()       # Launch(launcher="horovodrun", size=2, rank=1, local_rank=1, ...)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional


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


def env_int(env: Mapping[str, str], name: str) -> Optional[int]:
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
        if env_int(env, size) is not None:
            return Launch(launcher, env_int(env, size), env_int(env, rank), env_int(env, local_rank),
                          env_int(env, local_size), scheduler)
    return Launch("none", None, None, None, None, scheduler)
