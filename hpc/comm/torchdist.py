"""The torch.distributed engine: NCCL on a GPU, gloo on the CPU."""
from __future__ import annotations

import datetime
import os
from typing import Any, List, NamedTuple, Optional

import torch

from hpc import launch as launch_mod
from hpc.comm.base import CommError, Communicator, Group, Handle
from hpc.comm import rendezvous


BACKENDS = ("nccl", "gloo")


class _Handles(NamedTuple):
    """A group's torch process groups: ``device`` on the backend, and ``host`` over gloo for CPU tensors
    (the same group when the backend is gloo; None on a rank that is not a member)."""

    device: Any
    host: Any


class TorchCommunicator(Communicator):
    """torch.distributed: NCCL on a GPU, gloo on the CPU (``MEGDET_TORCH_BACKEND=gloo`` forces gloo on
    a GPU too, e.g. for several ranks sharing one GPU, which NCCL refuses).

    Under NCCL every group has a gloo twin over the same ranks, created with it, and CPU tensors (a
    pickled object, a host-side flag, the lengths of a gather) travel over the twin: they never touch
    the GPU, so a collective on them does not wait for the GPU's queue. NCCL starts eagerly on this
    rank's GPU (``device_id``), and the groups' NCCL communicators are split from the world's."""

    engine = "torch"

    def __init__(self, launch: launch_mod.Launch, timeout_s: float, device: torch.device = torch.device("cpu"),
                 via: Optional[Communicator] = None,
                 rendezvous_timeout_s: float = rendezvous.DEFAULT_RENDEZVOUS_TIMEOUT_S):
        """device: this rank's device (``hpc.device.select``, already current). via: an engine already
        running on the same ranks, which hands out rank 0's address (the rendezvous under horovodrun);
        None: the launcher's variables. rendezvous_timeout_s: how long the ranks wait for each other
        before the process group starts (``rendezvous.meet``); ``peers`` then holds every rank's host,
        address and interface."""
        import torch.distributed as dist

        self.dist = dist
        self.backend = os.environ.get("MEGDET_TORCH_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
        if self.backend not in BACKENDS or (self.backend == "nccl" and device.type != "cuda"):
            raise CommError(f"MEGDET_TORCH_BACKEND={self.backend!r} cannot run on {device}: use "
                            f"{'nccl or gloo' if device.type == 'cuda' else 'gloo'}, or unset it")
        rank, size, address = rendezvous.torch_rendezvous(launch) if via is None else \
            (via.rank, via.size, via.broadcast_object(rendezvous.free_address() if via.rank == 0 else None))
        self._timeout = datetime.timedelta(seconds=timeout_s)
        # device_id (an indexed torch.device) only under NCCL, where it makes the communicator start
        # now and new groups split from it; gloo takes no device
        eager = {"device_id": torch.device("cuda", torch.cuda.current_device() if device.index is None
                                           else device.index)} if self.backend == "nccl" else {}
        store, self.peers = rendezvous.meet(address, rank, size, rendezvous_timeout_s)
        dist.init_process_group(self.backend, store=store, rank=rank, world_size=size, timeout=self._timeout, **eager)
        world = dist.group.WORLD
        world = _Handles(world, dist.new_group(backend="gloo", timeout=self._timeout) if self.backend == "nccl"
                         else world)
        local = [r for r, peer in enumerate(self.peers) if peer["host"] == self.peers[rank]["host"]]
        super().__init__(rank, size, local.index(rank), len(local), world, device)
        self._ops = {"sum": dist.ReduceOp.SUM, "average": dist.ReduceOp.SUM}

    @staticmethod
    def _group_for(tensor: torch.Tensor, group: Group):
        """The process group that moves ``tensor``: the host twin for a CPU tensor (gloo moves CUDA
        tensors too, so under gloo both are one group)."""
        return group.handle.host if tensor.device.type == "cpu" else group.handle.device

    def host_waits(self, tensor: torch.Tensor) -> bool:
        return not (self.backend == "nccl" and tensor.is_cuda)

    def _new_group(self, ranks):
        device = self.dist.new_group(list(ranks), timeout=self._timeout)
        if self.backend != "nccl":
            return _Handles(device, device)
        # Members only: with a device bound to the world, a rank outside a new group of any backend
        # joins an NCCL split of the world, which the gloo group's members never make (it would hang;
        # pytorch/pytorch#145376).
        host = self.dist.new_group(list(ranks), backend="gloo", timeout=self._timeout, use_local_synchronization=True)
        return _Handles(device, host)

    def _allreduce_async(self, tensor, op, group, name):
        work = self.dist.all_reduce(tensor, op=self._ops[op], group=self._group_for(tensor, group), async_op=True)

        def wait():
            work.wait()
            if op == "average":
                tensor.div_(group.size)
        return Handle(wait, tensor)

    def _allgather(self, tensor, group):
        # gloo gathers equal shapes only: pad dim 0 to the longest, gather, then trim each piece.
        lengths = self._lengths(tensor.shape[0], group)
        padded = self._padded(tensor, max(lengths))
        pieces = [torch.empty_like(padded) for _ in range(group.size)]
        self.dist.all_gather(pieces, padded, group=self._group_for(padded, group))
        return torch.cat([piece[:n] for piece, n in zip(pieces, lengths)])

    def _lengths(self, length: int, group: Group) -> List[int]:
        """Every member's ``length``, over the host group."""
        mine = torch.tensor([length], dtype=torch.int64)
        lengths = [torch.zeros_like(mine) for _ in range(group.size)]
        self.dist.all_gather(lengths, mine, group=group.handle.host)
        return [int(n) for n in lengths]

    @staticmethod
    def _padded(tensor: torch.Tensor, length: int) -> torch.Tensor:
        """``tensor`` zero-padded along dim 0 to ``length``, contiguous."""
        if tensor.shape[0] < length:
            tensor = torch.cat([tensor, tensor.new_zeros((length - tensor.shape[0],) + tuple(tensor.shape[1:]))])
        return tensor.contiguous()

    def _broadcast(self, tensor, root, group):
        self.dist.broadcast(tensor, src=root, group=self._group_for(tensor, group))
        return tensor

    def _gather(self, tensor, sizes, root, group):
        padded = self._padded(tensor, max(sizes))
        pieces = [torch.empty_like(padded) for _ in range(group.size)] if self.rank == root else None
        self.dist.gather(padded, pieces, dst=root, group=self._group_for(padded, group))
        if self.rank != root:
            return None
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)]).cpu()

    def _barrier(self, group):
        # on the backend's group: under NCCL the host also waits for the GPU's queue, as benchmarks expect
        self.dist.barrier(group=group.handle.device)

    def shutdown(self):
        self.dist.destroy_process_group()
