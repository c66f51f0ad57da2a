"""Checkpoints that survive crashes and pre-emption: atomic writes, exact resume, stop signals.

    stop = StopSignals()                       # SIGTERM, SIGUSR1 (Slurm's warning before the time limit)
    for it in range(start, max_iter):
        ...
        flag = torch.tensor([float(stop.received is not None)])
        if comm.allreduce(flag).item() > 0:    # any rank signalled: all stop at the same iteration
            save(checkpoint_path(out, it), state)     # rank 0
            sys.exit(EXIT_PREEMPTED)

(``megdet train`` sends that flag inside the allreduce it already does for its metrics.)

A checkpoint is written to a temporary file in the same folder and renamed, so a crash mid-write
leaves the previous checkpoint intact and never a truncated one under the final name.
"""
from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from hpc.errors import UserError
from hpc.files import atomic_open

# Exit status of a run stopped by a signal after checkpointing: EX_TEMPFAIL from sysexits.h, which a
# job script reads as "requeue me" (any other non-zero status is a failure).
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_NAME = re.compile(r"^model_(\d+)\.pt$")


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated or from another model."""


def checkpoint_path(directory: os.PathLike, iteration: int) -> Path:
    """``directory/model_{iteration:07d}.pt``: names sort by iteration."""
    return Path(directory) / f"model_{iteration:07d}.pt"


def latest(directory: os.PathLike) -> Optional[Path]:
    """The checkpoint with the highest iteration in ``directory``, or None."""
    folder = Path(directory)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := _NAME.match(path.name))]
    return max(found)[1] if found else None


def save(path: os.PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` with torch.save to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_open(path) as handle:
        torch.save(state, handle)
    return Path(path)


def load(path: os.PathLike, required_keys=("model",)) -> Dict[str, Any]:
    """Read a checkpoint written by ``save``; ``CheckpointError`` naming the file when it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass an existing file or drop --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}): "
                              "it is truncated or not a torch checkpoint; use an earlier one") from None
    missing = [key for key in required_keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)}: it was not written by megdet train")
    return state


def rng_state() -> Dict[str, Any]:
    """This process's Python, NumPy and torch random states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(comm) -> Optional[List[Dict[str, Any]]]:
    """Every rank's random state, on rank 0 (None elsewhere): a checkpoint written by rank 0 holds them all."""
    states = comm.allgather_object(rng_state())
    return states if comm.rank == 0 else None


class StopSignals:
    """Record SIGTERM / SIGUSR1 in ``received`` instead of dying, so the run can checkpoint first.

    The ranks must agree on when to stop (a signal may reach only some of them: ``scancel --signal`` to
    the batch step, a node-local kill): reduce ``received is not None`` across ranks, as above.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.received: Optional[int] = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
