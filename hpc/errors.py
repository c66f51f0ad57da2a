"""Errors caused by the user's input or environment, as opposed to bugs.

The command line prints a ``UserError`` as one line on every rank and exits non-zero; anything else
is a bug and keeps its traceback. Messages name the bad value and the fix.
"""


class UserError(Exception):
    """Bad input, configuration or environment; ``str(error)`` names the value and the fix."""
