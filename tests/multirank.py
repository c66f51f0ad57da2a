"""Run a test body on N real processes under a real launcher, with a timeout.

    from tests.multirank import run_ranks
    results = run_ranks("tests.test_comm:body_collectives", nprocs=2, launcher="horovodrun")

A body is a module-level function ``body(comm, **kwargs)`` (``comm`` from ``hpc.comm.init()``; None
when ``init=False`` and the body starts its own). Each rank's return value (picklable) or exception
comes back as a ``RankResult``. A run that outlives ``timeout`` is killed and fails the test: a hung
collective must never hang CI.

Launchers:
  horovodrun  ``horovodrun --gloo -np N``: Horovod over Gloo.
  mpirun      ``mpirun -np N``: Horovod over MPI (needs a Horovod built with MPI).
  torch       N processes with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR...): torch.distributed.
  mpirun-torch  ``mpirun -np N`` with MEGDET_COMM=torch (rendezvous through mpi4py).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
MEGDET = [sys.executable, "-m", "megdet.cli"]  # the megdet command of this checkout and interpreter
LAUNCHERS = ("horovodrun", "mpirun", "torch")
# The demo preset at test size: 64-pixel images (the shapes_shards fixture), 2 ranks x 2 images, 40 iterations.
TINY = ["data.min_sizes=[64]", "data.max_size=96", "data.test_min_size=64", "data.images_per_rank=2",
        "data.num_workers=0", "solver.batch_size=4", "model.bn_size=4", "solver.max_iter=40", "solver.steps=[30]",
        "solver.warmup_iters=5", "train.log_period=5", "train.checkpoint_period=20", "eval.images_per_rank=4"]
ENGINE_OF = {"horovodrun": "horovod", "mpirun": "horovod", "torch": "torch", "mpirun-torch": "torch"}


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error: Optional[str] = None  # "ExceptionType: message" when the body raised
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def horovod_skip_reason() -> Optional[str]:
    """Why Horovod launchers cannot run here, or None."""
    if shutil.which("horovodrun") is None:
        return "horovodrun is not on PATH: run 'bash scripts/setup.sh' (make test does)"
    return None


def mpirun_skip_reason() -> Optional[str]:
    if shutil.which("mpirun") is None:
        return "mpirun is not on PATH: run 'bash scripts/setup.sh' (installs the mpich wheel)"
    return horovod_skip_reason()


def skip_unless_launcher(launcher: str) -> None:
    reason = {"horovodrun": horovod_skip_reason, "mpirun": mpirun_skip_reason,
              "mpirun-torch": mpirun_skip_reason}.get(launcher, lambda: None)()
    if reason:
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """This process's environment without any launcher's or megdet's variables (a launched rank must
    see only its own launcher's), the checkout first on PYTHONPATH, one compute thread, and ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_", "PMI_", "HOROVOD_", "SLURM_", "PBS_", "MEGDET_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def run_megdet(args: Sequence[str], *, nprocs: int = 1, launcher: str = "horovodrun", timeout: float = 600,
               env: Optional[Dict[str, str]] = None, cwd: Path = REPO, threads: bool = False,
               **options) -> subprocess.CompletedProcess:
    """``megdet ARGS`` in a fresh process (``nprocs`` > 1: that many ranks under ``launcher``, skipped
    when it is missing), in ``base_env(env)``, output captured as text. ``threads``: leave
    OMP_NUM_THREADS unset (a command that shares the cores out itself)."""
    argv = [*MEGDET, *args]
    if nprocs > 1:
        skip_unless_launcher(launcher)
        argv = launch_command(launcher, nprocs, argv)
    environment = base_env(env)
    if threads:
        environment.pop("OMP_NUM_THREADS")
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment, **options)


def tiny_config(shards: Path, out: Path, val: bool = True) -> List[str]:
    """``megdet train`` arguments of the tiny demo on the shards under ``shards`` into ``out``."""
    return ["shapes_r18_cpu", *TINY, f"data.train={shards / 'train'}", f"data.val={shards / 'val' if val else ''}",
            f"train.output_dir={out}"]


def launch_command(launcher: str, nprocs: int, argv: List[str]) -> List[str]:
    """The command line that starts ``argv`` on ``nprocs`` local ranks under ``launcher``."""
    if launcher == "horovodrun":
        return ["horovodrun", "--gloo", "-np", str(nprocs), "-H", f"localhost:{nprocs}", *argv]
    if launcher in ("mpirun", "mpirun-torch"):
        return ["mpirun", "-np", str(nprocs), *argv]
    raise ValueError(f"no single command for launcher {launcher!r}")


def run_ranks(body: str, nprocs: int, launcher: str, *, timeout: float = 120, init: bool = True,
              env: Optional[Dict[str, str]] = None, **kwargs) -> List[RankResult]:
    """Run ``body`` ("module:function") on ``nprocs`` ranks under ``launcher``; one result per rank.

    Fails the calling test when the launch times out or a rank dies without reporting.
    """
    skip_unless_launcher(launcher)
    outdir = Path(tempfile.mkdtemp(prefix="megdet-ranks-"))
    argv = [sys.executable, "-m", "tests.multirank", body, str(outdir), json.dumps(kwargs), "1" if init else "0"]
    env = base_env({"MEGDET_COMM": ENGINE_OF[launcher], "MEGDET_COMM_TIMEOUT": str(int(timeout)), **(env or {})})
    try:
        if launcher == "torch":
            port = free_port()
            procs = [subprocess.Popen(argv, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      env={**env, "RANK": str(r), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(r),
                                           "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1",
                                           "MASTER_PORT": str(port)})
                     for r in range(nprocs)]
        else:
            procs = [subprocess.Popen(launch_command(launcher, nprocs, argv), cwd=REPO, start_new_session=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)]
        logs = _wait_all(procs, timeout, f"{body} on {nprocs} ranks under {launcher}")
        results = []
        for rank in range(nprocs):
            path = outdir / f"rank{rank}.pkl"
            if not path.exists():
                pytest.fail(f"rank {rank} of {body} under {launcher} reported nothing; output:\n{logs}")
            results.append(RankResult(**pickle.loads(path.read_bytes())))
        return results
    finally:
        shutil.rmtree(outdir, ignore_errors=True)


def _wait_all(procs: List[subprocess.Popen], timeout: float, what: str) -> str:
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            logs.append(out)
    except subprocess.TimeoutExpired:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        partial = "\n".join(p.communicate()[0] or "" for p in procs)
        pytest.fail(f"{what} did not finish in {timeout:.0f} s (hung collective?); output:\n{partial[-4000:]}")
    return "\n".join(logs)


def expect_ok(results: List[RankResult]) -> List[Any]:
    """The ranks' return values; fails with every rank's traceback if any rank raised."""
    failed = [r for r in results if not r.ok]
    if failed:
        pytest.fail("\n".join(f"rank {r.rank}: {r.error}\n{r.traceback}" for r in failed))
    return [r.value for r in results]


def _rank_main(body: str, outdir: str, kwargs_json: str, init: str) -> int:
    from hpc import launch

    module_name, function_name = body.split(":")
    rank = launch.detect().rank or 0
    result = {"rank": rank}  # a plain dict: this module runs as __main__ here
    comm = None
    try:
        import importlib

        function = getattr(importlib.import_module(module_name), function_name)
        if init == "1":
            from hpc import comm as comm_mod

            comm = comm_mod.init()
            result["rank"] = rank = comm.rank
        result["value"] = function(comm, **json.loads(kwargs_json))
        if comm is not None:
            comm.barrier()  # Horovod shuts down for everyone when the first rank exits
    except BaseException as error:  # report every failure, the test decides what was expected
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()
    Path(outdir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(*sys.argv[1:]))
