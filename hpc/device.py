"""Which device each rank computes on: one GPU per rank, taken before any CUDA or NCCL work.

    device = hpc.device.select("auto")          # cuda:<local_rank> on a GPU node, else cpu
    comm = hpc.comm.init(device=device)          # torch engine: NCCL on that GPU, gloo on the CPU

Kinds: ``cuda`` (refused without a visible GPU), ``cpu``, or ``auto`` (cuda when torch sees a GPU).
A rank takes GPU ``local_rank`` of those it sees (``CUDA_VISIBLE_DEVICES``); a node must see at least
as many GPUs as it runs ranks, unless Slurm binds one GPU to each task (``srun --gpus-per-task=1``
exports ``SLURM_GPUS_PER_TASK=1`` and gives each task a ``CUDA_VISIBLE_DEVICES`` of its own GPU), in
which case every rank takes the one GPU it sees. ``select`` calls ``torch.cuda.set_device``, so that
NCCL, the caching allocator and every ``torch.cuda`` call without a device use this rank's GPU and
no rank opens a context on another's.
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

import torch

from hpc import launch as launch_mod
from hpc.errors import UserError
from hpc.options import DEVICE_KINDS


class DeviceError(UserError):
    """The requested device does not exist on this rank; the message names the fix."""


def gpu_index(local_rank: int, local_size: int, visible: int, env: Optional[Mapping[str, str]] = None) -> int:
    """The index, among the ``visible`` GPUs this process sees, of the GPU of local rank ``local_rank``
    of ``local_size`` on its node. Raises DeviceError when the node has fewer GPUs than ranks."""
    env = os.environ if env is None else env
    if visible >= local_size:
        return local_rank
    if visible == 1 and env.get("SLURM_GPUS_PER_TASK") == "1":
        return 0
    raise DeviceError(f"{local_size} ranks on this node but it has {visible} GPU(s) "
                      f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}): launch at most "
                      f"{visible} ranks per node (one per GPU), or bind one GPU per task with "
                      "srun --gpus-per-task=1")


def select(kind: str = "auto", launch: Optional[launch_mod.Launch] = None) -> torch.device:
    """This rank's device for ``kind`` (one of DEVICE_KINDS), made current for CUDA. Call it before
    any CUDA work and before starting a communicator. ``launch``: default ``hpc.launch.detect()``."""
    if kind not in DEVICE_KINDS:
        raise DeviceError(f"train.device={kind!r} is not one of {', '.join(DEVICE_KINDS)}: choose one of them")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "cpu" or (kind == "auto" and visible == 0):
        return torch.device("cpu")
    if visible == 0:
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU build)"
        raise DeviceError(f"train.device=cuda but this process sees no GPU (torch {torch.__version__} has "
                          f"{built}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                          "run on a GPU node, or set train.device=cpu (or auto)")
    launch = launch or launch_mod.detect()
    index = gpu_index(launch.local_rank or 0, launch.local_size or 1, visible)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def describe(device: torch.device) -> Dict[str, str]:
    """What ``device`` is, for banners: {"device": "cuda:0", "name": "NVIDIA H200", "memory_gib": "139.8",
    "capability": "9.0"} (for the CPU: name "cpu", the cores this process may run on and the compute threads
    torch runs on them)."""
    if device.type != "cuda":
        return {"device": "cpu", "name": "cpu", "cores": str(len(os.sched_getaffinity(0))),
                "threads": str(torch.get_num_threads())}
    properties = torch.cuda.get_device_properties(device)
    return {"device": str(device), "name": properties.name, "memory_gib": f"{properties.total_memory / 2**30:.1f}",
            "capability": f"{properties.major}.{properties.minor}"}
