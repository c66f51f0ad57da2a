"""Errors caused by the user's input or environment, as opposed to bugs, and the one line that reports them.

The command line prints a ``UserError`` as one line on every rank and exits non-zero; anything else
is a bug and keeps its traceback. Messages name the bad value and the fix.
"""
from __future__ import annotations

import sys

EXIT_USER_ERROR = 2
# The program that names itself in error lines: the entry point sets it ("megdet train") before it runs.
program = "megdet"


class UserError(Exception):
    """Bad input, configuration or environment; ``str(error)`` names the value and the fix."""


def rank_label() -> str:
    """" (rank R/N)" when a launcher started several processes, else ""."""
    from hpc import launch  # hpc.launch imports this module

    started = launch.detect()
    return f" (rank {started.rank}/{started.size})" if (started.size or 1) > 1 else ""


def report(message: str) -> None:
    """Print ``message`` as this rank's one error line, ``PROGRAM: error (rank R/N): MESSAGE``, on stderr."""
    print(f"{program}: error{rank_label()}: {message}", file=sys.stderr, flush=True)
