"""Does the engine agree with the launcher that started this process (``hpc.launch_env.detect``), and
how many CPUs, threads and loader workers each rank gets.

Every launcher writes the world size it started into each process's environment. A Horovod built
without MPI that is started by ``mpirun`` or ``srun`` runs every process as a world of size 1,
silently: each rank trains alone on the full learning rate. ``check_world_size`` turns that into
an error that names the fix.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from hpc.errors import UserError
from hpc.launch_env import Launch, detect, env_int

# The launch's API: detect() and Launch live below hpc.errors (hpc.launch_env); callers take them here.
__all__ = ["Launch", "LaunchError", "detect", "check_world_size", "cpus_per_rank", "threads_per_rank",
           "loader_workers"]


class LaunchError(UserError):
    """The launcher and the communication engine disagree; the message names the fix."""


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
    given = env_int(env, "SLURM_CPUS_PER_TASK")
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
