"""Start a benchmark's ranks under a launcher from a single ``megdet bench NAME`` process, and
combine the ranks' timings.

A benchmark run without a launcher (``megdet bench cgbn --ranks 2``) calls ``run_ranks`` once per
engine (and per setting); each launch writes its own results folder and the rows are merged.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Hashable, List, Optional, Sequence

from hpc import comm as comm_mod
from hpc.errors import UserError

ENGINES = ("horovod", "torch")


def parse_engines(text: str) -> List[str]:
    """The comma-separated engine list of ``--engines``; UserError for an unknown or empty one."""
    engines = [e for e in text.split(",") if e]
    if not engines or set(engines) - set(ENGINES):
        raise UserError(f"Invalid --engines: {text!r}; use a comma-separated subset of {', '.join(ENGINES)}")
    return engines


def parse_ranks(text: str) -> List[int]:
    """The sorted rank counts of ``--ranks`` ("1,2"); UserError unless each is an integer >= 1."""
    try:
        ranks = sorted({int(part) for part in text.split(",")})
    except ValueError:
        ranks = []
    if not ranks or ranks[0] < 1:
        raise UserError(f"Invalid --ranks: {text!r}; give rank counts >= 1, comma-separated, e.g. --ranks 1,2")
    return ranks


def run_ranks(name: str, engine: str, ranks: int, out: Path, argv: Sequence[str],
              env: Optional[Dict[str, str]] = None) -> List[Dict]:
    """Run ``megdet bench NAME --out=OUT ARGV...`` on ``ranks`` local ranks of ``engine``
    (horovodrun over Gloo, or torchrun); returns the rows it wrote to ``OUT/NAME.json``."""
    module = [sys.executable, "-m", "megdet.cli", "bench", name, f"--out={out}", *argv]
    if engine == "horovod":
        command = ["horovodrun", "--gloo", "-np", str(ranks), "-H", f"localhost:{ranks}", *module]
    else:
        # torchrun through this interpreter: a venv on a system torch has no torchrun script of its own
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   *module[1:]]
    if shutil.which(command[0]) is None:
        raise UserError(f"{command[0]} is not on PATH: activate the environment that has Horovod and torch "
                        f"(bash scripts/setup.sh), or pass --engines without {engine}")
    print(f"megdet bench {name}: {' '.join(command)}", flush=True)
    done = subprocess.run(command, env={**os.environ, "MEGDET_COMM": engine, **(env or {})})
    if done.returncode != 0:
        raise UserError(f"megdet bench {name} on {ranks} {engine} ranks exited with status {done.returncode} "
                        "(its own error is printed above)")
    return json.loads((Path(out) / f"{name}.json").read_text())["rows"]


def slowest_rank(comm: comm_mod.Communicator, seconds: Dict[Hashable, List[float]]) -> Dict[Hashable, List[float]]:
    """Per key and timed step, the slowest rank's seconds (a synchronous step waits for it); every
    rank passes its own ``seconds`` with the same keys and step counts (a collective)."""
    everyone = comm.allgather_object(seconds)
    return {key: [max(times) for times in zip(*(rank[key] for rank in everyone))] for key in seconds}
