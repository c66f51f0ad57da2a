"""Errors caused by the user's input or environment, as opposed to bugs, and the lines that report them.

The command line prints a ``UserError`` as one line on every rank and exits 2 (``report``); anything else
is a bug in our code: its traceback, then one line naming the rank that hit it, exit 1 (``report_bug``).
Messages name the bad value and the fix.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Optional, TextIO

from hpc.launch_env import detect

EXIT_USER_ERROR = 2
EXIT_BUG = 1  # Python's own status for an uncaught exception
# The program that names itself in error lines: the entry point sets it ("megdet train") before it runs.
program = "megdet"


class UserError(Exception):
    """Bad input, configuration or environment; ``str(error)`` names the value and the fix."""


def rank_label() -> str:
    """" (rank R/N)" when a launcher started several processes, else ""."""
    started = detect()
    return f" (rank {started.rank}/{started.size})" if (started.size or 1) > 1 else ""


def write_line(text: str, stream: Optional[TextIO] = None) -> None:
    """Write ``text`` and its newline to ``stream`` (default: stderr) in one write to its file descriptor.

    ``print`` writes the text and the newline separately when the stream is unbuffered
    (``PYTHONUNBUFFERED``, common in job scripts), and launchers forward the ranks' pipes in whatever
    pieces arrive, so two ranks' lines could merge into one. A single write of up to PIPE_BUF bytes
    (4096 on Linux) to a pipe is atomic."""
    stream = sys.stderr if stream is None else stream
    if stream is sys.stderr and _progress_bar_drawn():
        text = "\n" + text  # a line of its own, not the tail of the bar's unfinished line
    data = (text + "\n").encode(stream.encoding or "utf-8", errors="replace")
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a stream with no descriptor (captured, in memory)
        stream.write(text + "\n")
        stream.flush()
        return
    stream.flush()
    while data:
        data = data[os.write(fd, data):]


def _progress_bar_drawn() -> bool:
    """Whether a tqdm progress bar of this process is open (drawn on stderr, its line unfinished)."""
    tqdm = sys.modules.get("tqdm")
    return tqdm is not None and any(not bar.disable for bar in list(getattr(tqdm.tqdm, "_instances", ())))


def flush_streams() -> None:
    """Flush stdout and stderr, ignoring streams that are closed or gone (before an ``os._exit``)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def report(message: str) -> None:
    """Write ``message`` as this rank's one error line, ``PROGRAM: error (rank R/N): MESSAGE``, on stderr."""
    write_line(f"{program}: error{rank_label()}: {message}")


def bug_summary(error: BaseException) -> str:
    """``TYPE: first line of the message``: a bug named in one line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def report_bug(error: BaseException) -> None:
    """Write ``error``'s traceback, then ``PROGRAM: bug (rank R/N): TYPE: MESSAGE ...`` as one line, on
    stderr: the traceback locates the bug, the line says which rank hit it."""
    sys.stderr.write("".join(traceback.format_exception(error)))
    write_line(f"{program}: bug{rank_label()}: {bug_summary(error)}: a bug in megdet, not in your input; "
               "the traceback above locates it (please report it with that traceback)")
