"""scripts/setup.sh on a node like the lent GPU node: python3 is itself a venv's, the network is cut and
the packages python3 lacks come from a folder (MEGDET_TORCH=system, MEGDET_OFFLINE_DIR). Each test runs the
real script (or, sourced, one of its steps) in a copy of the project or a scratch venv, never in .venv.

A parent environment here is a real venv made by this Python; where a test needs only its torch's version,
its torch is a two-line stand-in (the real node's is 2.5 GB: scripts/node_twin.sh runs the real one).
scripts/node_twin.sh is the whole rehearsal (minutes, 5 GB); these take seconds.
"""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.multirank import REPO

SETUP = REPO / "scripts" / "setup.sh"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def clean_env(tmp_path, **extra):
    """An environment with none of this machine's pip configuration, MEGDET_ or HOROVOD_ variables."""
    env = {"PATH": BASE_PATH, "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8", "PIP_CONFIG_FILE": os.devnull,
           "TMPDIR": str(tmp_path)}
    env.update(extra)
    return env


def make_parent(tmp_path, torch_version=None, cuda=None, pip=True):
    """A venv made by this Python, as the node's python3 is one; with a stand-in torch of that version
    (and CUDA version) when asked, and this Python's pip (linked: creating one takes seconds)."""
    parent = tmp_path / "parent"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(parent)], check=True)
    site_packages = next(parent.glob("lib/python3*/site-packages"))
    if torch_version:
        (site_packages / "torch").mkdir()
        (site_packages / "torch" / "__init__.py").write_text(f"__version__ = {torch_version!r}\nfrom . import version\n")
        (site_packages / "torch" / "version.py").write_text(f"cuda = {cuda!r}\n")
    if pip:
        import pip as this_pip
        (site_packages / "pip").symlink_to(Path(this_pip.__file__).parent)
    return parent, site_packages


def make_wheel(folder, name, version, files):
    """A pure-Python wheel of ``files`` ({path in the wheel: text}) in ``folder``."""
    dist_info = f"{name}-{version}.dist-info"
    files = {**files, f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in [*files, f"{dist_info}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in {**files, f"{dist_info}/RECORD": record}.items():
            wheel.writestr(path, text)


def copy_project(tmp_path):
    """What set-up reads and installs of the project: its scripts, packages and metadata."""
    project = tmp_path / "megdet"
    for name in ("scripts", "hpc", "megdet"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, project / name)
    return project


def network_cut():
    """The command prefix that runs a command without network (a namespace of its own), or a skip."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("cutting the network needs root and unshare (util-linux)")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("'unshare --net' is refused here (a container without CAP_SYS_ADMIN)")
    return ["unshare", "--net"]


def run_setup(project, env, prefix=(), timeout=300):
    return subprocess.run([*prefix, "bash", "scripts/setup.sh"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_step(script, env, venv, timeout=120):
    """``script`` after sourcing scripts/setup.sh (its steps as functions; sourcing runs none), with
    ``venv`` in place of the project's .venv."""
    return subprocess.run(["bash", "-c", f'source "{SETUP}"\nVENV="{venv}"\n{script}'], env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


def test_a_venv_on_top_of_a_parent_venv_sees_its_packages_where_system_site_packages_does_not(tmp_path):
    """Defect 1: the node's python3 is a venv's; `venv --system-site-packages` sees the base's packages."""
    parent, site_packages = make_parent(tmp_path)
    (site_packages / "parent_probe.py").write_text("WHERE = 'parent'\n")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "parent_pth_probe.py").write_text("")
    (site_packages / "extra.pth").write_text(f"{tmp_path / 'extra'}\n")  # the parent's own .pth files load too
    system_site = tmp_path / "system-site"
    subprocess.run([str(parent / "bin/python"), "-m", "venv", "--without-pip", "--system-site-packages",
                    str(system_site)], check=True)
    assert subprocess.run([str(system_site / "bin/python"), "-c", "import parent_probe"]).returncode != 0

    venv = tmp_path / "venv"
    done = run_step("make_venv_on_parent", clean_env(tmp_path, PYTHON=str(parent / "bin/python")), venv)
    assert done.returncode == 0, done.stderr
    own = next(venv.glob("lib/python3*/site-packages"))
    (own / "parent_probe.py").write_text("WHERE = 'venv'\n")  # what the venv installs comes first
    probe = subprocess.run([str(venv / "bin/python"), "-c",
                            "import parent_probe, parent_pth_probe, pip; print(parent_probe.WHERE)"],
                           capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.strip() == "venv", probe.stderr
    (own / "parent_probe.py").unlink()
    probe = subprocess.run([str(venv / "bin/python"), "-c", "import parent_probe; print(parent_probe.WHERE)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "parent", probe.stderr
    pip = subprocess.run([str(venv / "bin/pip"), "--version"], capture_output=True, text=True)
    assert pip.returncode == 0 and "pip " in pip.stdout, pip.stderr


def test_offline_set_up_installs_from_the_folder_and_names_what_it_lacks_with_the_network_cut(tmp_path):
    """Defects 2, 10 and 11 on the node's path: pip's --no-index follows its subcommand, no MPI is asked
    for, and a package the offline folder lacks is one line naming it and the --fetch that adds it."""
    cut = network_cut()
    parent, _ = make_parent(tmp_path, torch_version="2.12.0")
    project, offline = copy_project(tmp_path), tmp_path / "offline"
    offline.mkdir()
    env = clean_env(tmp_path, PATH=f"{parent / 'bin'}:{BASE_PATH}", MEGDET_TORCH="system",
                    MEGDET_OFFLINE_DIR=str(offline), MEGDET_SKIP_HOROVOD="1")
    assert shutil.which("mpicc", path=env["PATH"]) is None, "this test wants a PATH without an MPI"

    done = run_setup(project, env, cut)
    assert done.returncode == 1 and "no such option" not in done.stdout + done.stderr
    assert "using python3's torch 2.12.0" in done.stdout
    assert error_lines(done.stderr) == [
        f"[setup] error: MEGDET_OFFLINE_DIR={offline} has no torchvision==0.27.*: add it on a machine that "
        f"reaches PyPI with 'bash scripts/gpu_check.sh --fetch {offline} \"torchvision==0.27.*\"' and carry the "
        "folder over"]

    make_wheel(offline, "torchvision", "0.27.0", {"torchvision/__init__.py": "__version__ = '0.27.0'\n"})
    done = run_setup(project, env, cut)
    assert done.returncode == 1 and "installing torchvision==0.27.*" in done.stdout, done.stderr
    assert next(project.glob(".venv/lib/python3*/site-packages/torchvision-0.27.0.dist-info"))
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and f"MEGDET_OFFLINE_DIR={offline} has no numpy: " in lines[0], done.stderr
    assert "mpi" not in (done.stdout + done.stderr).lower()


def test_node_set_up_completes_offline_on_top_of_this_venv(tmp_path):
    """The whole node's set-up, network cut, on top of this test's own venv (a venv holding torch, as the
    node's python3 is): .venv sees its torch, installs megdet from the copy, needs no MPI, and a second run
    with Horovod skipped is up to date."""
    cut = network_cut()
    if sys.prefix == sys.base_prefix:
        pytest.skip("this Python is not a venv's: the parent venv this test wants is missing")
    project, offline = copy_project(tmp_path), tmp_path / "offline"
    offline.mkdir()
    env = clean_env(tmp_path, PATH=f"{Path(sys.executable).parent}:{BASE_PATH}", PYTHON=sys.executable,
                    MEGDET_TORCH="system", MEGDET_OFFLINE_DIR=str(offline), MEGDET_SKIP_HOROVOD="1")
    done = run_setup(project, env, cut)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MEGDET_SKIP_HOROVOD: no Horovod and no MPI" in done.stdout and "[setup] done" in done.stdout
    import torch
    probe = subprocess.run([str(project / ".venv/bin/python"), "-c",
                            "import megdet, torch, pycocotools; print(megdet.__file__); print(torch.__file__)"],
                           capture_output=True, text=True, env=clean_env(tmp_path), cwd="/")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(project / "megdet" / "__init__.py"), torch.__file__]
    again = run_setup(project, env, cut)
    assert again.returncode == 0 and "[setup] up to date" in again.stdout, again.stdout + again.stderr


@pytest.mark.parametrize("torch_version, message", [
    (None, "MEGDET_TORCH=system but {python} cannot import torch: load the cluster's torch (module load, "
           "container), or unset MEGDET_TORCH"),
    ("2.9.1", "{python} has torch 2.9.1, outside the tested 2.11 to 2.13: load a torch in that range, or unset "
              "MEGDET_TORCH to install torch==2.13.0 in {venv}")])
def test_a_system_torch_missing_or_outside_the_tested_range_is_one_line(tmp_path, torch_version, message):
    parent, _ = make_parent(tmp_path, torch_version=torch_version, pip=False)
    project = copy_project(tmp_path)
    python = parent / "bin/python"
    done = run_setup(project, clean_env(tmp_path, PYTHON=str(python), MEGDET_TORCH="system"))
    assert done.returncode == 1 and not (project / ".venv").exists()
    assert error_lines(done.stderr) == [
        "[setup] error: " + message.format(python=python, venv=project / ".venv")]


def test_horovod_for_a_cuda_torch_without_nvcc_is_one_line_before_anything_is_installed(tmp_path):
    parent, _ = make_parent(tmp_path, torch_version="2.11.0+cu130", cuda="13.0", pip=False)
    project = copy_project(tmp_path)
    env = clean_env(tmp_path, PATH=f"{parent / 'bin'}:/usr/bin:/bin", MEGDET_TORCH="system")
    if shutil.which("nvcc", path=env["PATH"]):
        pytest.skip("nvcc is in /usr/bin or /bin here: no PATH without it")
    done = run_setup(project, env)
    assert done.returncode == 1 and not (project / ".venv").exists()
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        "[setup] error: torch has CUDA but nvcc is not on PATH: load the CUDA toolkit"), done.stderr


def test_the_cuda_toolkit_comes_from_nvcc_itself_or_cuda_home(tmp_path):
    """Defect 13: the nvcc on PATH may be a wrapper script in a bin of its own (/usr/local/bin here)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH")
    env = clean_env(tmp_path, PATH=f"{Path(nvcc).parent}:{BASE_PATH}")
    done = run_step("cuda_home", env, tmp_path / "venv")
    assert done.returncode == 0, done.stderr
    toolkit = Path(done.stdout.strip())
    assert (toolkit / "bin" / "nvcc").is_file() and (toolkit / "include" / "cuda_runtime.h").is_file(), toolkit
    done = run_step("cuda_home", {**env, "CUDA_HOME": "/opt/cuda-of-my-choice"}, tmp_path / "venv")
    assert done.stdout.strip() == "/opt/cuda-of-my-choice"


def test_the_users_gpu_architectures_are_honoured_and_none_is_one_line(tmp_path):
    """Defect 13: HOROVOD_BUILD_CUDA_CC_LIST is the way out when torch lists no architectures (no GPU)."""
    venv = Path(sys.prefix)  # only read: its torch lists no architectures without a GPU
    import torch
    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here, so it lists its architectures")
    env = clean_env(tmp_path)
    done = run_step("cuda_archs", {**env, "HOROVOD_BUILD_CUDA_CC_LIST": "75,80,90"}, venv)
    assert done.returncode == 0 and done.stdout.strip() == "75,80,90", done.stderr
    done = run_step("cuda_archs", env, venv)
    assert done.returncode == 1 and error_lines(done.stderr) == [
        "[setup] error: torch lists no sm_ architectures (torch.cuda.get_arch_list() is empty without a GPU): "
        "set HOROVOD_BUILD_CUDA_CC_LIST, e.g. 75,80,86,90,100,120"]


FAILING_HOROVOD_SETUP = """\
import os, sys
from setuptools import setup
if "bdist_wheel" not in sys.argv:  # pip asks for the metadata first
    setup(name="horovod", version="0.28.1")
    sys.exit(0)
for name in sorted(os.environ):
    if name.startswith(("HOROVOD_", "CMAKE_")):
        print(f"{name}={os.environ[name]}")
print("-- Configuring incomplete, errors occurred!", file=sys.stderr)
print("CMake Error at cmake/Modules/FindNCCL.cmake:49 (message):", file=sys.stderr)
print("  Could NOT find NCCL (missing: NCCL_INCLUDE_DIR NCCL_LIBRARY)", file=sys.stderr)
sys.exit(1)
"""


def test_a_failed_horovod_build_shows_its_cause_and_keeps_its_log(tmp_path):
    """Defects 12 and 7: the log survives set-up's exit and is named; the build asks cmake >= 4 to take
    Gloo's old cmake_minimum_required (CMAKE_POLICY_VERSION_MINIMUM) and says whether MPI is built."""
    source = tmp_path / "horovod-0.28.1"
    (source / "horovod" / "torch").mkdir(parents=True)
    for cmake_lists in (source / "CMakeLists.txt", source / "horovod" / "torch" / "CMakeLists.txt"):
        cmake_lists.write_text("set(CMAKE_CXX_STANDARD 14)\n")
    (source / "setup.py").write_text(FAILING_HOROVOD_SETUP)
    offline, cache = tmp_path / "offline", tmp_path / "cache"
    offline.mkdir()
    with tarfile.open(offline / "horovod-0.28.1.tar.gz", "w:gz") as sdist:
        sdist.add(source, arcname="horovod-0.28.1")
    shutil.rmtree(source)
    # The venv on top of this test's own (read only), for its setuptools.
    env = clean_env(tmp_path, PYTHON=sys.executable, MEGDET_OFFLINE_DIR=str(offline), MEGDET_WHEEL_CACHE=str(cache))
    done = run_step('make_venv_on_parent\nbuild_horovod_wheel "$MEGDET_WHEEL_CACHE/horovod-test" '
                    'HOROVOD_WITHOUT_MPI=1', env, tmp_path / "venv")
    log = cache / "logs" / "horovod-test.log"
    assert done.returncode == 1
    lines = error_lines(done.stderr)
    assert any(line.strip() == "Could NOT find NCCL (missing: NCCL_INCLUDE_DIR NCCL_LIBRARY)" for line in lines)
    assert lines[-1] == f"[setup] error: Horovod build failed (its errors above); the whole log is {log}"
    text = log.read_text()
    assert "Could NOT find NCCL" in text and "CMAKE_POLICY_VERSION_MINIMUM=3.5" in text
    assert "HOROVOD_WITHOUT_MPI=1" in text and "HOROVOD_WITH_MPI=" not in text
    assert not (cache / "horovod-test").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tmp.")] == []  # the build folder is gone


@pytest.mark.parametrize("arguments, check_build, expected", [
    ([], "[X] PyTorch\n[ ] MPI\n[X] Gloo\n",
     "[setup] error: Horovod was built without MPI: delete the cached wheel (~/.cache/megdet/wheels) and rerun "
     "'MEGDET_FORCE_SETUP=1 bash scripts/setup.sh'"),
    (["--without-mpi"], "[X] PyTorch\n[ ] MPI\n[X] Gloo\n",
     "[setup] Horovod has PyTorch and Gloo (built without MPI: launch with horovodrun or torchrun)"),
    (["--without-mpi"], "[X] PyTorch\n[ ] MPI\n[ ] Gloo\n",
     "[setup] error: Horovod was built without Gloo: delete the cached wheel (~/.cache/megdet/wheels) and rerun "
     "'MEGDET_FORCE_SETUP=1 bash scripts/setup.sh'")])
def test_the_build_check_wants_mpi_only_when_set_up_built_it(tmp_path, arguments, check_build, expected):
    """What `horovodrun --check-build` prints for each build (this machine's Horovod has them all)."""
    (tmp_path / "check-build.txt").write_text(check_build)
    horovodrun = tmp_path / "horovodrun"
    horovodrun.write_text(f"#!/bin/sh\ncat {tmp_path / 'check-build.txt'}\n")
    horovodrun.chmod(0o755)
    done = subprocess.run(["bash", str(REPO / "scripts" / "check_horovod_build.sh"), *arguments],
                          env=clean_env(tmp_path, PATH=f"{tmp_path}:/usr/bin:/bin"), capture_output=True, text=True)
    assert (done.stdout + done.stderr).strip() == expected


@pytest.mark.parametrize("argv, message", [
    (["--fetch", "--horovod"], "--fetch needs a folder: --fetch DIR"),
    (["pycocotools"], "unknown argument pycocotools: package names follow --fetch DIR"),
    (["--cpu", "--bogus"], "unknown argument --bogus: use --fetch DIR, --cpu, --out DIR or --horovod")])
def test_gpu_check_refuses_bad_arguments_in_one_line(tmp_path, argv, message):
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *argv], env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and error_lines(done.stderr) == [f"[gpu_check] error: {message}"]
