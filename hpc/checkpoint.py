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
leaves the previous checkpoint intact and never a truncated one under the final name; a full disk
is a ``CheckpointError`` that says so. At resume, and when pruning old checkpoints::

    path, state = read(out, required_keys=("model", "optimizer"))  # a file, or a folder's newest that loads
    save(checkpoint_path(out, it), state); prune(out, keep=3)   # never deletes the newest intact one
"""
from __future__ import annotations

import os
import random
import re
import signal
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from hpc.errors import UserError, write_line
from hpc.files import atomic_open, os_error_reason

# Exit status of a run stopped by a signal after checkpointing: EX_TEMPFAIL from sysexits.h, which a
# job script reads as "requeue me" (any other non-zero status is a failure).
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_NAME = re.compile(r"^model_(\d+)\.pt$")
_TEMPORARY = re.compile(r"^\.model_\d+\.pt\..+\.tmp$")  # hpc.files.atomic_open's name for model_N.pt


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated or from another model."""


def checkpoint_path(directory: os.PathLike, iteration: int) -> Path:
    """``directory/model_{iteration:07d}.pt``: names sort by iteration."""
    return Path(directory) / f"model_{iteration:07d}.pt"


def checkpoints(directory: os.PathLike) -> List[Path]:
    """The checkpoints in ``directory``, lowest iteration first (none if it does not exist). A save in
    progress, or one killed mid-write, is under a temporary name and never among them."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def latest(directory: os.PathLike) -> Optional[Path]:
    """The checkpoint with the highest iteration in ``directory``, or None."""
    found = checkpoints(directory)
    return found[-1] if found else None


def save(path: os.PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` with torch.save to ``path`` atomically (temporary file, fsync, rename). A file
    system that refuses (full disk, quota, permissions) is a ``CheckpointError`` naming the folder: the
    previous checkpoint stays as it was and no temporary file is left."""
    path = Path(path)
    try:
        with atomic_open(path) as handle:
            torch.save(state, handle)
    except Exception as error:
        cause = _os_error_in(error)
        if cause is None:  # not the file system: a state that cannot be pickled is a bug
            raise
        previous = latest(path.parent)
        kept = f"{previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {path}: {os_error_reason(cause, path.parent)}; free "
                              f"space in {path.parent} or give the run another output folder, then resume "
                              f"({kept})") from None
    return path


def _os_error_in(error: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind ``error`` (torch.save reports a failed write as a RuntimeError raised while
    handling it), or None."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def check_integrity(path: os.PathLike) -> None:
    """``CheckpointError`` unless ``path`` is a complete torch checkpoint (a zip archive) whose every
    record matches its CRC-32: ``torch.load`` alone reads flipped tensor bytes without noticing."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad_record = archive.testzip()
    except Exception as error:  # zipfile raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {_first_line(error)}): "
                              "it is truncated or not a torch checkpoint; use an earlier one") from None
    if bad_record is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its record {bad_record} does not match its "
                              "CRC-32; use an earlier one")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def load(path: os.PathLike, required_keys=("model",)) -> Dict[str, Any]:
    """Read a checkpoint written by ``save``; ``CheckpointError`` naming the file when it cannot be used
    (missing, truncated, a record that fails its CRC-32, or lacking ``required_keys``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: pass an existing file or drop --resume")
    check_integrity(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {_first_line(error)}): "
                              "it is truncated or not a torch checkpoint; use an earlier one") from None
    missing = [key for key in required_keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} has no {', '.join(missing)}: it was not written by megdet train")
    return state


def _warn(line: str) -> None:
    write_line(f"warning: {line}")


def latest_loadable(directory: os.PathLike, required_keys=("model",), *, warn: Callable[[str], None] = _warn
                    ) -> Tuple[Optional[Path], Optional[Dict[str, Any]], List[Tuple[Path, str]]]:
    """The newest checkpoint in ``directory`` that ``load`` accepts: (path, state, skipped), where
    skipped holds (path, reason) for each newer one that failed, newest first, each also told to
    ``warn`` in one line. (None, None, []) when the folder holds no checkpoint; ``CheckpointError``
    naming the newest when none loads."""
    skipped: List[Tuple[Path, str]] = []
    for path in reversed(checkpoints(directory)):
        try:
            return path, load(path, required_keys), skipped
        except CheckpointError as error:
            skipped.append((path, str(error)))
            warn(f"skipping a checkpoint: {error}")
    if skipped:
        raise CheckpointError(f"no checkpoint in {directory} can be loaded: all {len(skipped)} are truncated, "
                              f"corrupt or incomplete (the newest: {skipped[0][1]}); restore one, or start "
                              "afresh in another output folder")
    return None, None, skipped


def read(where: os.PathLike, required_keys=("model",), *, warn: Callable[[str], None] = _warn
         ) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """(path, state) of the checkpoint ``where`` names: a file (``load``), or a folder's newest one that
    loads (``latest_loadable``: (None, None) when it holds none). The one way train, eval and show open
    a checkpoint."""
    if Path(where).is_dir():
        path, state, _ = latest_loadable(where, required_keys, warn=warn)
        return path, state
    return Path(where), load(where, required_keys)


def prune(directory: os.PathLike, keep: int, protect: Sequence[os.PathLike] = ()) -> List[Path]:
    """Delete all but the ``keep`` newest checkpoints in ``directory`` and those in ``protect``, and
    temporary files that killed saves left; never the newest intact one (``check_integrity``), kept
    beyond ``keep`` when newer ones are corrupt. Returns what was deleted. Call it from the one process
    that saves, after ``save``."""
    if keep < 1:
        raise UserError(f"Invalid number of checkpoints to keep: {keep}; keep at least 1 (the newest)")
    found = checkpoints(directory)
    kept = set(found[-keep:]) | {Path(path) for path in protect}
    for path in reversed(found):
        try:
            check_integrity(path)
        except CheckpointError:
            continue
        kept.add(path)
        break
    folder = Path(directory)
    leftovers = [path for path in folder.iterdir() if _TEMPORARY.match(path.name)] if folder.is_dir() else []
    deleted = [path for path in found if path not in kept] + leftovers
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


def rng_state() -> Dict[str, Any]:
    """This process's Python, NumPy and torch random states, and its own GPU's (the current device's
    only: reading every visible GPU's would open a context on each of them from every rank)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": cuda}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (the GPU's state onto the current device)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if isinstance(state["cuda"], torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(comm) -> Optional[List[Dict[str, Any]]]:
    """Every rank's random state, on rank 0 (None elsewhere): a checkpoint written by rank 0 holds them all."""
    return comm.gather_object(rng_state(), root=0)


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
