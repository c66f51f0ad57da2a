"""Faults at scale in real ``megdet train`` runs of 2 ranks, under each launcher: a rank killed or crashed
mid-step or while it writes a checkpoint, a rank stopped (SIGSTOP), a checkpoint onto a full disk, a
corrupt record in a shard. Each must end every process within seconds, with one line naming the fault
on every rank that lives to print it, a non-zero exit and nothing half-written; --resume then goes on.
Each test prints the figures docs/reliability.md lists (``pytest -s``).

One launch per launcher and fault, on 64-pixel synthetic shapes, one image per rank and a few steps.
"""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import h5py
import psutil
import pytest

from hpc import checkpoint
from hpc.shards import DistributedShardSampler, ShardDataset
from tests.multirank import MEGDET, free_port, launch_command, skip_unless_launcher
from tests.test_faults import largest_size, small_disk
from tests.test_shards import flip_byte

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
TINY = ["data.min_sizes=[64]", "data.max_size=64", "data.images_per_rank=1", "data.num_workers=0",
        "solver.batch_size=2", "model.bn_size=2", "solver.max_iter=30", "solver.steps=[20]", "solver.warmup_iters=2",
        "train.log_period=1", "train.checkpoint_period=1000", "data.val="]
# The launcher's name here -> (launcher of tests.multirank, MEGDET_COMM)
LAUNCHERS = {"horovodrun": ("horovodrun", "horovod"), "mpirun": ("mpirun", "horovod"), "torch": ("torch", "torch"),
             "horovodrun-torch": ("horovodrun", "torch")}
RANK_VARIABLES = ("HOROVOD_RANK", "PMI_RANK", "RANK")
EXIT_WITHIN_S = 60  # every process of the run, whatever MEGDET_COMM_TIMEOUT is
STALL_TIMEOUT_S = 5
HOST = socket.gethostname()


class Run:
    """``megdet train`` on 2 ranks under a launcher, in ``launch_env(env)`` (the fixture's function); its
    processes, and their output in files."""

    def __init__(self, launch_env, launcher: str, args: List[str], folder: Path, **env: str):
        kind, engine = LAUNCHERS[launcher]
        skip_unless_launcher(kind)
        self.launcher, self.folder = launcher, folder
        env = launch_env({"MEGDET_COMM": engine, "MEGDET_COMM_TIMEOUT": "600", **env})
        argv = [*MEGDET, "train", "shapes_r18_cpu", *TINY, *args]
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "torch":
            port = str(free_port())
            self.procs = [self._start(argv, {**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                             "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                             "MASTER_PORT": port}, f"rank{r}") for r in range(2)]
        else:
            self.procs = [self._start(launch_command(kind, 2, argv), env, "launcher")]
        self.started = time.monotonic()

    def _start(self, argv, env, name) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        # cwd: the run's folder, where a core file of a crashed rank would go
        return subprocess.Popen(argv, cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def ranks(self) -> Dict[int, psutil.Process]:
        """The rank processes, by rank (horovodrun starts each through a shell, mpirun through a proxy)."""
        found = {}
        for child in self.every_process():
            try:  # a loader worker has its rank's command line: its parent is a rank
                if "megdet.cli" in child.cmdline() and "megdet.cli" not in child.parent().cmdline():
                    environ = child.environ()
                    found[int(next(environ[v] for v in RANK_VARIABLES if v in environ))] = child
            except (psutil.NoSuchProcess, StopIteration):
                pass
        return found

    def every_process(self) -> List[psutil.Process]:
        """The launcher, the ranks, their watchdogs and loader workers, as they are now."""
        procs = [psutil.Process(p.pid) for p in self.procs]
        return procs + [child for proc in procs for child in proc.children(recursive=True)]

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if any(p.poll() is not None for p in self.procs):
                pytest.fail(f"the run ended before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-4000:]}")
            time.sleep(0.005)

    def kill(self, rank: int, signum: int) -> float:
        """Send ``signum`` to rank ``rank``'s process; then wait until every process has exited (failing
        after EXIT_WITHIN_S) and return how many seconds that took."""
        ranks = self.ranks()
        assert sorted(ranks) == [0, 1], f"rank processes {sorted(ranks)}:\n{self.output()[-3000:]}"
        self.pids = {r: p.pid for r, p in ranks.items()}
        everyone = self.every_process()
        faulted = time.monotonic()
        os.kill(self.pids[rank], signum)
        return self.wait_all(everyone, faulted)

    def wait_all(self, everyone: List[psutil.Process], since: float) -> float:
        """Seconds from ``since`` until the last of ``everyone`` had exited (polled every 10 ms); the
        launcher's (or, for the torch launcher, the last rank's) in ``self.launcher_exit_s``."""
        started = {proc.pid: proc for proc in self.procs}
        pending = list(everyone)
        exited: Dict[int, float] = {}
        while pending and time.monotonic() < since + EXIT_WITHIN_S:
            for proc in list(pending):
                if proc.pid in started:
                    gone = started[proc.pid].poll() is not None  # reaped here, for its exit status
                else:
                    try:
                        gone = proc.status() == psutil.STATUS_ZOMBIE
                    except psutil.NoSuchProcess:
                        gone = True
                if gone:
                    exited[proc.pid] = time.monotonic() - since
                    pending.remove(proc)
            time.sleep(0.01)
        for proc in pending:
            proc.kill()
        assert not pending, f"still running {EXIT_WITHIN_S} s after the fault: {pending}\n{self.output()[-4000:]}"
        self.launcher_exit_s = max(exited[pid] for pid in started)
        return max(exited.values())

    def finish(self, timeout: float = 300) -> float:
        """Wait for the run to end by itself; its wall seconds."""
        for proc in self.procs:
            proc.wait(timeout=timeout)
        return time.monotonic() - self.started

    def output(self) -> str:
        return "\n".join((self.folder / f"{name}.log").read_text(errors="replace")
                         for name in ("launcher", "rank0", "rank1") if (self.folder / f"{name}.log").exists())

    @property
    def returncodes(self) -> List[int]:
        return [p.returncode for p in self.procs]


def error_lines(output: str) -> List[str]:
    return [line for line in output.splitlines() if "megdet train: error" in line]


def assert_no_traceback_from_a_rank(output: str) -> None:
    """The ranks print no traceback (horovodrun's own report of the failed processes is one)."""
    rank_lines = [line for line in output.splitlines() if not line.startswith(("Traceback", "  ", "RuntimeError"))]
    assert not any("Traceback (most recent call last)" in line for line in rank_lines), output[-4000:]


def assert_only_complete_checkpoints(folder: Path) -> None:
    for path in checkpoint.checkpoints(folder):
        checkpoint.check_integrity(path)


@pytest.fixture(scope="session")
def start_run(launch_env):
    """``start_run(launcher, args, folder, **env)``: a ``Run`` in the launch environment."""
    return functools.partial(Run, launch_env)


@pytest.fixture(scope="module")
def shards(shapes_shards):
    """The session's training shards (tests/conftest.py)."""
    return shapes_shards / "train"


def corrupt_copy(shards: Path, out: Path, rank: int, iteration: int, images_per_rank: int = 1) -> Dict[str, int]:
    """A copy of ``shards`` in which the first image that rank ``rank`` reads at ``iteration`` (2 ranks,
    seed 0) has one flipped byte; that record's image id, index in its shard, and shard."""
    out.mkdir()
    for path in shards.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    dataset = ShardDataset(str(out))
    sampler = DistributedShardSampler(dataset.aspect_groups, batch_size=images_per_rank, rank=rank, world_size=2,
                                      seed=0)
    sampler.set_epoch(0)
    index = int(list(sampler)[iteration][0])
    shard = dataset.shard_paths[int(dataset.shard_of[index])]
    with h5py.File(shard, "r") as handle:
        data_start = handle["images/data"].id.get_offset()
    flip_byte(shard, data_start + int(dataset._offset[index]) + int(dataset._length[index]) // 2)
    return {"image_id": int(dataset.image_ids[index]), "record": int(dataset.local_index[index]), "shard": shard}


def metrics_lines(folder: Path) -> List[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---- 1. a rank dies mid-step -------------------------------------------------------------------------

@pytest.mark.parametrize("launcher, signum", [("horovodrun", signal.SIGKILL), ("mpirun", signal.SIGSEGV),
                                              ("torch", signal.SIGKILL)])
def test_a_rank_that_dies_mid_step_ends_every_process_at_once_naming_it(start_run, shards, tmp_path, launcher, signum):
    run = start_run(launcher, [f"data.train={shards}", f"train.output_dir={tmp_path / 'run'}"], tmp_path)
    run.wait_for(lambda: metrics_lines(tmp_path / "run"), "the first step")
    took = run.kill(1, signum)
    output = run.output()
    print(f"[faults] {launcher}: {signum.name} of rank 1 mid-step: launcher exited in {run.launcher_exit_s:.2f} s, "
          f"every process in {took:.2f} s, exit status {run.returncodes}; lines: {error_lines(output)}")
    assert all(code != 0 for code in run.returncodes), run.returncodes
    dead = f"rank 1 (pid {run.pids[1]} on {HOST}) died: its process ended without exiting in order"
    lines = error_lines(output)
    if launcher == "mpirun":  # MPICH's mpirun kills rank 0 within ~0.1 s, often before it can print
        assert dead in output or f"PID {run.pids[1]} RUNNING AT {HOST}" in output, output[-3000:]
    else:
        assert len(lines) == 1 and f"(rank 0/2): {dead}" in lines[0], output[-3000:]
    if launcher == "horovodrun":
        assert "Process name: 1\nExit code: 137" in output or "Process 1 exit with status code 137" in output
    assert_no_traceback_from_a_rank(output)
    assert not list((tmp_path / "run").glob("model_*.pt")), "no checkpoint was due"


def test_rank_zero_killed_while_it_writes_a_checkpoint_leaves_the_previous_one_and_resume_goes_on(
        start_run, shards, tmp_path):
    """The demo's launch (the torch engine under horovodrun). SIGKILL of rank 0 in the middle of writing
    checkpoint 3 leaves checkpoint 2 the latest, complete. The resume that follows meets checkpoint 2
    truncated (as a disk that failed would leave it): it skips it with a warning naming it, continues
    from checkpoint 1, keeps the newest 2 (train.keep_checkpoints), removes the torn file, and meets a
    corrupt record that data.skip_corrupt=true leaves out and counts."""
    out = tmp_path / "run"
    args = [f"train.output_dir={out}", "train.checkpoint_period=1", "train.keep_checkpoints=2", "solver.max_iter=4",
            "solver.steps=[3]", "data.images_per_rank=2", "solver.batch_size=4", "model.bn_size=4"]
    run = start_run("horovodrun-torch", [*args, f"data.train={shards}"], tmp_path / "first")
    torn = out / ".model_0000003.pt.*.tmp"
    run.wait_for(lambda: largest_size(str(torn)) > 2**23, "checkpoint 3 half-written")
    took = run.kill(0, signal.SIGKILL)
    output = run.output()
    print(f"[faults] horovodrun-torch: SIGKILL of rank 0 while it writes a checkpoint: every process exited in "
          f"{took:.2f} s, exit status {run.returncodes}; lines: {error_lines(output)}")
    assert not (out / "model_0000003.pt").exists(), "the checkpoint was complete before rank 0 was killed"
    assert run.returncodes[0] != 0
    assert f"rank 0 (pid {run.pids[0]} on {HOST}) died" in output, output[-3000:]
    assert checkpoint.latest(out) == out / "model_0000002.pt" and len(list(out.glob(torn.name))) == 1
    assert_only_complete_checkpoints(out)
    assert_no_traceback_from_a_rank(output)

    latest = out / "model_0000002.pt"
    os.truncate(latest, latest.stat().st_size // 3)
    corrupt = corrupt_copy(shards, tmp_path / "corrupt", rank=1, iteration=2, images_per_rank=2)
    resumed = start_run("horovodrun-torch", [*args, f"data.train={tmp_path / 'corrupt'}", "data.skip_corrupt=true",
                                       "--resume"], tmp_path / "second")
    took = resumed.finish()
    output = resumed.output()
    print(f"[faults] resume after it, the latest checkpoint truncated: {took:.1f} s, exit {resumed.returncodes}")
    assert resumed.returncodes == [0], output[-4000:]
    assert (f"megdet train: warning: skipping a checkpoint: checkpoint {latest} cannot be read" in output
            and f"resumed from {out / 'model_0000001.pt'} at iteration 1" in output), output[-4000:]
    assert "finished 4 iterations on 2 ranks" in output
    assert f"warning: skipped image id {corrupt['image_id']} in {corrupt['shard']}" in output
    assert [(line["iter"], line["corrupt_records"]) for line in metrics_lines(out)] == [(1, 0), (2, 0), (3, 1), (4, 0)]
    assert sorted(p.name for p in out.iterdir() if "model" in p.name) == ["model_0000003.pt", "model_0000004.pt"]


# ---- 2. a rank hangs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("launcher", ["horovodrun", "torch"])
def test_a_stopped_rank_ends_the_run_after_the_stall_timeout_naming_it(start_run, shards, tmp_path, launcher):
    run = start_run(launcher, [f"data.train={shards}", f"train.output_dir={tmp_path / 'run'}"], tmp_path,
              MEGDET_STALL_TIMEOUT=str(STALL_TIMEOUT_S))
    run.wait_for(lambda: metrics_lines(tmp_path / "run"), "the first step")
    took = run.kill(1, signal.SIGSTOP)
    output = run.output()
    lines = error_lines(output)
    print(f"[faults] {launcher}: SIGSTOP of rank 1 (MEGDET_STALL_TIMEOUT={STALL_TIMEOUT_S}, MEGDET_COMM_TIMEOUT=600): "
          f"every process exited in {took:.2f} s, exit status {run.returncodes}; lines: {lines}")
    stopped = f"rank 1 (pid {run.pids[1]} on {HOST}) has been stopped for {STALL_TIMEOUT_S} s (SIGSTOP or a debugger"
    assert len(lines) == 2 and all(stopped in line for line in lines), output[-4000:]
    assert {re.search(r"\(rank (\d)/2\)", line).group(1) for line in lines} == {"0", "1"}
    assert all(code != 0 for code in run.returncodes)
    assert STALL_TIMEOUT_S - 1 < took < STALL_TIMEOUT_S + 20
    assert_no_traceback_from_a_rank(output)


# ---- 3. a full disk under a checkpoint ---------------------------------------------------------------

def test_a_checkpoint_onto_a_full_disk_stops_every_rank_and_keeps_the_previous_one(
        launch_env, start_run, shards, tmp_path):
    """Rank 0's second checkpoint does not fit: every rank stops with the one line (the torch launcher,
    where nothing kills the others for them), the first checkpoint intact. A --resume of another model
    is refused by name; one that finds no checkpoint it can load says so."""
    with small_disk(tmp_path / "disk", size="1g") as disk:
        out = disk / "run"
        args = [f"data.train={shards}", f"train.output_dir={out}", "train.checkpoint_period=1"]
        run = start_run("torch", args, tmp_path / "logs")
        run.wait_for(lambda: (out / "model_0000001.pt").exists(), "the first checkpoint")
        used = sum(p.stat().st_size for p in out.iterdir())
        subprocess.run(["mount", "-o", f"remount,size={used + 2**25}", str(disk)], check=True)  # 32 MiB left
        took = run.wait_all(run.every_process(), time.monotonic())
        output = run.output()
        lines = error_lines(output)
        print(f"[faults] torch: checkpoint onto a full disk: every process exited {took:.1f} s after the disk was "
              f"filled (a step, and the save, included), exit status {run.returncodes}; lines: {lines}")
        assert run.returncodes == [2, 2], output[-4000:]
        full = f"cannot write checkpoint {out / 'model_0000002.pt'}: no space left on device ("
        assert len(lines) == 2 and all(full in line and "(model_0000001.pt is intact)" in line for line in lines), lines
        assert "(rank 1/2): rank 0: cannot write" in output
        assert sorted(p.name for p in out.iterdir() if "model" in p.name) == ["model_0000001.pt"], "a partial file"
        checkpoint.load(out / "model_0000001.pt")

        def resume_alone(*overrides):
            done = subprocess.run([*MEGDET, "train", "shapes_r18_cpu", *TINY, *args, "model.bn_size=null",
                                   "solver.batch_size=1", *overrides, "--resume"], env=launch_env(None),
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 2 and len(error_lines(done.stderr)) == 1, done.stderr[-3000:]
            return error_lines(done.stderr)[0]

        assert resume_alone("model.name=resnet50_fpn") == (
            f"megdet train: error: checkpoint {out / 'model_0000001.pt'} holds a resnet18_fpn with 3 classes, but "
            "shapes_r18_cpu builds a resnet50_fpn with 3: resume with the config that wrote it, or start a new "
            "output_dir"), "another model's checkpoint is an error, not skipped"
        os.truncate(out / "model_0000001.pt", 1000)
        assert resume_alone().startswith(
            f"megdet train: error: no checkpoint in {out} can be loaded: all 1 are truncated, corrupt or incomplete "
            f"(the newest: checkpoint {out / 'model_0000001.pt'} cannot be read")


# ---- 4. a corrupt record in a shard ------------------------------------------------------------------

def test_a_corrupt_record_stops_every_rank_naming_shard_record_and_image(start_run, shards, tmp_path):
    """Rank 1 reads it in its DataLoader worker at the first step; every rank stops before the forward
    pass, each with the one line."""
    corrupt = corrupt_copy(shards, tmp_path / "corrupt", rank=1, iteration=0)
    run = start_run("horovodrun", [f"data.train={tmp_path / 'corrupt'}", f"train.output_dir={tmp_path / 'run'}",
                             "data.num_workers=1"], tmp_path)
    took = run.finish()
    output = run.output()
    lines = error_lines(output)
    print(f"[faults] horovodrun: a corrupt record read by rank 1: {took:.1f} s in all, exit status "
          f"{run.returncodes}; lines: {lines}")
    named = (f"rank 1: Checksum mismatch: image id {corrupt['image_id']} in {corrupt['shard']} (record "
             f"{corrupt['record']} of that shard")
    assert run.returncodes != [0] and len(lines) == 2 and all(named in line for line in lines), output[-4000:]
    assert all("data.skip_corrupt=true" in line for line in lines)
    assert_no_traceback_from_a_rank(output)
    assert not metrics_lines(tmp_path / "run"), "no step ran"
