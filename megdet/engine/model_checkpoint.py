"""A megdet checkpoint opened for a config: ``hpc.checkpoint.read`` (a file, or a run folder's newest
that loads), then the model it holds compared with the config's (``megdet.specs.CheckpointIdentity``).

    path, state = read_for(cfg, "runs/demo/model_0000950.pt", ("model", "optimizer"), advice="...")
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from hpc import checkpoint
from megdet import config as config_mod
from megdet.specs import CheckpointIdentity

IDENTITY_KEYS = ("model_name",)


def read_for(cfg: config_mod.Config, where: os.PathLike, required_keys: Sequence[str], *, advice: str,
             warn: Optional[Callable[[str], None]] = None) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """(path, state) of the checkpoint at ``where`` ((None, None): a folder holding none);
    ``CheckpointError`` naming both models, then ``advice``, when it holds another model than ``cfg``'s."""
    options = {} if warn is None else {"warn": warn}
    path, state = checkpoint.read(where, tuple(required_keys) + IDENTITY_KEYS, **options)
    if state is None:
        return None, None
    mismatch = cfg.identity.mismatch(CheckpointIdentity.read(state), cfg.name)
    if mismatch is not None:
        raise checkpoint.CheckpointError(f"checkpoint {path} {mismatch}: {advice}")
    return path, state
