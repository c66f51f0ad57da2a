"""The command-line surface of the commands whose work needs torch (train, eval, plot, show): argument
declarations and a ``run`` that imports the engine only once the arguments and the config are read,
so that ``megdet --help`` and a config error answer at once. ``megdet.cli`` lists every command."""
from __future__ import annotations

from typing import Sequence

from hpc import launch
from hpc.errors import UserError
from megdet import config as config_mod


def load_config(name: str, overrides: Sequence[str]) -> config_mod.Config:
    """``megdet.config.load``; a bad config is its one-line error, raised at once by one process (no
    torch imported), or on every rank of a launch after they agree (``hpc.comm.raise_on_every_rank``),
    so that no rank's launcher kills the others before they have said it."""
    try:
        return config_mod.load(name, overrides)
    except UserError as error:
        if (launch.detect().size or 1) > 1:
            from hpc.comm import raise_on_every_rank

            raise_on_every_rank(error)
        raise
