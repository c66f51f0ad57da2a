"""What a run is about to do, said once by rank 0 before the first step: the world, the engines, the
launcher, the devices, mixed precision, the kernels, the BN groups and Horovod's build.

    megdet train: world of 16 ranks on 2 nodes (8 per node), launcher srun under slurm
      nodes: gpu01 ranks 0-7; gpu02 ranks 8-15
      engines: gradients horovod; cross-GPU BN torch
      devices: 8x NVIDIA H200 per node (139.8 GiB, compute 9.0), one per rank
      amp: bf16 autocast; channels-last activations
      ops: torchvision 0.26.0 compiled nms/roi_align
      optimizer: PMDLAMB: multi-tensor kernel, whole list per op
      batch norm: cross-GPU BN over groups of 8 ranks (16 images), inside a node
      horovod built with: mpi, gloo, nccl
      data: 11 loader workers per rank
"""
from __future__ import annotations

import socket
from collections import Counter
from typing import Optional

import torch

from hpc import amp, launch
from hpc import comm as comm_mod
from hpc import device as device_mod
from hpc.doctor import horovod_features
from megdet import config as config_mod
from megdet.engine.build import Runtime
from megdet.model import ops


def describe_norm(cfg: config_mod.Config, world_size: int, local_size: int) -> str:
    """The batch norm of ``cfg`` in words, with the size of its groups for cross-GPU BN."""
    if cfg.model.norm == "frozen":
        return "frozen (fixed statistics and affine)"
    if cfg.model.norm == "bn":
        return "per-rank BN (statistics of each rank's own images)"
    ranks = cfg.bn_groups.group_size or world_size
    where = "inside a node" if local_size % ranks == 0 else "across nodes"
    return f"cross-GPU BN over groups of {ranks} ranks ({ranks * cfg.data.images_per_rank} images), {where}"


def _span(ranks) -> str:
    """"0-3" for consecutive ranks, else "0, 2, 4"."""
    if ranks == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 1:
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))


def describe_optimizer(optimizer: torch.optim.Optimizer, device: torch.device) -> str:
    """The optimizer and the kernel its step runs on ``device``, in words."""
    if hasattr(optimizer, "kernel"):
        kernel = optimizer.kernel(device)
    else:  # torch.optim's default: multi-tensor (foreach) ops on CUDA, a loop over tensors on CPU
        kernel = "torch.optim, " + ("foreach" if device.type == "cuda" else "per-tensor loop")
    return f"{type(optimizer).__name__}: {kernel}"


def run_banner(cfg: config_mod.Config, comm: comm_mod.Communicator, runtime: Runtime, *,
               workers: Optional[int] = None, optimizer: Optional[str] = None, command: str = "train") -> Optional[str]:
    """The banner's lines on rank 0 (None elsewhere). Collective: gathers each rank's host and device.
    ``optimizer``: ``describe_optimizer``'s words, for training."""
    views = comm.gather_object((socket.gethostname(), device_mod.describe(runtime.device)), root=0)
    if comm.rank != 0:
        return None
    per_host = Counter(host for host, _ in views)
    started = launch.detect()
    scheduler = f" under {started.scheduler}" if started.scheduler else ""
    main, cgbn = comm_mod.get(), comm_mod.get_cgbn()
    first = views[0][1]
    if runtime.device.type == "cuda":
        names = sorted({view["name"] for _, view in views})
        devices = (f"{max(per_host.values())}x {', '.join(names)} per node ({first['memory_gib']} GiB, compute "
                   f"{first['capability']}), one per rank")
    else:
        devices = f"CPU, {first['threads']} compute thread(s) per process on {first['cores']} visible cores"
    features = horovod_features()
    ranks_of = {host: [r for r, (h, _) in enumerate(views) if h == host] for host in per_host}
    lines = [f"megdet {command}: world of {comm.size} ranks on {len(per_host)} node{'s' if len(per_host) > 1 else ''} "
             f"({max(per_host.values())} per node), launcher {started.launcher}{scheduler}",
             *([f"  nodes: " + "; ".join(f"{host} ranks {_span(ranks)}" for host, ranks in ranks_of.items())]
               if len(per_host) > 1 else []),
             f"  engines: gradients {main.engine}" + ("" if cgbn is main else f"; cross-GPU BN {cgbn.engine}")
             + (f" ({main.backend})" if main.engine == "torch" else ""),
             f"  devices: {devices}",
             f"  amp: {amp.describe(runtime.amp)}" + ("; channels-last activations" if cfg.train.channels_last else ""),
             f"  ops: {ops.describe_backend(runtime.device.type)}",
             *([f"  optimizer: {optimizer}"] if optimizer else []),
             "  batch norm: " + (describe_norm(cfg, comm.size, comm.local_size) if command == "train"
                                 else "eval mode: running statistics, no communication"),
             f"  horovod built with: {', '.join(k for k, v in features.items() if v) or 'not installed'}"]
    if workers is not None:
        lines.append(f"  data: {workers} loader worker(s) per rank" + (", pinned memory" if runtime.device.type == "cuda" else ""))
    if command == "train":
        lines.append(f"  evaluation: {describe_evaluation(cfg, comm.size)}")
    return "\n".join(lines)


def describe_evaluation(cfg, ranks: int) -> str:
    """When the run evaluates, how the scores are computed and what stops it."""
    train = cfg.train
    if not cfg.data.val:
        return "none (data.val is empty)"
    when = f"every {train.eval_period} iterations and at the end" if train.eval_period else "at the end"
    how = (f"scored beside training by a background process on each of the {ranks} ranks" if train.async_eval
           else "scored in step")
    target = ""
    if train.target_ap is not None:
        names = ["box", "mask"][:len(train.target_ap)]
        target = "; stops at " + " and ".join(f"{name} {train.target_metric} >= {value}"
                                               for name, value in zip(names, train.target_ap))
    return f"{when}, {how}{target}"
