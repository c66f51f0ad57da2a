"""Communicator: one small collective API over Horovod, torch.distributed, or a single process.

    comm = hpc.comm.init()                    # engine from MEGDET_COMM, else horovod when launched
    y = comm.allreduce(x, op="average")       # differentiable on every engine
    bn = comm.partition(group_size=2)         # collective: every rank calls it; this rank's group
    s = comm.allreduce(stats, group=bn)

Engines:
  horovod  Horovod (Gloo under ``horovodrun --gloo``, MPI under ``mpirun``/``srun``), the default when
           a launcher started more than one process. Groups are Horovod dynamic process sets.
  torch    torch.distributed (gloo on CPU, NCCL on GPU), rendezvous from torchrun's variables, or
           through mpi4py under ``mpirun``, from Slurm's under ``srun``, or through a Horovod
           started for the purpose under ``horovodrun``.
  local    one process, no communication.

Cross-GPU BN's collectives: ``MEGDET_CGBN_COMM=torch`` under the horovod engine sends them through a
second communicator, torch.distributed on the same ranks (``get_cgbn``), while gradients keep Horovod's
fused allreduce. CGBN issues two small blocking allreduces per BN layer per step, each of which waits
for Horovod's background cycle and negotiation; torch.distributed runs them at once in the calling
thread (docs/benchmarks.md, the demo on 2 CPU ranks: 1.03 s per step with CGBN on Horovod, 0.72 s on torch).

Timeouts: a collective that some rank never joins fails after ``MEGDET_COMM_TIMEOUT`` seconds
(default 600) instead of hanging: Horovod's stall shutdown, torch.distributed's process-group
timeout. ``agree`` is the cheaper guard: ranks exchange their error before any collective that a
failing rank would skip, and all raise the same one-line error.

Collectives must be issued in the same order on every member of a group, as with MPI.
"""
from __future__ import annotations

import datetime
import os
import pickle
import socket
import subprocess
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from hpc import launch as launch_mod
from hpc.errors import UserError

ENGINES = ("horovod", "torch", "local")
OPS = ("sum", "average")
DEFAULT_TIMEOUT_S = 600


class CommError(UserError):
    """A communicator cannot start or a collective was misused; the message names the fix."""


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
        None). If any did, every member raises ``CommError`` with the lowest failing rank's message,
        so no rank goes on to a collective that a failed rank will never join."""
        errors = self.allgather_object(error, group)
        failed = [(r, e) for r, e in zip(self._member(group).ranks, errors) if e is not None]
        if failed:
            rank, message = failed[0]
            raise CommError(message if len(failed) == len(errors) else f"rank {rank}: {message}")

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


class LocalCommunicator(Communicator):
    """A world of one process: every collective returns its input."""

    engine = "local"

    def __init__(self, device: torch.device = torch.device("cpu")):
        super().__init__(rank=0, size=1, local_rank=0, local_size=1, device=device)


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

    def __init__(self, timeout_s: float, device: torch.device = torch.device("cpu")):
        # A collective that some rank never joins: Horovod shuts down after this stall.
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(min(60, int(timeout_s))))
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
        rank, size, address = _torch_rendezvous(launch) if via is None else \
            (via.rank, via.size, via.broadcast_object(_free_address() if via.rank == 0 else None))
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


def _torch_rendezvous(launch: launch_mod.Launch) -> Tuple[int, int, str]:
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
        address = _free_address() if world.Get_rank() == 0 else None
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


def _free_address() -> str:
    """A ``tcp://host:port`` init_method on this host, at a port free now."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return f"tcp://{socket.getfqdn()}:{probe.getsockname()[1]}"


_current: Optional[Communicator] = None
_cgbn: Optional[Communicator] = None


def init(engine: Optional[str] = None, timeout_s: Optional[float] = None,
         cgbn_engine: Optional[str] = None, device: torch.device = torch.device("cpu")) -> Communicator:
    """Start the process's communicator (once; later calls return it) and check it against the launcher.

    engine: "horovod", "torch" or "local"; default ``$MEGDET_COMM``, else "horovod" when a launcher
    started more than one process, else "local". timeout_s: default ``$MEGDET_COMM_TIMEOUT`` or 600.
    cgbn_engine: the engine of cross-GPU BN (``get_cgbn``), ``engine`` itself or "torch" beside
    "horovod" (ignored by "local": one process has nothing to send); default ``$MEGDET_CGBN_COMM``,
    else ``engine``. device: where this rank computes (``hpc.device.select``, called first): the torch
    engine runs NCCL there when it is a GPU.
    """
    global _current, _cgbn
    if _current is not None:
        return _current
    launch = launch_mod.detect()
    engine = engine or os.environ.get("MEGDET_COMM") or ("horovod" if (launch.size or 1) > 1 else "local")
    if engine not in ENGINES:
        raise CommError(f"unknown communication engine {engine!r}: set MEGDET_COMM to one of {', '.join(ENGINES)}")
    cgbn_engine = cgbn_engine or os.environ.get("MEGDET_CGBN_COMM") or engine
    if cgbn_engine not in ENGINES or (cgbn_engine != engine and engine != "local" and
                                      (engine, cgbn_engine) != ("horovod", "torch")):
        raise CommError(f"MEGDET_CGBN_COMM={cgbn_engine!r} does not go with the {engine} engine: use "
                        f"{engine!r}, or 'torch' beside 'horovod'")
    timeout_s = float(timeout_s or os.environ.get("MEGDET_COMM_TIMEOUT", DEFAULT_TIMEOUT_S))
    if engine == "local":
        comm: Communicator = LocalCommunicator(device)
        launch_mod.check_world_size(launch, engine, comm.size)
    elif engine == "horovod":
        comm = HorovodCommunicator(timeout_s, device)
        launch_mod.check_world_size(launch, engine, comm.size, mpi_built=comm.mpi_built)
    elif launch.launcher == "horovodrun":
        # horovodrun exports no rendezvous address for torch.distributed: Horovod hands one out, then stops.
        bootstrap = HorovodCommunicator(timeout_s)
        comm = TorchCommunicator(launch, timeout_s, device, via=bootstrap)
        bootstrap.shutdown()
        launch_mod.check_world_size(launch, engine, comm.size)
    else:
        comm = TorchCommunicator(launch, timeout_s, device)
        launch_mod.check_world_size(launch, engine, comm.size)
    _current = comm
    if cgbn_engine != engine and engine == "horovod":
        _cgbn = TorchCommunicator(launch, timeout_s, device, via=comm)
    return comm


def get() -> Communicator:
    """The communicator started by ``init`` (a local one if none was)."""
    return _current if _current is not None else init("local")


def get_cgbn() -> Communicator:
    """The communicator of cross-GPU BN's collectives: ``get()`` unless ``init`` was given another
    ``cgbn_engine``."""
    return _cgbn if _cgbn is not None else get()


def describe() -> str:
    """The running engines, e.g. "horovod" or "horovod, CGBN on torch"."""
    main, cgbn = get(), get_cgbn()
    return main.engine if cgbn is main else f"{main.engine}, CGBN on {cgbn.engine}"


def finish() -> None:
    """The end of a command that succeeded on every rank: a barrier, so that no rank tears down a
    connection that a peer is still reading from (gloo aborts the peer's process), then ``shutdown``."""
    if _current is not None:
        _current.barrier()
    shutdown()


def shutdown() -> None:
    """Shut down the process's communicators, if any."""
    global _current, _cgbn
    if _cgbn is not None:
        _cgbn.shutdown()
        _cgbn = None
    if _current is not None:
        _current.shutdown()
        _current = None
