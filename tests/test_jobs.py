"""``megdet job``: the committed scripts equal a fresh render, every preset's arithmetic, bash -n and
shellcheck, one-line errors before any file is written, and a PBS script run for real under an
emulated PBS environment (no PBS server is packaged here) with 2 local MPI ranks."""
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc import batch_scripts
from megdet import cli, config
from megdet import memory_model
from megdet.job import PAPER_JOBS, README, paper_readme, paper_scripts, paper_table
from tests.multirank import MEGDET, skip_unless_launcher
from tests.slurm import ensure_debian_packages

SCHEDULERS = sorted(batch_scripts.SCHEDULERS)


def megdet_job(*options):
    """``megdet job OPTIONS`` through the command line's own entry point, in this process (fast)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["job", *options])
    return subprocess.CompletedProcess(["megdet", "job", *options], code, out.getvalue(), err.getvalue())


def render(tmp_path, *options, name="job.sh"):
    """The script ``megdet job OPTIONS -o FILE`` writes (and FILE)."""
    path = tmp_path / name
    done = megdet_job(*options, "-o", str(path))
    assert done.returncode == 0, done.stderr
    return path.read_text(), path


def directive(text, pattern):
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return match.groups()


# -- what is committed ---------------------------------------------------------------------------------

def test_committed_scripts_equal_a_fresh_render():
    rendered = paper_scripts()
    committed = {path for scheduler, suffix in batch_scripts.SCHEDULERS.items()
                 for path in (batch_scripts.TEMPLATES.parent / scheduler).glob(f"*.{suffix}")}
    assert committed == set(rendered), "jobs/ holds other scripts than PAPER_JOBS: run 'megdet job --regenerate'"
    stale = [path.name for path, text in rendered.items() if path.read_text() != text]
    assert not stale, f"{stale} differ from a fresh render: run 'megdet job --regenerate' and commit jobs/"


def test_the_readme_table_is_rendered_with_the_scripts_and_agrees_with_them():
    assert README.read_text() == paper_readme(), "jobs/README.md's table is stale: run 'megdet job --regenerate'"
    rows = {row.split(" | ")[0].strip("|` "): row for row in paper_table().splitlines()[2:]}
    assert len(rows) == len(PAPER_JOBS)
    for path, text in paper_scripts().items():
        used, total = directive(text, r"^#   memory: about ([\d.]+) GB of the ([\d.]+) GB per GPU")
        assert f"| {used} of {total} GB" in rows[path.stem], (path.name, rows[path.stem])


def test_every_committed_script_fits_the_gpu_its_header_names():
    for path in paper_scripts():
        text = path.read_text()
        preset, = directive(text, r"^# Rendered by: megdet job .* --config (\S+)")
        used, total = map(float, directive(text, r"^#   memory: about ([\d.]+) GB of the ([\d.]+) GB per GPU"))
        assert used <= total == config.load(preset).paper.gpu_memory_gb, path.name


def test_paper_scripts_are_every_row_that_gives_its_gpus_on_those_gpus():
    names = {path.name for path in paper_scripts()}
    # The rows of the tables that name a GPU count: MegDet Table 3, LargeDet Tables 2, 4 and 5.
    rows = [name for name in config.PRESETS
            if re.match(r"(MegDet Table 3|LargeDet Table [245])", config.load(name).paper.row)]
    assert sorted(PAPER_JOBS) == sorted(rows) and len(rows) == 42
    for scheduler, suffix in batch_scripts.SCHEDULERS.items():
        assert {f"{name}-{config.load(name).paper.gpus}gpu.{suffix}" for name in rows} == {
            name for name in names if name.endswith(suffix)}
        # Table 3's own rows at 16, 32 and 128 GPUs, not batch 256 squeezed onto them (16 and 8 images per GPU).
        assert {f"megdet_r50_fpn_bs64_bn32-16gpu.{suffix}", f"megdet_r50_fpn_bs128_bn32-32gpu.{suffix}",
                f"megdet_r50_fpn_bs256_bn16-128gpu.{suffix}"} <= names
        assert not any(name.startswith("megdet_r50_fpn_bs256_bn32-") and "-64gpu" not in name for name in names)
    headline = paper_scripts()[batch_scripts.TEMPLATES.parent / "slurm" / "megdet_r50_fpn_bs256_bn16-128gpu.sbatch"]
    assert "batch 256 = 128 GPUs x 2 images; cross-GPU BN size 16 (8 GPUs per group, inside one node)" in headline
    assert "time 4.1 h" in headline and directive(headline, r"^#SBATCH --nodes=(\d+)$") == ("16",)
    twelve_min = paper_scripts()[batch_scripts.TEMPLATES.parent / "slurm" / "largedet_coco_12min-160gpu.sbatch"]
    assert directive(twelve_min, r"^#SBATCH --nodes=(\d+)$") == ("10",)
    assert directive(twelve_min, r"^#SBATCH --ntasks-per-node=(\d+)$") == ("16",)
    assert "batch 320 = 160 GPUs x 2 images" in twelve_min and "LR 0.4 " in twelve_min
    assert "time 11m53s" in twelve_min and "LargeDet Table 4" in twelve_min


# -- every preset ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("preset", config.PRESETS)
def test_every_preset_renders_with_consistent_arithmetic(tmp_path, preset, scheduler):
    cfg = config.load(preset)
    gpus, per_node = cfg.paper.gpus, min(cfg.paper.gpus, cfg.paper.gpus_per_node)
    on_cpu = ["--cpu"] if cfg.paper.gpu_memory_gb is None else []  # the demo
    text, _ = render(tmp_path, "--scheduler", scheduler, "--gpus", str(gpus), "--config", preset, "--node-local-bn",
                     *on_cpu)
    if scheduler == "slurm":
        nodes, = directive(text, r"^#SBATCH --nodes=(\d+)$")
        tasks, = directive(text, r"^#SBATCH --ntasks-per-node=(\d+)$")
        gres, = (tasks,) if on_cpu else directive(text, r"^#SBATCH --gres=gpu:(\d+)$")
    else:
        select = r"^#PBS -l select=(\d+):ncpus=(\d+):mpiprocs=(\d+)(?::ngpus=(\d+))?$"
        nodes, cpus, tasks, gres = directive(text, select)
        gres = gres or tasks
        assert int(cpus) == int(tasks) * (3 if cfg.data.num_workers is None else cfg.data.num_workers + 1)
    assert int(nodes) * int(tasks) == gpus and int(tasks) == int(gres) == per_node
    assert directive(text, r"^NODES=(\d+)$") == (nodes,) and directive(text, r"^RANKS_PER_NODE=(\d+)$") == (tasks,)
    assert "RANKS=$((NODES * RANKS_PER_NODE))" in text
    batch, per_rank = cfg.solver.batch_size, cfg.data.images_per_rank
    assert batch % gpus == 0 and batch // gpus == per_rank
    assert f"batch {batch} = {gpus} {'CPU ranks' if on_cpu else 'GPUs'} x {per_rank} images" in text
    assert f"LR {cfg.solver.lr:g} ({cfg.solver.optimizer})" in text and cfg.paper.row in text
    if cfg.model.norm == "cgbn":  # asked for node-local groups: each group inside one node
        group = cfg.bn_groups.group_size or gpus
        assert per_node % group == 0
        assert f"BN size {cfg.model.bn_size or batch} ({group} GPUs per group, inside one node)" in text
    launch, = directive(text, r"^  (megdet train .*) &$")
    node_local = "" if cfg.model.bn_node_local else "model.bn_node_local=true "  # what --node-local-bn adds
    assert launch == (f'megdet train {preset} {node_local}train.output_dir="$RUN_DIR" "${{RESUME_ARGS[@]}}"')
    if not on_cpu:  # the paper's images per GPU fit the paper's GPU as the preset recomputes
        used, total = map(float, directive(text, r"^#   memory: about ([\d.]+) GB of the ([\d.]+) GB per GPU"))
        assert used <= total == cfg.paper.gpu_memory_gb and "added to fit" not in text
    assert directive(text, r"^RUN_DIR=\"(.*)\"$") == (cfg.train.output_dir,)


def test_the_batch_is_spread_over_other_gpu_counts_and_passed_to_train(tmp_path):
    text, _ = render(tmp_path, "--scheduler", "slurm", "--gpus", "32")
    assert directive(text, r"^#SBATCH --nodes=(\d+)$") == ("4",)
    assert "batch 256 = 32 GPUs x 8 images" in text and "(4 GPUs per group, inside one node)" in text
    assert "megdet train megdet_r50_fpn_bs256_bn32 data.images_per_rank=8 " in text
    assert "the paper: 64 GPUs x 4 images, 8 per node, time 7.2 h" in text
    assert directive(text, r"^#   memory: about ([\d.]+) GB of the 12 GB per GPU \(megdet.memory_model\), res3 recomputed$")


def test_images_that_do_not_fit_get_recomputed_stages_or_are_refused(tmp_path):
    """Batch 64 with BN 64 on 8 GPUs: 8 images each, half-precision activations (train.amp=auto). A 7 GB
    GPU needs res4 recomputed too."""
    text, _ = render(tmp_path, "--scheduler", "slurm", "--gpus", "8", "--config", "megdet_r50_fpn_bs64_bn64",
                     "--gpu-memory", "7")
    used, = directive(text, r"^#   memory: about ([\d.]+) GB of the 7 GB per GPU \(megdet.memory_model\), res3, res4 "
                            r"recomputed: res4 added to fit 8 images$")
    assert float(used) <= 7
    assert "megdet train megdet_r50_fpn_bs64_bn64 'model.sublinear_stages=[res3,res4]' " in text
    assert "--config megdet_r50_fpn_bs64_bn64 --gpu-memory 7\n" in text, "the header's command renders it again"
    cfg = config.load("megdet_r50_fpn_bs64_bn64", ["model.sublinear_stages=[res3,res4]"])
    assert memory_model.fit(cfg, 7).gib == pytest.approx(float(used), abs=0.05)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_staging_queue_account_and_cpu_ranks(tmp_path, scheduler):
    text, _ = render(tmp_path, "--scheduler", scheduler, "--gpus", "32", "--data", "/lustre/coco shards",
                     "--stage-to-local", "/local/coco", "--queue", "gpu", "--account", "proj42", "--time", "00:30:00")
    assert 'DATA="/lustre/coco shards"' in text and 'LOCAL_DATA="/local/coco"' in text
    assert 'cp -a "$DATA/." "$LOCAL_DATA/"' in text and 'data.train="$DATA"' in text
    assert text.index("LOCAL_DATA=") < text.index("megdet train")
    if scheduler == "slurm":
        assert "#SBATCH --partition=gpu" in text and "#SBATCH --account=proj42" in text
        assert "#SBATCH --time=00:30:00" in text and "#SBATCH --signal=B:USR1@120" in text
        assert "#SBATCH --output=%x-%j.out" in text and "#SBATCH --requeue" in text
    else:
        assert "#PBS -q gpu" in text and "#PBS -A proj42" in text and "#PBS -l walltime=00:30:00" in text
    cpu, _ = render(tmp_path, "--scheduler", scheduler, "--gpus", "2", "--cpu", "--config", "shapes_r18_cpu",
                    "--cpus-per-rank", "1", name="cpu.sh")
    assert "gpu" not in "\n".join(line for line in cpu.splitlines() if line.startswith(("#SBATCH", "#PBS")))
    assert "export OMP_NUM_THREADS=1" in cpu and "2 CPU ranks = 1 node x 2" in cpu


# -- shell checks ---------------------------------------------------------------------------------------

def variants(tmp_path):
    """The committed scripts and one of every launcher x scheduler with every option."""
    paths = list(paper_scripts())
    for scheduler in SCHEDULERS:
        for launcher in batch_scripts.LAUNCHERS:
            if launcher == "srun" and scheduler != "slurm":
                continue
            _, path = render(tmp_path, "--scheduler", scheduler, "--gpus", "32", "--launcher", launcher, "--data",
                             "/d", "--stage-to-local", "/l", "--queue", "q", "--account", "a",
                             name=f"{scheduler}-{launcher}.sh")
            paths.append(path)
    return paths


def test_every_script_parses_with_bash_n(tmp_path):
    for path in variants(tmp_path):
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, f"{path}: {done.stderr}"


@pytest.fixture(scope="session")
def shellcheck():
    """The shellcheck command, installed first (as root, with apt-get) when missing."""
    reason = ensure_debian_packages(("shellcheck",), ("shellcheck",))
    if reason:
        pytest.skip(f"no shellcheck: {reason}")
    return shutil.which("shellcheck")


def test_every_script_is_shellcheck_clean(tmp_path, shellcheck):
    done = subprocess.run([shellcheck, "--shell=bash", *map(str, variants(tmp_path))], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# -- bad input --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, says", [
    (["--gpus", "12", "--gpus-per-node", "8"], "12 GPUs do not fill nodes of 8 GPUs"),
    (["--gpus", "48"], "does not split over 48 GPUs"),
    (["--gpus", "128"], "model.bn_node_local asks for BN groups inside one node, but model.bn_size=32 is 16 ranks"),
    (["--gpus", "8"], "32 images of 800x1333 per GPU need about 15.3 GB even with res3, res4, res5 recomputed, more "
                      "than the 12 GB per GPU (--gpu-memory): spread the batch over 16 GPUs or more (16 images each)"),
    (["--gpus", "64", "--gpu-memory", "2"], "; 1 image needs 2.1 GB: no layout fits, use GPUs with at least 2.1 GB"),
    (["--gpus", "2", "--config", "shapes_r18_cpu"], "names no paper GPU (paper.gpu_memory_gb is null): give the "
                                                    "memory of one GPU, e.g. --gpu-memory 32, or --cpu"),
    (["--gpus", "64", "--gpu-memory", "0"], "--gpu-memory 0 must be the positive memory of one GPU in GB"),
    (["--gpus", "64", "--config", "megdet_r50_fpn_bs265_bn32"], "unknown preset 'megdet_r50_fpn_bs265_bn32'"),
    (["--gpus", "64", "--time", "25:61:00"], "time limit '25:61:00' is not HH:MM:SS"),
    (["--gpus", "64", "--time", "2h"], "time limit '2h' is not HH:MM:SS"),
    (["--gpus", "64", "--launcher", "srun", "--scheduler", "pbs"], "launcher srun needs Slurm"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, options, says):
    out = tmp_path / "job.sh"
    argv = ["--scheduler", "slurm", *options] if "--scheduler" not in options else options
    done = megdet_job(*argv, "-o", str(out))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megdet job: error: ") and says in lines[0], done.stderr
    assert not out.exists()


def test_the_megdet_process_exits_2_and_writes_nothing(job_env, tmp_path):
    out = tmp_path / "job.sh"
    done = subprocess.run([*MEGDET, "job", "--scheduler", "slurm", "--gpus", "12", "--gpus-per-node", "8", "-o",
                           str(out)], capture_output=True, text=True, timeout=120, env=job_env())
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "12 GPUs do not fill nodes of 8 GPUs" in done.stderr and not out.exists()


def test_time_limits():
    for good in ("24:00:00", "00:30:00", "100:00:00", "0:00:01"):
        assert batch_scripts.check_time(good) == good
    for bad in ("00:00:00", "1:60:00", "12:00", "1-00:00:00", ""):
        with pytest.raises(batch_scripts.JobError):
            batch_scripts.check_time(bad)


# -- PBS, emulated ----------------------------------------------------------------------------------------

@pytest.fixture
def run_pbs(job_env):
    """``run_pbs(script, folder, hosts, **popen_options)``: ``bash script`` as PBS would start it:
    PBS_NODEFILE with ``hosts``, PBS_JOBID, PBS_O_WORKDIR."""
    def run_pbs(script, folder, hosts, **kwargs):
        nodefile = folder / "nodefile"
        nodefile.write_text("".join(f"{host}\n" for host in hosts))
        env = job_env(PBS_NODEFILE=str(nodefile), PBS_JOBID="4242.pbs-emulated", PBS_O_WORKDIR=str(folder))
        return subprocess.Popen(["bash", str(script)], cwd="/", env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **kwargs)
    return run_pbs


@pytest.mark.multirank
def test_pbs_script_runs_two_ranks_and_stages_the_shards_under_emulated_pbs(run_pbs, tmp_path):
    skip_unless_launcher("mpirun")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-00000.h5").write_bytes(b"shard")
    local = tmp_path / "local"
    _, script = render(tmp_path, "--scheduler", "pbs", "--gpus", "2", "--cpu", "--cpus-per-rank", "1", "--config",
                       "shapes_r18_cpu", "--data", "shards", "--stage-to-local", str(local),
                       "--command", "megdet doctor")
    proc = run_pbs(script, tmp_path, ["localhost", "localhost"])
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "[job] PBS job 4242.pbs-emulated on localhost" in out
    assert "world of 2 ranks, engine horovod, launcher mpirun under pbs" in out
    assert "allreduce over the world and over groups (" in out
    assert len(re.findall(r"^\s+\d\s+\d/2\s+\S+\s+cpu \(\d+ cores\)$", out, re.MULTILINE)) == 2, out
    assert (local / "train-00000.h5").read_bytes() == b"shard"


def test_pbs_script_refuses_an_allocation_of_other_nodes_before_launching(run_pbs, tmp_path):
    _, script = render(tmp_path, "--scheduler", "pbs", "--gpus", "2", "--cpu", "--cpus-per-rank", "1", "--config",
                       "shapes_r18_cpu", "--command", "touch launched")
    proc = run_pbs(script, tmp_path, ["node1", "node1", "node2", "node2"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "rendered for 1 nodes but the allocation has 2 (node1 node2)" in out
    assert not (tmp_path / "launched").exists()


@pytest.mark.multirank
def test_pbs_script_forwards_usr1_to_every_rank(run_pbs, tmp_path):
    """The same trap as under Slurm; qrerun (the PBS requeue) does not exist here, so only the forward."""
    skip_unless_launcher("mpirun")
    _, script = render(tmp_path, "--scheduler", "pbs", "--gpus", "2", "--cpu", "--cpus-per-rank", "1", "--config",
                       "shapes_r18_cpu", "--command",
                       f'{sys.executable} -m tests.rank_probe reports "$RUN_DIR" "${{RESUME_ARGS[@]}}"')
    proc = run_pbs(script, tmp_path, ["localhost", "localhost"])
    ready = [tmp_path / f"reports/rank{rank}-run0.ready" for rank in range(2)]
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in ready) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert "[job] USR1: stopping the ranks" in out, out
    for rank in range(2):
        report = (tmp_path / f"reports/rank{rank}-run0.json").read_text()
        assert '"signals": ["SIGUSR1"]' in report, out
    assert (tmp_path / "runs/shapes_r18_cpu/probe.pt").exists()
    assert "requeueing job 4242.pbs-emulated" in out
    assert 'qsub "$PBS_O_WORKDIR/job.sh"' in script.read_text()  # submits itself again (no qsub here)
