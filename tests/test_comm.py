"""Every communicator call on every engine, on 2 and 3 real processes, groups included."""
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from hpc import comm as comm_mod
from hpc import launch
from tests.multirank import REPO, expect_ok, run_ranks

pytestmark = pytest.mark.multirank


def body_collectives(comm, world):
    """Each check compares with the value computed from the rank numbers alone."""
    n, r = comm.size, comm.rank
    assert n == world and 0 <= r < n, (n, r)
    assert comm.local_size == world and comm.local_rank == r  # all ranks on this host
    ranks = torch.arange(n, dtype=torch.float64)

    x = torch.tensor([r + 1.0, 2.0 * r])
    assert torch.equal(comm.allreduce(x), torch.tensor([float((ranks + 1).sum()), float(2 * ranks.sum())]))
    assert torch.allclose(comm.allreduce(x, op="average"), torch.tensor([float((ranks + 1).mean()),
                                                                          float(2 * ranks.mean())]))
    assert torch.equal(x, torch.tensor([r + 1.0, 2.0 * r])), "allreduce must not modify its input"

    # Differentiable: d/dx_r of sum_k (k+1) * <w, allreduce(x)_k> is sum_k (k+1) * w for sum.
    w = torch.tensor([1.0, -2.0, 3.0])
    leaf = torch.full((3,), float(r), requires_grad=True)
    (comm.allreduce(leaf * 2, op="sum") * w * (r + 1)).sum().backward()
    assert torch.allclose(leaf.grad, 2 * w * float((ranks + 1).sum())), leaf.grad
    leaf.grad = None
    (comm.allreduce(leaf, op="average") * w * (r + 1)).sum().backward()
    assert torch.allclose(leaf.grad, w * float((ranks + 1).mean())), leaf.grad

    inplace = torch.full((1000,), float(r))
    handle = comm.allreduce_async(inplace, op="sum")
    assert handle.wait() is inplace and torch.all(inplace == float(ranks.sum()))
    averaged = comm.allreduce_async(torch.full((5,), float(r)), op="average").wait()
    assert torch.allclose(averaged, torch.full((5,), float(ranks.mean())))

    # Uneven first dimension, rank 0 possibly empty-sized: rank k contributes k+1 rows of k.
    gathered = comm.allgather(torch.full((r + 1, 2), float(r)))
    expected = torch.cat([torch.full((k + 1, 2), float(k)) for k in range(n)])
    assert torch.equal(gathered, expected), gathered
    empty_on_zero = comm.allgather(torch.ones((0 if r == 0 else 1, 3)))
    assert empty_on_zero.shape == (n - 1, 3)
    assert comm.allgather_object({"rank": r, "name": "x" * r}) == [{"rank": k, "name": "x" * k} for k in range(n)]

    root = n - 1
    b = torch.full((4,), float(r))
    assert comm.broadcast(b, root=root) is b and torch.all(b == root)
    assert comm.broadcast_object({"from": r, "list": list(range(r))}, root=root) == \
        {"from": root, "list": list(range(root))}
    comm.barrier()

    # Groups: pairs [0,1], [2,...]; the world; a singleton that communicates nothing.
    pair = comm.new_group([0, 1])
    assert comm.new_group([1, 0]) is pair, "groups are cached by their ranks"
    assert comm.new_group(range(n)) is comm.world, "the whole world is the world group (Horovod refuses a copy)"
    if r in (0, 1):
        assert pair.rank == r and pair.size == 2
        assert comm.allreduce(torch.tensor([r + 10.0]), group=pair).item() == 21.0
        assert comm.allgather_object(r, group=pair) == [0, 1]
        assert comm.broadcast_object(f"from {r}", root=1, group=pair) == "from 1"
        comm.barrier(group=pair)
    else:
        assert pair.rank == -1
        with pytest.raises(comm_mod.CommError, match="not a member"):
            comm.allreduce(torch.ones(1), group=pair)
    half = comm.partition(1)
    assert half.ranks == (r,) and comm.allreduce(torch.tensor([5.0]), group=half).item() == 5.0
    whole = comm.partition(None)
    assert whole is comm.world
    if n % 3 == 0:
        trio = comm.partition(3)
        assert comm.allreduce(torch.tensor([1.0]), group=trio).item() == 3.0
    with pytest.raises(comm_mod.CommError, match="does not divide the world size"):
        comm.partition(n + 1)

    # Agreement: a failure on the last rank reaches everyone as the same error.
    comm.agree(None)
    with pytest.raises(comm_mod.CommError, match=f"rank {n - 1}: bad input on the last rank"):
        comm.agree("bad input on the last rank" if r == n - 1 else None)
    return {"engine": comm.engine, "rank": r}


@pytest.mark.parametrize("nprocs", [2, 3])
@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun", "torch"])
def test_every_collective(launcher, nprocs):
    values = expect_ok(run_ranks("tests.test_comm:body_collectives", nprocs, launcher, world=nprocs))
    expected_engine = "torch" if launcher == "torch" else "horovod"
    assert values == [{"engine": expected_engine, "rank": k} for k in range(nprocs)]


def test_torch_engine_under_mpirun_rendezvous_through_mpi4py():
    values = expect_ok(run_ranks("tests.test_comm:body_collectives", 2, "mpirun-torch", world=2))
    assert [v["engine"] for v in values] == ["torch", "torch"]


def test_torch_engine_under_horovodrun_rendezvous_through_horovod():
    values = expect_ok(run_ranks("tests.test_comm:body_collectives", 2, "horovodrun", world=2,
                                 env={"MEGDET_COMM": "torch"}))
    assert [v["engine"] for v in values] == ["torch", "torch"]


def body_raise_on_rank_one(comm):
    if comm.rank == 1:
        raise ValueError("rank 1 never joins the collective")
    comm.allreduce(torch.ones(1))


@pytest.mark.parametrize("launcher", ["torch", "horovodrun"])
def test_a_rank_that_skips_a_collective_times_out_instead_of_hanging(launcher):
    results = run_ranks("tests.test_comm:body_raise_on_rank_one", 2, launcher, timeout=60,
                        env={"MEGDET_COMM_TIMEOUT": "5", "HOROVOD_STALL_CHECK_TIME_SECONDS": "2"})
    assert "never joins" in results[1].error
    assert results[0].error is not None, "rank 0 must fail, not hang, when its peer skips the allreduce"


def body_a_failed_collective_in_one_line(comm, rank_one):
    """Rank 1 leaves (``rank_one="leaves"``: raises, its process exits in order) or is alive but stuck
    ("stuck": sleeps past the timeout); rank 0's allreduce fails, and ``failure_reason`` says why."""
    if comm.rank == 1:
        if rank_one == "stuck":
            time.sleep(float(os.environ["MEGDET_COMM_TIMEOUT"]) + 7)  # rank 0 fails at 5 s, explains by 8 s
        raise ValueError(f"rank 1 {rank_one}")
    try:
        comm.allreduce(torch.ones(1))
    except Exception as error:
        return comm_mod.failure_reason(error)


@pytest.mark.parametrize("rank_one", ["leaves", "stuck"])
def test_a_failed_collective_is_one_line_naming_the_rank_that_left(rank_one):
    results = run_ranks("tests.test_comm:body_a_failed_collective_in_one_line", 2, "torch", timeout=60,
                        rank_one=rank_one, env={"MEGDET_COMM_TIMEOUT": "5", "HOROVOD_STALL_CHECK_TIME_SECONDS": "2"})
    reason = results[0].value
    assert results[1].error == f"ValueError: rank 1 {rank_one}" and reason is not None and "\n" not in reason
    if rank_one == "leaves":
        assert re.fullmatch(r"a collective failed because rank 1 \(pid \d+ on \S+\) had exited \(.+\): that rank's "
                            r"own output says why; .+", reason), reason
    else:
        assert reason.startswith("a collective failed (") and "while no rank had died, stopped or exited: a live " \
            "rank did not join it within MEGDET_COMM_TIMEOUT=5 s" in reason, reason


def body_local_engine(comm):
    return None


def test_local_engine_under_a_launcher_names_the_fix():
    """A Gloo-only Horovod under mpirun runs each rank as a world of 1: the same as the local
    engine under mpirun. Every rank must stop with the fix in one line."""
    results = run_ranks("tests.test_comm:body_local_engine", 2, "mpirun", env={"MEGDET_COMM": "local"})
    for result in results:
        assert result.error.startswith("LaunchError: mpirun started 2 processes but the local engine "
                                       "sees a world of 1: set MEGDET_COMM=horovod"), result.error


def test_gloo_only_horovod_under_mpirun_message():
    started = launch.detect({"PMI_SIZE": "4", "PMI_RANK": "2"})
    with pytest.raises(launch.LaunchError, match="built without MPI: rebuild it with HOROVOD_WITH_MPI=1"):
        launch.check_world_size(started, "horovod", 1, mpi_built=False)


def test_launcher_detection_reads_each_launchers_variables():
    assert launch.detect({}) == launch.Launch("none", None, None, None, None, None)
    hvd = launch.detect({"HOROVOD_SIZE": "8", "HOROVOD_RANK": "3", "HOROVOD_LOCAL_RANK": "1",
                         "HOROVOD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_SIZE": "8"})
    assert (hvd.launcher, hvd.size, hvd.rank, hvd.local_rank, hvd.local_size) == ("horovodrun", 8, 3, 1, 4)
    ompi = launch.detect({"OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": "9", "PBS_JOBID": "7.pbs"})
    assert (ompi.launcher, ompi.size, ompi.rank, ompi.scheduler) == ("mpirun", 16, 9, "pbs")
    # MPICH's mpirun inside sbatch: its proxies run in a Slurm step that counts nodes, not ranks.
    hydra = launch.detect({"PMI_SIZE": "32", "PMI_RANK": "5", "SLURM_JOB_ID": "1", "SLURM_STEP_NUM_TASKS": "4"})
    assert (hydra.launcher, hydra.size, hydra.scheduler) == ("mpirun", 32, "slurm")
    srun = launch.detect({"SLURM_JOB_ID": "1", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "7",
                          "SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"})
    assert (srun.launcher, srun.size, srun.rank, srun.local_rank, srun.local_size) == ("srun", 8, 7, 3, None)
    torchrun = launch.detect({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert (torchrun.launcher, torchrun.size, torchrun.rank) == ("torchrun", 2, 1)


def test_matching_sizes_pass_and_every_mismatch_names_a_fix():
    started = launch.Launch("srun", 8, 0, 0, None, "slurm")
    launch.check_world_size(started, "horovod", 8, mpi_built=True)
    launch.check_world_size(launch.Launch("none", None, None, None, None, None), "local", 1)
    with pytest.raises(launch.LaunchError, match="different MPI libraries"):
        launch.check_world_size(started, "horovod", 1, mpi_built=True)
    with pytest.raises(launch.LaunchError, match="torchrun"):
        launch.check_world_size(started, "torch", 4)


def _one_process(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


def test_unknown_engine_is_one_line_naming_the_choices():
    done = _one_process("from hpc import comm; comm.init()", MEGDET_COMM="nccl2")
    assert done.returncode != 0
    assert "unknown communication engine 'nccl2': set MEGDET_COMM to one of horovod, torch, local" in done.stderr


def test_one_process_ignores_a_cgbn_engine_it_has_nothing_to_send_through():
    done = _one_process("from hpc import comm; comm.init(); print(comm.describe())", MEGDET_COMM="local",
                        MEGDET_CGBN_COMM="torch")
    assert done.returncode == 0 and done.stdout.strip() == "local", done.stderr


@pytest.mark.parametrize("main, cgbn", [("local", "nccl"), ("torch", "horovod")])
def test_cgbn_engine_that_does_not_go_with_the_main_one_is_one_line(main, cgbn):
    done = _one_process("from hpc import comm; comm.init()", MEGDET_COMM=main, MEGDET_CGBN_COMM=cgbn)
    assert done.returncode != 0
    assert (f"MEGDET_CGBN_COMM={cgbn!r} does not go with the {main} engine: use {main!r}, or 'torch' beside "
            "'horovod'") in done.stderr


def test_one_process_defaults_to_local_and_groups_of_one_communicate_nothing():
    c = comm_mod.LocalCommunicator()
    x = torch.ones(3, requires_grad=True)
    assert c.allreduce(x) is x and c.allgather_object("a") == ["a"] and c.broadcast_object(5) == 5
    assert c.partition(1) is c.world
    with pytest.raises(comm_mod.CommError, match="unknown reduction op 'max'"):
        c.allreduce(x, op="max")
    with pytest.raises(comm_mod.CommError, match=r"invalid group ranks \[0, 1\]"):
        c.new_group([0, 1])
    done = _one_process("from hpc import comm; c = comm.init(); print(c.engine, c.size)")
    assert done.returncode == 0 and done.stdout.split() == ["local", "1"], done.stderr
