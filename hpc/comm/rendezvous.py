"""Where the torch engine's ranks meet: the address of rank 0 under each launcher."""
from __future__ import annotations

import os
import socket
import subprocess
from typing import Tuple

from hpc import launch as launch_mod
from hpc.comm.base import CommError


def torch_rendezvous(launch: launch_mod.Launch) -> Tuple[int, int, str]:
    """(rank, size, init_method) for torch.distributed under the launcher that started us."""
    env = os.environ
    if "MASTER_ADDR" in env and launch.size is not None and launch.rank is not None:
        return launch.rank, launch.size, "env://"
    if launch.launcher == "mpirun":
        try:
            from mpi4py import MPI
        except ImportError as error:
            raise CommError(f"the torch engine under mpirun needs mpi4py ({error}): pip install mpi4py") from None
        world = MPI.COMM_WORLD
        address = free_address() if world.Get_rank() == 0 else None
        return world.Get_rank(), world.Get_size(), world.bcast(address, root=0)
    if launch.launcher == "srun":
        nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return launch.rank, launch.size, f"tcp://{nodes[0]}:{port}"
    if launch.launcher == "none":
        raise CommError("the torch engine needs a launcher: use torchrun, mpirun or srun "
                        "(or MEGDET_COMM=local for one process)")
    raise CommError(f"the torch engine cannot rendezvous under {launch.launcher}: use torchrun, mpirun, "
                    "srun or horovodrun, or MEGDET_COMM=horovod")


def free_address() -> str:
    """A ``tcp://host:port`` init_method on this host, at a port free now."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return f"tcp://{socket.getfqdn()}:{probe.getsockname()[1]}"
