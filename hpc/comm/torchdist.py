"""The torch.distributed engine: NCCL on a GPU, gloo on the CPU."""
from __future__ import annotations

import datetime
import os
import socket
from typing import List, Optional

import torch

from hpc import launch as launch_mod
from hpc.comm.base import CommError, Communicator, Group, Handle
from hpc.comm.rendezvous import free_address, torch_rendezvous


BACKENDS = ("nccl", "gloo")


class TorchCommunicator(Communicator):
    """torch.distributed: NCCL on a GPU, gloo on the CPU (``MEGDET_TORCH_BACKEND=gloo`` forces gloo on
    a GPU too, e.g. for several ranks sharing one GPU, which NCCL refuses).

    NCCL moves GPU tensors only: a CPU tensor handed to a collective (a pickled object, a host-side
    flag) is staged through this rank's GPU and its result copied back."""

    engine = "torch"

    def __init__(self, launch: launch_mod.Launch, timeout_s: float, device: torch.device = torch.device("cpu"),
                 via: Optional[Communicator] = None):
        """device: this rank's device (``hpc.device.select``, already current). via: an engine already
        running on the same ranks, which hands out rank 0's address (the rendezvous under horovodrun);
        None: the launcher's variables."""
        import torch.distributed as dist

        self.dist = dist
        self.backend = os.environ.get("MEGDET_TORCH_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
        if self.backend not in BACKENDS or (self.backend == "nccl" and device.type != "cuda"):
            raise CommError(f"MEGDET_TORCH_BACKEND={self.backend!r} cannot run on {device}: use "
                            f"{'nccl or gloo' if device.type == 'cuda' else 'gloo'}, or unset it")
        rank, size, address = torch_rendezvous(launch) if via is None else \
            (via.rank, via.size, via.broadcast_object(free_address() if via.rank == 0 else None))
        dist.init_process_group(self.backend, init_method=address, rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self._transport = device if self.backend == "nccl" else torch.device("cpu")
        hosts = [None] * size
        dist.all_gather_object(hosts, socket.gethostname())
        local = [r for r, host in enumerate(hosts) if host == hosts[rank]]
        super().__init__(rank, size, local.index(rank), len(local), dist.group.WORLD, device)
        self._ops = {"sum": dist.ReduceOp.SUM, "average": dist.ReduceOp.SUM}

    def _staged(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` where the backend can move it: itself, or (NCCL and a CPU tensor) a copy on the GPU.
        gloo moves CUDA tensors itself."""
        if self.backend == "nccl" and tensor.device != self._transport:
            return tensor.to(self._transport)
        return tensor

    def host_waits(self, tensor: torch.Tensor) -> bool:
        return not (self.backend == "nccl" and tensor.is_cuda)

    def _new_group(self, ranks):
        return self.dist.new_group(list(ranks))

    def _allreduce_async(self, tensor, op, group, name):
        buffer = self._staged(tensor)
        work = self.dist.all_reduce(buffer, op=self._ops[op], group=group.handle, async_op=True)

        def wait():
            work.wait()
            if op == "average":
                buffer.div_(group.size)
            if buffer is not tensor:
                tensor.copy_(buffer)
        return Handle(wait, tensor)

    def _allgather(self, tensor, group):
        # gloo gathers equal shapes only: pad dim 0 to the longest, gather, then trim each piece.
        lengths = self._lengths(tensor.shape[0], group)
        padded = self._padded(self._staged(tensor), max(lengths))
        pieces = [torch.empty_like(padded) for _ in range(group.size)]
        self.dist.all_gather(pieces, padded, group=group.handle)
        return torch.cat([piece[:n] for piece, n in zip(pieces, lengths)]).to(tensor.device)

    def _lengths(self, length: int, group: Group) -> List[int]:
        mine = torch.tensor([length], dtype=torch.int64, device=self._transport)
        lengths = [torch.zeros_like(mine) for _ in range(group.size)]
        self.dist.all_gather(lengths, mine, group=group.handle)
        return [int(n) for n in lengths]

    @staticmethod
    def _padded(tensor: torch.Tensor, length: int) -> torch.Tensor:
        """``tensor`` zero-padded along dim 0 to ``length``, contiguous."""
        if tensor.shape[0] < length:
            tensor = torch.cat([tensor, tensor.new_zeros((length - tensor.shape[0],) + tuple(tensor.shape[1:]))])
        return tensor.contiguous()

    def _broadcast(self, tensor, root, group):
        buffer = self._staged(tensor)
        self.dist.broadcast(buffer, src=root, group=group.handle)
        if buffer is not tensor:
            tensor.copy_(buffer)
        return tensor

    def _gather(self, tensor, sizes, root, group):
        padded = self._padded(self._staged(tensor), max(sizes))
        pieces = [torch.empty_like(padded) for _ in range(group.size)] if self.rank == root else None
        self.dist.gather(padded, pieces, dst=root, group=group.handle)
        if self.rank != root:
            return None
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)]).cpu()

    def _barrier(self, group):
        self.dist.barrier(group=group.handle)

    def shutdown(self):
        self.dist.destroy_process_group()
