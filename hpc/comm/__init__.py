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
thread (docs/benchmarks.md: the demo's step under each engine).

Faults: a rank whose process dies or stops ends the run within seconds, every rank printing one line
that names it (``hpc.comm.watchdog``: beside each rank a watchdog process, with a heartbeat per second
to rank 0's; a death is seen at once, a stop after ``MEGDET_STALL_TIMEOUT`` seconds, default 60).
A collective that a live rank never joins fails after ``MEGDET_COMM_TIMEOUT`` seconds (default 600)
instead of hanging: Horovod's stall shutdown, torch.distributed's process-group timeout; it must
outlast the longest work one rank does while the others wait (rank 0's COCO evaluation of 5000
images takes minutes, a checkpoint onto a busy parallel file system tens of seconds, and the ranks of
a large job start minutes apart). ``failure_reason`` turns the error of a failed collective into one
line. ``agree`` is the cheaper guard: ranks exchange their error before any collective that a failing
rank would skip, and all raise the same one-line error.

Collectives must be issued in the same order on every member of a group, as with MPI.
"""
from __future__ import annotations

import math
import os
import re
import sys
from typing import Optional

import torch

from hpc import launch as launch_mod
from hpc import errors
from hpc.errors import UserError
from hpc.comm.base import DEFAULT_TIMEOUT_S, ENGINES, OPS, AgreedError, CommError, Communicator, Group, Handle
from hpc.comm.horovod import HorovodCommunicator
from hpc.comm.local import LocalCommunicator
from hpc.comm.rendezvous import DEFAULT_RENDEZVOUS_TIMEOUT_S
from hpc.comm.torchdist import TorchCommunicator
from hpc.comm.watchdog import DEFAULT_STALL_TIMEOUT_S, Watchdog

__all__ = ["AgreedError", "CommError", "Communicator", "Group", "Handle", "HorovodCommunicator", "LocalCommunicator",
           "TorchCommunicator", "ENGINES", "OPS", "DEFAULT_TIMEOUT_S", "init", "get", "get_cgbn", "describe",
           "finish", "shutdown", "raise_on_every_rank", "failure_reason"]

_current: Optional[Communicator] = None
_cgbn: Optional[Communicator] = None


def init(engine: Optional[str] = None, timeout_s: Optional[float] = None,
         cgbn_engine: Optional[str] = None, device: torch.device = torch.device("cpu")) -> Communicator:
    """Start the process's communicator (once; later calls return it) and check it against the launcher.

    engine: "horovod", "torch" or "local"; default ``$MEGDET_COMM``, else "horovod" when a launcher
    started more than one process, else "local". timeout_s: default ``$MEGDET_COMM_TIMEOUT`` or 600.
    Several ranks also start the watchdog, stall timeout ``$MEGDET_STALL_TIMEOUT`` or 60 s. The torch
    engine's ranks wait ``$MEGDET_RENDEZVOUS_TIMEOUT`` or 300 s for each other (``rendezvous.meet``).
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
    timeout_s = float(timeout_s or _seconds("MEGDET_COMM_TIMEOUT", DEFAULT_TIMEOUT_S))
    stall_timeout_s = _seconds("MEGDET_STALL_TIMEOUT", DEFAULT_STALL_TIMEOUT_S)
    meet_s = _seconds("MEGDET_RENDEZVOUS_TIMEOUT", DEFAULT_RENDEZVOUS_TIMEOUT_S)
    if engine == "local":
        comm: Communicator = LocalCommunicator(device)
        launch_mod.check_world_size(launch, engine, comm.size)
    elif engine == "horovod":
        comm = HorovodCommunicator(timeout_s, device, stall_timeout_s)
        launch_mod.check_world_size(launch, engine, comm.size, mpi_built=comm.mpi_built)
    elif launch.launcher == "horovodrun":
        # horovodrun exports no rendezvous address for torch.distributed: Horovod hands one out, then stops.
        bootstrap = HorovodCommunicator(timeout_s, stall_timeout_s=stall_timeout_s)
        comm = TorchCommunicator(launch, timeout_s, device, via=bootstrap, rendezvous_timeout_s=meet_s)
        bootstrap.shutdown()
        launch_mod.check_world_size(launch, engine, comm.size)
    else:
        comm = TorchCommunicator(launch, timeout_s, device, rendezvous_timeout_s=meet_s)
        launch_mod.check_world_size(launch, engine, comm.size)
    comm.timeout_s = timeout_s
    if comm.size > 1:
        comm.watchdog = Watchdog(comm, stall_timeout_s)
    _current = comm
    if cgbn_engine != engine and engine == "horovod":
        _cgbn = TorchCommunicator(launch, timeout_s, device, via=comm, rendezvous_timeout_s=meet_s)
    return comm


def _seconds(name: str, default: float) -> float:
    """The positive, finite number of seconds in ``$name``, or ``default`` when it is not set."""
    text = os.environ.get(name)
    if text is None:
        return float(default)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise CommError(f"{name}={text!r} is not a number of seconds > 0: set it to one (default {default}), "
                        "or unset it")
    return value


def raise_on_every_rank(error: UserError) -> None:
    """Raise ``error``, a failure found before the communicator started (a bad config, a missing GPU),
    on every rank of a multi-process launch: the ranks first agree over a CPU communicator, so none
    exits (and has its launcher kill the others) before each has said it. Alone, raise at once."""
    if (launch_mod.detect().size or 1) > 1 and _current is None:
        init(device=torch.device("cpu")).agree(str(error))
    raise error


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


def stop_others(error: BaseException) -> None:
    """After this rank failed alone (a bug, reported with its traceback, or a ``UserError`` the other
    ranks have not agreed on): end them in seconds, each with a line naming this rank and carrying the
    error's words, rather than leave them waiting in a collective until MEGDET_COMM_TIMEOUT (a launcher
    that stops the job at the first exit may cut this rank's own line: theirs still explains it).
    Nothing to do without a watchdog (one process)."""
    if _current is None or _current.watchdog is None:
        return
    if isinstance(error, UserError):
        line = f"rank {_current.rank} stopped on bad input: {error}"
    else:
        line = (f"rank {_current.rank} stopped on a bug ({errors.bug_summary(error)}): ending the run; that rank's "
                "traceback locates it")
    _current.watchdog.stop_others(line)


def failure_reason(error: BaseException) -> Optional[str]:
    """One line for ``error`` when a collective failed for want of a peer, else None (a bug: keep its
    traceback). When the watchdog hears of a rank that died or stopped, it reports that itself and
    ends the process: this call then does not return."""
    if _current is None or _current.watchdog is None or not _is_engine_failure(error):
        return None
    gone = _current.watchdog.explain()
    what = _first_sentence(error)
    if gone:
        return (f"a collective failed because {gone} ({what}): that rank's own output says why; fix it, then "
                "restart the job (training resumes from its last checkpoint)")
    return (f"a collective failed ({what}) while no rank had died, stopped or exited: a live rank did not join "
            f"it within MEGDET_COMM_TIMEOUT={_current.timeout_s:g} s (stuck reading a file, or code that skips a "
            "collective on some ranks); next time look at the ranks' stacks before then (py-spy dump --pid PID)")


def _is_engine_failure(error: BaseException) -> bool:
    """Whether ``error`` is an engine's report of a failed collective: Horovod's shut-down error,
    torch.distributed's errors, or the RuntimeError that gloo raises for a closed connection or a timeout."""
    horovod = sys.modules.get("horovod.common.exceptions")
    if horovod is not None and isinstance(error, horovod.HorovodInternalError):
        return True
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and isinstance(error, getattr(distributed, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and ("gloo" in str(error) or "Horovod has been shut down" in str(error))


def _first_sentence(error: BaseException) -> str:
    """``error``'s first sentence, without gloo's "[source.cc:123] " prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().split("\n")[0])
    return text.split(". ")[0].rstrip(".") or type(error).__name__


def shutdown() -> None:
    """Shut down the process's communicators (the watchdog first, saying goodbye), if any."""
    global _current, _cgbn
    if _cgbn is not None:
        _cgbn.shutdown()
        _cgbn = None
    if _current is not None:
        if _current.watchdog is not None:
            _current.watchdog.close()
        _current.shutdown()
        _current = None
