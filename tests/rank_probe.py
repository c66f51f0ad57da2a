"""A rank program for the job-script tests: it reports what the batch job delivered to each rank.

    mpirun -np 2 python -m tests.rank_probe REPORT_DIR RUN_DIR [--resume]

Every rank writes REPORT_DIR/rank<R>-run<N>.json (N = $SLURM_RESTART_COUNT, 0 outside Slurm) with its
arguments and the signals it received. Without --resume it first writes rank<R>-run<N>.ready, then waits
up to WAIT_S for USR1, and on USR1 does what a training run does before the time limit: rank 0 writes
a checkpoint RUN_DIR/probe.pt, and every rank exits 0. With --resume it reports at once.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from hpc import launch

WAIT_S = 150


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    received = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signal.Signals(signum).name))
    rank = launch.detect().rank or 0
    run = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    stem = args.report_dir / f"rank{rank}-run{run}"
    args.report_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        stem.with_suffix(".ready").touch()
        deadline = time.monotonic() + WAIT_S
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
        if received and rank == 0:
            args.run_dir.mkdir(parents=True, exist_ok=True)
            (args.run_dir / "probe.pt").write_text("checkpoint")
    stem.with_suffix(".json").write_text(json.dumps({"rank": rank, "run": run, "resume": args.resume,
                                                     "signals": received}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
