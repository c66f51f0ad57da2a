"""Across nodes, on a real multi-node Slurm in network namespaces (``tests.vcluster``, the ``vcluster``
fixture: 3 nodes of 4 declared CPUs, all sharing this machine's cores, so the ranks oversubscribe them):
the rendered job scripts under sbatch with MPICH's mpirun (Horovod) and srun (the torch engine),
cross-GPU BN groups inside and across nodes, a requeue onto other nodes, and the faults that only exist
across nodes (a lost node, a network partition, a name that does not resolve or resolves to loopback,
one rank's bad input)."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpc import checkpoint
from tests import vcluster as vcluster_mod
from tests.test_cgbn import _check_equivalence
from tests.test_jobs import render
from tests.multirank import REPO, RankResult

pytestmark = pytest.mark.multirank

JOB_WAIT_S = 240
STALL_S = 10          # MEGDET_STALL_TIMEOUT of the fault tests
EXIT_BOUND_S = 20     # every rank leaves within STALL_S plus this (the watchdog's grace, the launcher's teardown)
TINY = ("data.min_sizes=[64] data.max_size=64 data.test_min_size=64 data.images_per_rank=2 data.num_workers=0 "
        "model.bn_size=4 solver.warmup_iters=2 train.log_period=1 eval.images_per_rank=4")


def render_job(folder: Path, command: str, *, ranks: int, per_node: int, launcher: str = "mpirun",
               engine: str = "horovod", name: str = "job.sbatch", extra=()) -> Path:
    """``megdet job`` for CPU ranks on the virtual nodes (1 CPU per rank), running ``command``."""
    _, script = render(folder, "--scheduler", "slurm", "--cpu", "--ranks", str(ranks), "--ranks-per-node",
                       str(per_node), "--cpus-per-rank", "1", "--launcher", launcher, "--engine", engine,
                       "--config", "shapes_r18_cpu", "--time", "00:15:00", "--command", command, *extra, name=name)
    return script


def output_of(folder: Path, job_id: str):
    """The job's stdout and stderr (%x-%j.out / .err)."""
    [out] = folder.glob(f"*-{job_id}.out")
    return out.read_text(), out.with_suffix(".err").read_text()


def run_job(vcluster, job_env, folder: Path, script: Path, timeout: float = JOB_WAIT_S, **env):
    """sbatch ``script`` from ``folder``, wait for it to end: (JobInfo, stdout, stderr)."""
    job_id = vcluster.submit(script, cwd=folder, env=job_env(**env))
    info = vcluster.wait(job_id, timeout=timeout)
    return (info, *output_of(folder, job_id))


def train_command(shards: Path, max_iter: int, batch: int, extra: str = "", val: bool = False) -> str:
    return (f"megdet train shapes_r18_cpu {TINY} solver.batch_size={batch} solver.max_iter={max_iter} "
            f"solver.steps=[{max_iter - 1}] data.train={shards / 'train'} "
            f"data.val={shards / 'val' if val else ''} {extra} train.output_dir=\"$RUN_DIR\" \"${{RESUME_ARGS[@]}}\"")


def rank_processes(vcluster, node: str, folder: Path):
    """Pids of the rank processes (``python .../megdet``) and their watchdogs (``python -I
    .../watchdog.py``) of the job in ``folder`` on ``node``; not the launcher, whose command line also
    names megdet."""
    found = []
    for pid in vcluster.pids(node):
        try:
            argv = [Path(part.decode()).name for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if cwd == str(folder) and argv[0].startswith("python") and {"megdet", "watchdog.py"} & set(argv[1:3]):
            found.append(pid)
    return found


def wait_for(predicate, timeout: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(poll_s)


# -- the cluster itself -----------------------------------------------------------------------------------
def test_each_node_has_its_own_name_address_hosts_and_local_folder(vcluster):
    script = ('echo "$(hostname) $(ip -4 -o addr show eth0 | awk \'{print $4}\') $(getent hosts vnode3 | cut -d" " -f1)'
              f' $(ls {vcluster.node_local})"; touch {vcluster.node_local}/$(hostname)')
    done = vcluster.command(["srun", "--nodes=3", "--ntasks=3", "bash", "-c", script])
    rows = sorted(line.split() for line in done.stdout.splitlines())
    subnet = str(vcluster.subnet.network_address).rsplit(".", 1)[0]
    assert rows == [[f"vnode{k}", f"{subnet}.{k}/24", f"{subnet}.3"] for k in (1, 2, 3)], done.stdout
    for k in (1, 2, 3):  # each node saw an empty node-local folder and left one file in its own
        assert [p.name for p in (vcluster.folder / "nodes" / f"vnode{k}" / "local").iterdir()] == [f"vnode{k}"]


def test_up_is_idempotent_a_half_dead_cluster_is_restarted_and_down_leaves_nothing():
    with open(vcluster_mod.ROOT / "megdet-vcluster.lock", "w") as lock:
        import fcntl
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cluster = vcluster_mod.VirtualCluster(vcluster_mod.free_index(), nodes=2, cpus=2)
            cluster.up()
        except vcluster_mod.ClusterError as error:
            pytest.skip(f"no virtual cluster here: {error}")
    try:
        daemons = {name: cluster._pid(name) for name in cluster.pid_files}
        assert all(daemons.values()) and set(cluster.node_states().values()) == {"idle"}
        cluster.up()
        assert {name: cluster._pid(name) for name in cluster.pid_files} == daemons, "up again changes nothing"
        os.kill(daemons["slurmctld"], 9)  # a crash: half of the cluster is left
        wait_for(lambda: not vcluster_mod.alive(daemons["slurmctld"]), 10, "slurmctld's end")
        cluster.up()
        restarted = {name: cluster._pid(name) for name in cluster.pid_files}
        assert all(restarted.values()) and not set(restarted.values()) & set(daemons.values())
        assert not any(vcluster_mod.alive(pid) for pid in daemons.values()), "the old daemons were stopped"
    finally:
        cluster.down()
    names = [node.namespace for node in cluster.nodes]
    assert not set(names) & set(vcluster_mod.namespaces())
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert cluster.bridge not in links and not any(node.link in links for node in cluster.nodes)
    assert not any(vcluster_mod.alive(pid) for pid in restarted.values()) and not cluster.folder.exists()
    cluster.down()  # again: nothing to do, no error


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs the system's /usr/bin/python3, which "
                    "user nobody can run (this interpreter may sit under /root)")
def test_the_cluster_says_in_one_line_why_it_cannot_run():
    """As user nobody, with the system's Python (tests.vcluster needs only the standard library)."""
    done = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3", "-m", "tests.vcluster", "--index",
                           str(vcluster_mod.MAX_INDEX), "up"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"]})
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "vcluster: error: the virtual cluster needs root (network namespaces, mounts): run it as root"], done.stderr


# -- launching across nodes -------------------------------------------------------------------------------
@pytest.mark.parametrize("launcher, engine", [("mpirun", "horovod"), ("srun", "torch")])
def test_doctor_across_two_nodes_names_hosts_routes_and_times(vcluster, job_env, tmp_path, launcher, engine):
    script = render_job(tmp_path, "megdet doctor", ranks=4, per_node=2, launcher=launcher, engine=engine)
    info, out, err = run_job(vcluster, job_env, tmp_path, script)
    assert info.state == "COMPLETED", f"{info.state} {info.exit_code}\n{out}\n{err}"
    hosts = out.split("[job] Slurm job ")[1].split(" on ")[1].split("\n")[0].split()
    assert len(hosts) == 2, out
    # srun --mpi=pmi2 gives the ranks PMI variables: the doctor names the launch "mpirun" there too.
    assert f"world of 4 ranks, engine {engine}, launcher mpirun under slurm" in out, out + err
    for rank in range(4):
        assert f"   {rank}   {rank % 2}/2   {hosts[rank // 2]}  cpu" in out, out
    assert f"2 nodes: {hosts[0]} ranks 0, 1; {hosts[1]} ranks 2, 3" in out
    for rank in range(4):
        node = vcluster.by_name(hosts[rank // 2])
        assert (f"rank {rank} on {node.name}: reaches {hosts[0]} via eth0 {node.address}; Gloo address "
                f"{node.address} (eth0)") in out, out
    timed = [line for line in out.splitlines() if line.startswith("allreduce of 4 MiB")]
    assert len(timed) == 1 and all(f"{name} " in timed[0] for name in ("world", *(f"node {h}" for h in hosts)))
    print(f"[multinode] {launcher}/{engine}: {timed[0]}")


@pytest.mark.slow
@pytest.mark.parametrize("nodes, per_node, launcher, engine", [(2, 1, "srun", "torch"), (2, 2, "mpirun", "horovod")])
def test_a_rendered_job_trains_across_nodes_with_identical_replicas(vcluster, job_env, tmp_path, shapes_shards,
                                                                   nodes, per_node, launcher, engine):
    ranks = nodes * per_node
    script = render_job(tmp_path, train_command(shapes_shards, 3, 2 * ranks), ranks=ranks, per_node=per_node,
                        launcher=launcher, engine=engine)
    info, out, err = run_job(vcluster, job_env, tmp_path, script)
    assert info.state == "COMPLETED", f"{info.state} {info.exit_code}\n{out}\n{err}"
    hosts = out.split("[job] Slurm job ")[1].split(" on ")[1].split("\n")[0].split()
    assert f"megdet train: world of {ranks} ranks on 2 nodes ({per_node} per node)" in out, out + err
    spans = [f"{r * per_node}-{r * per_node + 1}" if per_node > 1 else str(r) for r in range(nodes)]
    assert f"  nodes: {hosts[0]} ranks {spans[0]}; {hosts[1]} ranks {spans[1]}" in out, out
    assert f"engines: gradients {engine}" in out
    assert f"parameters after iteration 1 identical on all {ranks} ranks (sha256 " in out, out + err
    assert f"megdet train: finished 3 iterations on {ranks} ranks" in out, out + err


def body_cgbn_groups(comm):
    """Cross-GPU BN over groups of 2 (inside a node) and of 4 (across the two nodes): the statistics
    and outputs equal BatchNorm's over the group's images concatenated; returns the hosts of each group."""
    import socket
    torch.set_num_threads(1)
    hosts = comm.allgather_object(socket.gethostname())
    for group_size in (2, 4):
        _check_equivalence(comm, group_size, [2, 1, 3, 2], f"groups of {group_size} across hosts {hosts}")
    return {"hosts": hosts}


def test_cgbn_groups_inside_a_node_and_across_nodes_equal_batchnorm(vcluster, job_env, tmp_path):
    command = f"{sys.executable} -m tests.multirank tests.test_multinode:body_cgbn_groups {tmp_path / 'ranks'} '{{}}' 1"
    (tmp_path / "ranks").mkdir()
    script = render_job(tmp_path, command, ranks=4, per_node=2, launcher="srun", engine="torch")
    info, out, err = run_job(vcluster, job_env, tmp_path, script)
    results = [RankResult(**pickle.loads((tmp_path / "ranks" / f"rank{r}.pkl").read_bytes())) for r in range(4)]
    assert info.state == "COMPLETED" and all(r.ok for r in results), f"{results}\n{out}\n{err}"
    hosts = results[0].value["hosts"]
    assert hosts[0] == hosts[1] != hosts[2] == hosts[3], hosts  # groups of 2 inside a node, of 4 across


# -- requeue onto other nodes -----------------------------------------------------------------------------
@pytest.mark.slow
def test_usr1_requeue_resumes_on_other_nodes_and_continues_exactly(vcluster, job_env, tmp_path, shapes_shards):
    """A straight 2-node run against one stopped by USR1 at its time limit: the requeued job, with one
    of its first nodes drained, runs on another node pair, resumes from the checkpoint and ends with
    the straight run's parameters."""
    max_iter = 8
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    for folder in (straight, interrupted):
        folder.mkdir()
    command = train_command(shapes_shards, max_iter, 4, "train.checkpoint_period=1000")
    info, out, err = run_job(vcluster, job_env, straight,
                             render_job(straight, command, ranks=2, per_node=1, launcher="srun", engine="torch"))
    assert info.state == "COMPLETED", f"{info.state}\n{out}\n{err}"

    script = render_job(interrupted, command, ranks=2, per_node=1, launcher="srun", engine="torch")
    job_id = vcluster.submit(script, cwd=interrupted, env=job_env())
    metrics = interrupted / "runs" / "shapes_r18_cpu" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, JOB_WAIT_S, "two iterations")
    first_nodes = vcluster.job(job_id).fields["NodeList"]
    drained = vcluster.command(["scontrol", "show", "hostnames", first_nodes]).stdout.split()[0]
    vcluster.command(["scontrol", "update", f"NodeName={drained}", "State=DRAIN", "Reason=megdet-test"])
    try:
        vcluster.command(["scancel", "--batch", "--signal=USR1", job_id])
        info = vcluster.wait(job_id, timeout=3 * JOB_WAIT_S)
    finally:
        vcluster.command(["scontrol", "update", f"NodeName={drained}", "State=RESUME"])
    out, err = output_of(interrupted, job_id)
    assert info.state == "COMPLETED" and info.restarts == 1, f"{info.state} {info.restarts}\n{out}\n{err}"
    runs = [line.split(" on ")[1].split() for line in out.splitlines() if line.startswith("[job] Slurm job")]
    assert len(runs) == 2 and drained in runs[0] and drained not in runs[1], runs
    # srun --kill-on-bad-exit takes rank 0's 75 as a failure and ends rank 1 (143) as it exits 75 too.
    assert "[job] ranks stopped (exit " in out and "megdet train: resumed from" in out, out + err
    ours = checkpoint.load(checkpoint.latest(interrupted / "runs" / "shapes_r18_cpu"))
    theirs = checkpoint.load(checkpoint.latest(straight / "runs" / "shapes_r18_cpu"))
    assert ours["iteration"] == theirs["iteration"] == max_iter
    for name, value in theirs["model"].items():
        assert torch.allclose(value.double(), ours["model"][name].double(), rtol=0, atol=1e-6), name
    print(f"[multinode] requeue: first run on {runs[0]}, resumed on {runs[1]} ({drained} drained)")


# -- faults across nodes ----------------------------------------------------------------------------------
def start_training(vcluster, job_env, folder: Path, shards: Path, *, extra: str = "", iterations: int = 400):
    """A 2 x 2 training job (mpirun, Horovod) that logs every iteration; returns (job id, its two hosts)
    once the ranks are in the training loop."""
    script = render_job(folder, train_command(shards, iterations, 8, extra), ranks=4, per_node=2)
    job_id = vcluster.submit(script, cwd=folder, env=job_env(MEGDET_STALL_TIMEOUT=str(STALL_S)))
    metrics = folder / "runs" / "shapes_r18_cpu" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().strip(), JOB_WAIT_S, f"job {job_id}'s first step")
    nodes = vcluster.command(["scontrol", "show", "hostnames", vcluster.job(job_id).fields["NodeList"]]).stdout.split()
    return job_id, nodes


def time_until_all_exit(vcluster, nodes, folder: Path, since: float, timeout: float) -> float:
    """Seconds from ``since`` until no rank process of the job in ``folder`` is left on ``nodes``."""
    wait_for(lambda: not any(rank_processes(vcluster, node, folder) for node in nodes), timeout,
             "the end of every rank process")
    return time.monotonic() - since


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["node lost", "partition mid-step", "partition mid-checkpoint"])
def test_every_rank_leaves_by_itself_when_a_node_is_lost_or_cut_off(vcluster, job_env, tmp_path, shapes_shards, fault):
    """2 x 2 ranks checkpointing every 2 iterations. A lost node (every process in its namespace
    killed, slurmd included) or a cut link (mid-step, or on rank 0's node while rank 0 writes a
    checkpoint): the ranks on both sides leave by themselves, the lines name the other side's host, and
    the last checkpoint loads."""
    job_id, nodes = start_training(vcluster, job_env, tmp_path, shapes_shards, extra="train.checkpoint_period=2")
    run = tmp_path / "runs" / "shapes_r18_cpu"
    wait_for(lambda: checkpoint.latest(run) is not None, JOB_WAIT_S, "the first checkpoint")
    victim = nodes[0] if fault == "partition mid-checkpoint" else nodes[1]  # rank 0's node, cut while it writes
    try:
        if fault == "partition mid-checkpoint":
            wait_for(lambda: any(checkpoint._TEMPORARY.match(p.name) for p in run.iterdir()), 120,
                     "the next checkpoint being written", poll_s=0.002)
        start = time.monotonic()
        if fault == "node lost":
            vcluster.kill_node(victim)
        else:
            vcluster.set_link(victim, up=False)
        took = time_until_all_exit(vcluster, nodes, tmp_path, start, STALL_S + EXIT_BOUND_S + 30)
    finally:
        vcluster.revive(victim)
    info = vcluster.wait(job_id, timeout=120)
    vcluster.revive(victim)  # Slurm may drain it once the job's end could not be cleaned up there
    out, err = output_of(tmp_path, job_id)
    lines = [line for line in err.splitlines() if "megdet train: error" in line]
    print(f"[faults] {fault} ({victim}): every rank process gone {took:.1f} s later; job {info.state}; "
          f"lines: {lines[:4]}")
    assert took < STALL_S + EXIT_BOUND_S, f"{took:.1f} s\n{out}\n{err}"
    assert info.state in ("FAILED", "NODE_FAIL", "CANCELLED"), info.state
    assert lines and all(line.startswith("megdet train: error (rank ") for line in lines), err  # each line whole
    assert any(victim in line for line in lines), err
    if fault != "node lost":  # the ranks on both sides of the cut speak, each naming the other side's host
        other = nodes[1] if victim == nodes[0] else nodes[0]
        assert any(other in line for line in lines) and any(victim in line for line in lines), err
    latest = checkpoint.latest(run)
    assert checkpoint.load(latest)["iteration"] % 2 == 0  # the last checkpoint loads


def hosts_without(vcluster, name: str) -> str:
    return "".join(line + "\n" for line in vcluster.hosts_text.splitlines() if not line.endswith(f" {name}"))


@pytest.mark.parametrize("fault", ["rank 0's host does not resolve", "a host resolves to loopback"])
def test_a_name_that_does_not_resolve_or_resolves_to_loopback_fails_the_launch_in_one_line(
        vcluster, job_env, tmp_path, fault):
    script = render_job(tmp_path, "megdet doctor", ranks=2, per_node=1, launcher="srun", engine="torch")
    job_id = vcluster.submit(script, cwd=tmp_path, env=job_env(MEGDET_RENDEZVOUS_TIMEOUT="60"))
    wait_for(lambda: vcluster.job(job_id).state != "PENDING", 60, "the job's start", poll_s=0.05)
    nodes = vcluster.command(["scontrol", "show", "hostnames", vcluster.job(job_id).fields["NodeList"]]).stdout.split()
    # too late for this job? The ranks start seconds after the batch shell: the hosts change first.
    broken = nodes[1]
    if fault == "rank 0's host does not resolve":
        vcluster.set_hosts(broken, hosts_without(vcluster, nodes[0]))
    else:
        vcluster.set_hosts(broken, hosts_without(vcluster, broken) + f"127.0.1.1 {broken}\n")
    started = time.monotonic()
    try:
        info = vcluster.wait(job_id, timeout=120, poll_s=0.2)
    finally:
        vcluster.set_hosts(broken, vcluster.hosts_text)
    took = time.monotonic() - started
    out, err = output_of(tmp_path, job_id)
    lines = [line for line in err.splitlines() if "megdet doctor: error" in line]
    print(f"[faults] {fault}: job {info.state} {took:.1f} s; lines: {lines}")
    assert info.state == "FAILED" and took < 60, f"{info.state} {took:.1f}\n{out}\n{err}"
    if fault == "rank 0's host does not resolve":
        assert any(f"rank 1 on {broken} cannot resolve rank 0's host '{nodes[0]}'" in line and "/etc/hosts" in line
                   for line in lines), err
    else:
        assert any(f"rank 1 on {broken} would be reached at 127.0.1.1, a loopback address" in line
                   and "GLOO_SOCKET_IFNAME" in line for line in lines), err


@pytest.mark.parametrize("launcher, bad_rank", [("srun", 1), ("mpirun", 0)])
def test_one_ranks_bad_input_ends_every_rank_at_once_with_its_line(vcluster, job_env, tmp_path, launcher, bad_rank):
    """One rank (only) names an interface its node lacks (GLOO_SOCKET_IFNAME=ib0) after the Horovod ranks
    and their watchdogs are up, as cross-GPU BN's torch engine starts. Under a plain srun (no
    --kill-on-bad-exit) the others used to wait out their timeout; under MPICH's mpirun the launcher's
    kill could cut the failing rank's own line. Every rank now ends within seconds, every rank's output
    carrying the failing rank's words."""
    launch = {"srun": "srun --mpi=pmi2 --nodes=2 --ntasks=4 --ntasks-per-node=2",
              "mpirun": 'mpirun -np 4 -ppn 2 -hosts "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd,)"'}
    script = tmp_path / "own.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=2 --cpus-per-task=1 --output=own-%j.out --error=own-%j.err
export MEGDET_CGBN_COMM=torch MEGDET_RENDEZVOUS_TIMEOUT=300
{launch[launcher]} bash -c 'if [[ ${{PMI_RANK:-$SLURM_PROCID}} == {bad_rank} ]]; then export GLOO_SOCKET_IFNAME=ib0; fi; exec megdet doctor'
""")
    started = time.monotonic()
    job_id = vcluster.submit(script, cwd=tmp_path, env=job_env())
    info = vcluster.wait(job_id, timeout=150, poll_s=0.2)
    took = time.monotonic() - started
    out, err = ((tmp_path / f"own-{job_id}.{kind}").read_text() for kind in ("out", "err"))
    lines = [line for line in err.splitlines() if "megdet doctor: error" in line]
    print(f"[faults] {launcher}: rank {bad_rank}'s bad input: job {info.state} {took:.1f} s; lines: {lines}")
    assert info.state == "FAILED" and took < 60, f"{info.state} {took:.1f}\n{out}\n{err}"
    cause = "GLOO_SOCKET_IFNAME=ib0 names no interface with an IPv4 address"
    others = [line for line in lines if f"rank {bad_rank} stopped on bad input: " in line and cause in line]
    assert others, err  # the other ranks carry the failing rank's words, whatever the launcher cut


# -- bad input --------------------------------------------------------------------------------------------
def test_a_script_for_two_nodes_on_three_and_too_many_ranks_per_node_are_refused(vcluster, job_env, tmp_path):
    script = render_job(tmp_path, "megdet doctor", ranks=2, per_node=1)
    job_id = vcluster.submit(script, cwd=tmp_path, env=job_env(), options=["--nodes=3"])
    info = vcluster.wait(job_id)
    out, err = output_of(tmp_path, job_id)
    assert info.state == "FAILED" and err.strip().splitlines() == [
        f"[job] error: this script was rendered for 2 nodes but the allocation has 3 "
        f"({' '.join(vcluster.command(['scontrol', 'show', 'hostnames', info.fields['NodeList']]).stdout.split())}): "
        "render it again with 'megdet job' for this allocation"], err
    crowded = render_job(tmp_path, "megdet doctor", ranks=8, per_node=8, name="crowded.sbatch")  # 8 CPUs, nodes of 4
    done = subprocess.run(["sbatch", str(crowded)], cwd=tmp_path, capture_output=True, text=True,
                          env={**job_env(), "SLURM_CONF": str(vcluster.conf)})
    # Slurm refuses it at submission, before any script runs: its own two lines name the cause.
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        "sbatch: error: CPU count per node can not be satisfied",
        "sbatch: error: Batch job submission failed: Requested node configuration is not available"], done.stderr


def test_nodes_that_disagree_on_the_shards_path_stop_every_rank_with_one_line(vcluster, job_env, tmp_path,
                                                                              shapes_shards):
    """The shards staged on one node's local disk only: the ranks of the other node name the path."""
    local = vcluster.folder / "nodes" / "vnode1" / "local" / "shards"
    subprocess.run(["cp", "-a", str(shapes_shards / "train"), str(local)], check=True)
    try:
        command = train_command(shapes_shards, 3, 4).replace(f"data.train={shapes_shards / 'train'}",
                                                             f"data.train={vcluster.node_local / 'shards'}")
        script = render_job(tmp_path, command, ranks=2, per_node=1, launcher="srun", engine="torch")
        job_id = vcluster.submit(script, cwd=tmp_path, env=job_env(), options=["--nodelist=vnode1,vnode2"])
        info = vcluster.wait(job_id)
    finally:
        subprocess.run(["rm", "-rf", str(local)], check=True)
    out, err = output_of(tmp_path, job_id)
    lines = [line for line in err.splitlines() if "megdet train: error" in line]
    print(f"[faults] shards on one node only: job {info.state}; lines: {lines}")
    assert info.state == "FAILED" and len(lines) == 2, f"{info.state}\n{out}\n{err}"
    assert all(str(vcluster.node_local / "shards") in line for line in lines), lines
    assert not (tmp_path / "runs" / "shapes_r18_cpu" / "config.yaml").exists(), "nothing written"
