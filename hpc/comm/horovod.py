"""The Horovod engine: Gloo or MPI as the launcher decided (NCCL for GPU tensors), groups as dynamic
process sets, every op named after its group."""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from hpc.comm.base import CommError, Communicator, Group, Handle
from hpc.comm.watchdog import DEFAULT_STALL_TIMEOUT_S


def _row_major(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor over ``tensor``'s elements for Horovod, which refuses any other: ``tensor``
    itself, or, for a dense tensor in another memory format (channels-last weights and gradients),
    the same storage with its dimensions permuted into row-major order (no copy; element-wise
    reductions do not care about the order, and every rank has the same layout), else a copy."""
    if tensor.is_contiguous():
        return tensor
    by_stride = sorted(range(tensor.dim()), key=lambda dim: -tensor.stride(dim))
    permuted = tensor.permute(by_stride)
    return permuted if permuted.is_contiguous() else tensor.contiguous()


class HorovodCommunicator(Communicator):
    """Horovod with dynamic process sets (groups), over Gloo or MPI as the launcher decided.

    Horovod matches a collective across ranks by its name. Every op here is named after its group
    and either the caller's stable name or the group's own sequence number, so ops on one group never
    shift the names of ops on another.
    """

    engine = "horovod"

    def __init__(self, timeout_s: float, device: torch.device = torch.device("cpu"),
                 stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S):
        # A collective that some rank never joins: Horovod warns naming the ranks that did not submit it,
        # after the watchdog has ended the run if one of them is stopped, and shuts down after this stall.
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(int(min(timeout_s, 2 * stall_timeout_s))))
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(timeout_s)))
        try:
            import horovod.torch as hvd
        except ImportError as error:
            raise CommError(f"Horovod with PyTorch support is not importable ({error}): run "
                            "'bash scripts/setup.sh' (builds Horovod 0.28.1 with PyTorch, Gloo and MPI) "
                            "or set MEGDET_COMM=torch") from None
        self.hvd = hvd
        hvd.init(process_sets="dynamic")
        super().__init__(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), hvd.global_process_set,
                         device)
        self.mpi_built = bool(hvd.mpi_built())
        if device.type == "cuda" and hvd.size() > 1 and not hvd.nccl_built():
            # Without NCCL, Horovod copies every GPU tensor to the host and reduces it there.
            raise CommError(f"this Horovod was built without NCCL but the ranks compute on GPUs ({device}): "
                            "rebuild it with NCCL (MEGDET_FORCE_SETUP=1 bash scripts/setup.sh on a node whose "
                            "torch has CUDA, with nvcc on PATH), or set MEGDET_COMM=torch")
        self._ops = {"sum": hvd.Sum, "average": hvd.Average}
        self._sequence: Dict[int, int] = {}

    def _name(self, group: Group, kind: str, name: Optional[str] = None) -> str:
        if name is None:
            self._sequence[group.index] = number = self._sequence.get(group.index, 0) + 1
            name = str(number)
        return f"g{group.index}.{kind}.{name}"

    def _new_group(self, ranks):
        return self.hvd.add_process_set(list(ranks))

    def _allreduce_async(self, tensor, op, group, name):
        buffer = _row_major(tensor)
        handle = self.hvd.allreduce_async_(buffer, op=self._ops[op], process_set=group.handle,
                                           name=self._name(group, "allreduce", name))

        def wait():
            self.hvd.synchronize(handle)
            if buffer.data_ptr() != tensor.data_ptr():
                tensor.copy_(buffer)
        return Handle(wait, tensor)

    def _allgather(self, tensor, group):
        return self.hvd.allgather(tensor, name=self._name(group, "allgather"), process_set=group.handle)

    def _broadcast(self, tensor, root, group):
        buffer = _row_major(tensor)
        self.hvd.broadcast_(buffer, root_rank=root, name=self._name(group, "broadcast"), process_set=group.handle)
        if buffer.data_ptr() != tensor.data_ptr():
            tensor.copy_(buffer)
        return tensor

    def _gather(self, tensor, sizes, root, group):
        # Horovod has no gather: an alltoall in which every member sends all of its tensor to the root.
        splits = torch.zeros(group.size, dtype=torch.int32)
        splits[group.ranks.index(root)] = tensor.numel()
        received = self.hvd.alltoall(tensor, splits=splits, name=self._name(group, "gather"),
                                     process_set=group.handle)
        return received[0] if isinstance(received, tuple) else received

    def _barrier(self, group):
        self.hvd.barrier(process_set=group.handle)

    def shutdown(self):
        self.hvd.shutdown()
