"""Rendered job scripts on a real one-node Slurm (tests/slurm.py starts it): sbatch, the launch inside the
allocation under each launcher, Horovod over MPI, output files per job id, USR1 forwarded to the ranks,
``scontrol requeue`` and the resumed second run."""
import json
import os
import signal
import sys
import time

import psutil
import pytest

from tests.test_jobs import render

pytestmark = pytest.mark.multirank

# The launcher matrix runs the doctor (seconds per job); the train tests below run `megdet train`.
RANK_COMMAND = "megdet doctor"
JOB_WAIT_S = 180
TINY_TRAIN = ("data.min_sizes=[64] data.max_size=64 data.test_min_size=64 data.images_per_rank=2 "
              "data.num_workers=0 solver.batch_size=4 model.bn_size=4 solver.warmup_iters=2 train.log_period=2 "
              "eval.images_per_rank=4")


def render_cpu_job(tmp_path, command, *options):
    """``megdet job`` for 2 CPU ranks on one node of the test Slurm (1 core each, no GPUs)."""
    _, script = render(tmp_path, "--scheduler", "slurm", "--gpus", "2", "--cpu", "--cpus-per-rank", "1",
                       "--config", "shapes_r18_cpu", "--time", "00:10:00", "--command", command, *options,
                       name="job.sbatch")
    return script


def output_of(tmp_path, job_id):
    """The job's stdout and stderr files, named by job name and id (%x-%j)."""
    out, err = (tmp_path / f"shapes_r18_cpu-2cpu-{job_id}.{kind}" for kind in ("out", "err"))
    assert out.exists() and err.exists(), sorted(p.name for p in tmp_path.iterdir())
    return out.read_text(), err.read_text()


@pytest.mark.parametrize("launcher", ["mpirun", "srun", "horovodrun"])
def test_a_rendered_job_runs_two_ranks_under_sbatch(slurm, job_env, tmp_path, launcher):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-00000.h5").write_bytes(b"shard")
    local = tmp_path / "node-local"
    script = render_cpu_job(tmp_path, RANK_COMMAND, "--launcher", launcher, "--data", "shards",
                            "--stage-to-local", str(local))
    job_id = slurm.submit(script, cwd=tmp_path, env=job_env())
    info = slurm.wait(job_id, timeout=JOB_WAIT_S)
    out, err = output_of(tmp_path, job_id)
    assert info.state == "COMPLETED" and info.exit_code == "0:0", f"{info.state} {info.exit_code}\n{out}\n{err}"
    assert f"[job] Slurm job {job_id} (restart 0) on {slurm.node}" in out
    # srun --mpi=pmi2 gives the ranks PMI variables, so the doctor names the launch "mpirun" there too.
    engine_launcher = "horovodrun" if launcher == "horovodrun" else "mpirun"
    assert f"world of 2 ranks, engine horovod, launcher {engine_launcher} under slurm" in out, out + err
    assert "allreduce over the world and over groups (" in out
    assert (local / "train-00000.h5").read_bytes() == b"shard"  # staged once on the node before the launch
    assert "[job] exit status 0" in out


def test_usr1_reaches_every_rank_and_the_requeued_job_resumes(slurm, job_env, tmp_path):
    """USR1 as ``--signal=B:USR1@120`` delivers it (to the batch shell only: ``scancel --batch``) reaches
    both ranks through the script and mpirun; the script requeues the job; the second run (restart 1)
    resumes from the checkpoint the first one wrote."""
    command = f'{sys.executable} -m tests.rank_probe reports "$RUN_DIR" "${{RESUME_ARGS[@]}}"'
    job_id = slurm.submit(render_cpu_job(tmp_path, command), cwd=tmp_path, env=job_env())
    ready = [tmp_path / f"reports/rank{rank}-run0.ready" for rank in range(2)]
    deadline = time.monotonic() + JOB_WAIT_S
    while not all(path.exists() for path in ready):
        if time.monotonic() > deadline or slurm.job(job_id).state not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"the ranks of job {job_id} never became ready: {slurm.job(job_id).state}\n"
                        f"{output_of(tmp_path, job_id)}")
        time.sleep(0.5)
    slurm.command(["scancel", "--batch", "--signal=USR1", job_id])

    second = tmp_path / "reports/rank0-run1.json"
    while not second.exists() and time.monotonic() < deadline + JOB_WAIT_S:
        time.sleep(0.5)
    info = slurm.wait(job_id, timeout=JOB_WAIT_S)
    out, err = output_of(tmp_path, job_id)
    assert info.state == "COMPLETED" and info.restarts == 1, f"{info.state} restarts {info.restarts}\n{out}\n{err}"
    reports = {(r, n): json.loads((tmp_path / f"reports/rank{r}-run{n}.json").read_text())
               for r in range(2) for n in range(2)}
    checkpoint = "runs/shapes_r18_cpu/probe.pt"
    for rank in range(2):
        assert reports[rank, 0] == {"rank": rank, "run": 0, "resume": False, "signals": ["SIGUSR1"]}
        assert reports[rank, 1] == {"rank": rank, "run": 1, "resume": True, "signals": []}
    # Both runs append to the same output file (--open-mode=append).
    assert "[job] USR1: stopping the ranks" in out and f"requeueing job {job_id}" in out
    assert f"[job] Slurm job {job_id} (restart 1)" in out and f"(newest file: {checkpoint})" in out


def train_command(shards, max_iter, val=True):
    return (f'megdet train shapes_r18_cpu {TINY_TRAIN} solver.max_iter={max_iter} solver.steps=[{max_iter - 1}] '
            f'train.checkpoint_period=1000 data.train={shards / "train"} data.val={shards / "val" if val else ""} '
            'train.output_dir="$RUN_DIR" "${RESUME_ARGS[@]}"')


def submit_training(slurm, env, tmp_path, shards, max_iter):
    """Submit a CPU job that trains ``max_iter`` iterations without evaluation; return its id once the
    first metrics line is written (the ranks are in the training loop)."""
    job_id = slurm.submit(render_cpu_job(tmp_path, train_command(shards, max_iter, val=False)), cwd=tmp_path,
                          env=env)
    metrics = tmp_path / "runs" / "shapes_r18_cpu" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_WAIT_S
    while not (metrics.exists() and metrics.read_text().strip()):
        if time.monotonic() > deadline or slurm.job(job_id).state not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job_id} never started training: {slurm.job(job_id).state}\n"
                        f"{output_of(tmp_path, job_id)}")
        time.sleep(0.2)
    return job_id


def test_a_rendered_job_trains_on_two_ranks_under_sbatch(slurm, job_env, tmp_path, shapes_shards):
    job_id = slurm.submit(render_cpu_job(tmp_path, train_command(shapes_shards, 6)), cwd=tmp_path, env=job_env())
    info = slurm.wait(job_id, timeout=JOB_WAIT_S)
    out, err = output_of(tmp_path, job_id)
    assert info.state == "COMPLETED" and info.exit_code == "0:0", f"{info.state} {info.exit_code}\n{out}\n{err}"
    assert "megdet train: finished 6 iterations on 2 ranks" in out, out + err
    assert "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]" in out


def test_usr1_checkpoints_the_training_and_the_requeued_job_finishes_it(slurm, job_env, tmp_path, shapes_shards):
    """The real cycle: training runs, USR1 before the time limit, every rank stops at one iteration and
    rank 0 checkpoints (exit 75), the script requeues the job, the second run resumes and finishes."""
    job_id = submit_training(slurm, job_env(), tmp_path, shapes_shards, 60)
    slurm.command(["scancel", "--batch", "--signal=USR1", job_id])
    info = slurm.wait(job_id, timeout=3 * JOB_WAIT_S)
    out, err = output_of(tmp_path, job_id)
    assert info.state == "COMPLETED" and info.restarts == 1, f"{info.state} restarts {info.restarts}\n{out}\n{err}"
    assert "megdet train: stop signal: checkpoint" in out and f"requeueing job {job_id}" in out, out + err
    assert "[job] ranks stopped (exit 75)" in out
    assert "megdet train: resumed from" in out and "megdet train: finished 60 iterations on 2 ranks" in out, out + err


def test_a_rank_killed_inside_a_job_fails_the_job_at_once(slurm, job_env, tmp_path, shapes_shards):
    """SIGKILL of rank 1 of a training job (mpirun in the allocation): the job ends FAILED within seconds,
    its output naming the rank that died."""
    job_id = submit_training(slurm, job_env(), tmp_path, shapes_shards, 60)
    [rank1] = [p for p in psutil.process_iter() if _is_rank(p, tmp_path, 1)]
    killed = time.monotonic()
    os.kill(rank1.pid, signal.SIGKILL)
    info = slurm.wait(job_id, timeout=60, poll_s=0.2)
    took = time.monotonic() - killed
    out, err = output_of(tmp_path, job_id)
    print(f"[faults] sbatch + mpirun: SIGKILL of rank 1: job {info.state} ({info.exit_code}) {took:.1f} s later; "
          f"lines: {[line for line in err.splitlines() if 'error' in line]}")
    assert info.state == "FAILED" and info.exit_code != "0:0", f"{info.state} {info.exit_code}\n{out}\n{err}"
    assert (f"rank 1 (pid {rank1.pid} on {slurm.node}) died" in err
            or f"PID {rank1.pid} RUNNING AT {slurm.node}" in out + err), out + err
    assert "[job] exit status" in out and took < 30


def _is_rank(proc, folder, rank: int) -> bool:
    """Whether ``proc`` is rank ``rank`` of the ``megdet train`` started in ``folder`` (not a loader worker)."""
    try:
        return ("train" in proc.cmdline() and proc.cwd() == str(folder) and proc.environ().get("PMI_RANK") == str(rank)
                and "train" not in proc.parent().cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
