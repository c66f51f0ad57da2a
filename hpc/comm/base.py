"""The communicator's API, independent of the engine: groups, handles, the collectives built from each
engine's primitives (``Communicator``), and the differentiable allreduce."""
from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from hpc.errors import UserError

ENGINES = ("horovod", "torch", "local")
OPS = ("sum", "average")
DEFAULT_TIMEOUT_S = 600


class CommError(UserError):
    """A communicator cannot start or a collective was misused; the message names the fix."""


class AgreedError(CommError):
    """An error that every member of the world raises at the same point (``agree``): all are alive and
    in step, so they can let each other print it before any exits (``hpc.comm.finish``)."""


@dataclass(frozen=True)
class Group:
    """A set of global ranks that run collectives together.

    ranks: the members' global ranks, ascending. rank: this process's index in ``ranks``, or -1
    when it is not a member. index: creation order (the world is 0), the same on every rank because
    groups are created collectively. handle: the engine's object (Horovod process set, torch group).
    """

    ranks: Tuple[int, ...]
    rank: int
    index: int = 0
    handle: Any = None

    @property
    def size(self) -> int:
        return len(self.ranks)


class Handle:
    """An asynchronous collective in flight; ``wait()`` returns its result."""

    def __init__(self, wait_fn, result: torch.Tensor):
        self._wait_fn, self._result = wait_fn, result

    def wait(self) -> torch.Tensor:
        if self._wait_fn is not None:
            self._wait_fn()
            self._wait_fn = None
        return self._result


class Communicator:
    """Base class: rank bookkeeping, groups, and the collectives built from the engine's primitives.

    Subclasses implement ``_new_group``, ``_allreduce_async``, ``_allgather``, ``_broadcast`` and
    ``_barrier`` for groups of two or more members; groups of one never reach them. The differentiable
    ``allreduce`` is built on ``_allreduce_async``.
    """

    engine = "base"

    def __init__(self, rank: int, size: int, local_rank: int, local_size: int, world_handle: Any = None,
                 device: torch.device = torch.device("cpu")):
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = local_rank, local_size
        self.device = device  # where this rank computes: tensors the engine makes for its callers go here
        self.timeout_s = float(DEFAULT_TIMEOUT_S)  # a collective's timeout (hpc.comm.init sets it)
        self.watchdog = None  # hpc.comm.watchdog.Watchdog of a world of several ranks, started by hpc.comm.init
        self.world = Group(tuple(range(size)), rank, 0, world_handle)
        self._groups: Dict[Tuple[int, ...], Group] = {self.world.ranks: self.world}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    # groups ---------------------------------------------------------------------------------------
    def new_group(self, ranks: Sequence[int]) -> Group:
        """The group of ``ranks`` (global ranks). Collective: every rank of the world calls it with the
        same ranks in the same order. The whole world and repeated calls return the existing group."""
        key = tuple(sorted(int(r) for r in ranks))
        if not key or len(set(key)) != len(key) or key[0] < 0 or key[-1] >= self.size:
            raise CommError(f"invalid group ranks {list(ranks)}: need distinct ranks in [0, {self.size})")
        if key not in self._groups:
            member_rank = key.index(self.rank) if self.rank in key else -1
            handle = self._new_group(key) if len(key) > 1 else None
            self._groups[key] = Group(key, member_rank, len(self._groups), handle)
        return self._groups[key]

    def partition(self, group_size: Optional[int] = None) -> Group:
        """Split the world into consecutive groups of ``group_size`` ranks (None: the whole world) and
        return this rank's. Collective, like ``new_group``."""
        group_size = self.size if group_size is None else int(group_size)
        if group_size < 1 or self.size % group_size:
            raise CommError(f"group size {group_size} does not divide the world size {self.size}: "
                            f"choose a divisor of {self.size}")
        groups = [self.new_group(range(start, start + group_size)) for start in range(0, self.size, group_size)]
        return groups[self.rank // group_size]

    def _member(self, group: Optional[Group]) -> Group:
        group = self.world if group is None else group
        if group.rank < 0:
            raise CommError(f"rank {self.rank} is not a member of group {list(group.ranks)}")
        return group

    # collectives ----------------------------------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor, op: str = "sum", group: Optional[Group] = None,
                  name: Optional[str] = None) -> torch.Tensor:
        """Sum or average of ``tensor`` over the group, a new tensor (the input itself for a group of
        one). Differentiable: the gradient is the same reduction of the output gradients.

        name: a stable name for a collective repeated every iteration (a layer's statistics), which
        lets Horovod reuse its negotiation; it must not be in flight twice. Default: a sequence number.
        """
        group = self._member(group)
        _check_op(op)
        if group.size == 1:
            return tensor
        return _Allreduce.apply(tensor, self, op, group, name)

    def allreduce_async(self, tensor: torch.Tensor, op: str = "sum", group: Optional[Group] = None,
                        name: Optional[str] = None) -> Handle:
        """Start an in-place reduction of ``tensor``; ``handle.wait()`` returns it reduced. Not
        differentiable: for gradients and statistics already detached. ``name`` as in ``allreduce``."""
        group = self._member(group)
        _check_op(op)
        if group.size == 1:
            return Handle(None, tensor)
        return self._allreduce_async(tensor, op, group, name)

    def allgather(self, tensor: torch.Tensor, group: Optional[Group] = None) -> torch.Tensor:
        """Concatenation along dim 0 of every member's ``tensor``, in rank order. The first dimension
        may differ between ranks; the others must match. Not differentiable (for detections, metrics
        and statistics)."""
        group = self._member(group)
        if group.size == 1:
            return tensor.detach()
        return self._allgather(tensor.detach(), group)

    def allgather_object(self, obj: Any, group: Optional[Group] = None) -> List[Any]:
        """Every member's picklable ``obj``, as a list in rank order. Every member receives every
        payload: for large objects that only one rank needs, use ``gather_object``."""
        group = self._member(group)
        if group.size == 1:
            return [obj]
        payload = _pickled(obj)
        sizes = self._allgather(torch.tensor([payload.numel()], dtype=torch.int64), group).tolist()
        return _unpickled(self._allgather(payload, group), sizes)

    def gather_object(self, obj: Any, root: int = 0, group: Optional[Group] = None) -> Optional[List[Any]]:
        """Every member's picklable ``obj``, as a list in rank order, on global rank ``root``; None on
        the others. Only ``root`` receives the payloads (evaluation's detections: tens of MB per rank)."""
        group = self._member(group)
        self._check_root(root, group)
        if group.size == 1:
            return [obj]
        payload = _pickled(obj)
        sizes = self._allgather(torch.tensor([payload.numel()], dtype=torch.int64), group).tolist()
        gathered = self._gather(payload, sizes, root, group)
        return _unpickled(gathered, sizes) if self.rank == root else None

    def broadcast(self, tensor: torch.Tensor, root: int = 0, group: Optional[Group] = None) -> torch.Tensor:
        """Overwrite ``tensor`` in place with the copy on global rank ``root``, and return it."""
        group = self._member(group)
        self._check_root(root, group)
        if group.size == 1:
            return tensor
        return self._broadcast(tensor, root, group)

    def broadcast_object(self, obj: Any, root: int = 0, group: Optional[Group] = None) -> Any:
        """Global rank ``root``'s picklable ``obj`` (every other member's ``obj`` is ignored)."""
        group = self._member(group)
        self._check_root(root, group)
        if group.size == 1:
            return obj
        payload = pickle.dumps(obj) if self.rank == root else b""
        size = self._broadcast(torch.tensor([len(payload)], dtype=torch.int64), root, group).item()
        buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == root \
            else torch.empty(size, dtype=torch.uint8)
        return pickle.loads(self._broadcast(buffer, root, group).numpy().tobytes())

    def barrier(self, group: Optional[Group] = None) -> None:
        group = self._member(group)
        if group.size > 1:
            self._barrier(group)

    def agree(self, error: Optional[str] = None, group: Optional[Group] = None) -> None:
        """Agreement step: every member says whether it failed (``error`` is its one-line message, or
        None). If any did, every member raises ``CommError`` with the lowest failing rank's message
        (``AgreedError`` over the world), so no rank goes on to a collective that a failed rank will never
        join."""
        errors = self.allgather_object(error, group)
        failed = [(r, e) for r, e in zip(self._member(group).ranks, errors) if e is not None]
        if failed:
            rank, message = failed[0]
            kind = AgreedError if self._member(group).size == self.size else CommError
            raise kind(message if len(failed) == len(errors) else f"rank {rank}: {message}")

    @contextlib.contextmanager
    def all_or_none(self, group: Optional[Group] = None) -> Iterator[None]:
        """Run the block on every member; a ``UserError`` raised in it on any member then raises on every
        member (``agree``, the lowest failing rank's message), so none goes on to a collective that a
        failed member will never join. Collective: every member enters the block. A bug (any other
        exception) leaves at once with its traceback; the watchdog ends the others.

            with comm.all_or_none():
                dataset = ShardDataset(path)      # a shard missing on one node stops every rank
        """
        error = None
        try:
            yield
        except UserError as failure:
            error = str(failure)
        self.agree(error, group)

    def host_waits(self, tensor: torch.Tensor) -> bool:
        """Whether a finished collective on ``tensor`` has made the host wait for it, so that reading the
        result costs no further synchronisation: true except for CUDA tensors under NCCL, whose
        collectives only order the GPU's streams."""
        return True

    def shutdown(self) -> None:
        """Release the engine. The communicator must not be used afterwards."""

    @staticmethod
    def _check_root(root: int, group: Group) -> None:
        if root not in group.ranks:
            raise CommError(f"broadcast root {root} is not in group {list(group.ranks)}")

    # engine primitives ----------------------------------------------------------------------------
    def _new_group(self, ranks: Tuple[int, ...]) -> Any:
        raise NotImplementedError

    def _allreduce_async(self, tensor, op, group, name) -> Handle:
        raise NotImplementedError

    def _allgather(self, tensor, group):
        raise NotImplementedError

    def _broadcast(self, tensor, root, group):
        raise NotImplementedError

    def _gather(self, tensor, sizes, root, group):
        """The members' 1-D ``tensor`` (member i holds ``sizes[i]`` elements) concatenated in rank order,
        on ``root``; anything (or nothing) on the others."""
        raise NotImplementedError

    def _barrier(self, group):
        raise NotImplementedError


def _pickled(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


def _unpickled(gathered: torch.Tensor, sizes: List[int]) -> List[Any]:
    """The objects of a gathered uint8 payload, split by the members' ``sizes``."""
    data = gathered.cpu().numpy().tobytes()
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [pickle.loads(data[offsets[i]:offsets[i + 1]]) for i in range(len(sizes))]


def _check_op(op: str) -> None:
    if op not in OPS:
        raise CommError(f"unknown reduction op {op!r}: use one of {', '.join(OPS)}")


class _Allreduce(torch.autograd.Function):
    """Allreduce whose backward pass is the same reduction of the output gradient, through the engine's
    own ``_allreduce_async``. On Horovod the backward op is named after the forward one (Horovod's own
    autograd function names it by a per-process counter, which differs between members and non-members
    of a group); torch.distributed's differentiable all_reduce is deprecated."""

    @staticmethod
    def forward(ctx, tensor, comm, op, group, name):
        ctx.comm, ctx.op, ctx.group, ctx.name = comm, op, group, name
        return comm._allreduce_async(tensor.clone(), op, group, name).wait()

    @staticmethod
    def backward(ctx, grad):
        name = None if ctx.name is None else f"{ctx.name}.grad"
        return ctx.comm._allreduce_async(grad.clone(), ctx.op, ctx.group, name).wait(), None, None, None, None


