"""`megdet doctor` under real launchers, and the one-line errors a bad launch gets on every rank."""
import subprocess
import textwrap

import pytest

from tests.multirank import REPO, skip_unless_launcher

pytestmark = pytest.mark.multirank


@pytest.fixture
def run_script(launch_env):
    """``run_script(argv, timeout=120, **env)``: ``argv`` from the checkout in the launch environment."""
    def run_script(argv, timeout=120, **env):
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=launch_env(env))
    return run_script


@pytest.mark.parametrize("launcher", ["horovodrun", "mpirun"])
def test_doctor_reports_every_rank_under_a_real_launcher(run_megdet, launcher):
    skip_unless_launcher(launcher)
    done = run_megdet(["doctor"], nprocs=3, launcher=launcher, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"world of 3 ranks, engine horovod, launcher {launcher}" in done.stdout
    assert "allreduce over the world and over groups (" in done.stdout and "cpu tensors): ok" in done.stdout
    rows = [line for line in done.stdout.splitlines() if line.split("]")[-1].split(":")[-1].strip()[:1].isdigit()
            and "/3" in line]
    assert len(rows) == 3, done.stdout


def one_line_errors(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


def test_local_engine_under_mpirun_is_one_line_per_rank_naming_the_fix(run_megdet):
    skip_unless_launcher("mpirun")
    done = run_megdet(["doctor", "--engine", "local"], nprocs=2, launcher="mpirun", timeout=120,
                      env={"PYTHONUNBUFFERED": "1"})
    assert done.returncode != 0
    lines = one_line_errors(done.stderr)
    assert sorted(lines) == [
        f"megdet doctor: error (rank {r}/2): mpirun started 2 processes but the local engine sees a world of 1: "
        "set MEGDET_COMM=horovod (or torch) so the ranks talk to each other" for r in (0, 1)], done.stderr


def test_unknown_engine_is_one_line_and_exit_2(run_megdet):
    done = run_megdet(["doctor"], timeout=120, env={"MEGDET_COMM": "nccl2"})
    assert done.returncode == 2
    assert one_line_errors(done.stderr) == [
        "megdet doctor: error: unknown communication engine 'nccl2': set MEGDET_COMM to one of horovod, torch, local"]


def test_horovod_without_pytorch_support_names_the_install(run_megdet, tmp_path):
    """A Horovod whose torch extension failed to build raises ImportError on `import horovod.torch`;
    this package in front of the real one behaves the same way."""
    fake = tmp_path / "horovod" / "torch"
    fake.mkdir(parents=True)
    (tmp_path / "horovod" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text(textwrap.dedent("""\
        raise ImportError("Extension horovod.torch has not been built: /x/mpi_lib_v2.so not found")
    """))
    done = run_megdet(["doctor"], timeout=120, env={"MEGDET_COMM": "horovod", "PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert done.returncode == 2
    lines = one_line_errors(done.stderr)
    assert len(lines) == 1 and "Horovod with PyTorch support is not importable" in lines[0], done.stderr
    assert "bash scripts/setup.sh" in lines[0] and "MEGDET_COMM=torch" in lines[0]


CHECK_BUILD = REPO / "scripts" / "check_horovod_build.sh"


def test_build_check_accepts_the_installed_horovod(run_script):
    skip_unless_launcher("horovodrun")
    done = run_script(["bash", str(CHECK_BUILD)])
    assert done.returncode == 0 and "Horovod has PyTorch, MPI and Gloo" in done.stdout, done.stderr


def test_build_check_refuses_a_gloo_only_horovod_and_names_the_fix(run_script, tmp_path):
    """What a Horovod built without MPI prints; set-up must stop there, not at the first mpirun."""
    horovodrun = tmp_path / "horovodrun"
    horovodrun.write_text("#!/bin/sh\nprintf '[X] PyTorch\\n[ ] MPI\\n[X] Gloo\\n'\n")
    horovodrun.chmod(0o755)
    done = run_script(["bash", str(CHECK_BUILD)], PATH=f"{tmp_path}:/usr/bin:/bin")
    assert done.returncode == 1
    assert one_line_errors(done.stderr) == [
        "[setup] error: Horovod was built without MPI: delete the cached wheel (~/.cache/megdet/wheels) and "
        "rerun 'MEGDET_FORCE_SETUP=1 bash scripts/setup.sh'"]
