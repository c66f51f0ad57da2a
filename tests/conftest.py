"""Fixtures every test file may ask for by name:

- ``run_megdet``: the command runner, ``run_megdet(["train", ...], nprocs=2)`` (``tests.multirank.run_megdet``;
  not named ``megdet``, which would hide the package in a test that also imports it);
- ``launch_env``: the base environment of a launched process (``tests.multirank.base_env``);
- ``job_env``: the same with this interpreter's bin folder first on PATH, for batch scripts;
- ``shapes_shards``: 64-pixel synthetic shapes (24 training, 8 validation images) packed into
  ``ROOT/train`` and ``ROOT/val`` once per session; returns ROOT;
- ``slurm``: a real one-node Slurm started on first use (``tests.slurm``);
- ``vcluster``: a real 3-node Slurm cluster in network namespaces, started on first use, taken down at
  the end of the session (``tests.vcluster``; skipped, naming why, where it cannot run);
- ``realdata``: the real COCO-format sets in ``../shared/realdata`` (the test is skipped, naming the
  folder, where they are not); ``REALDATA``, the same folder, for the paths that ``parametrize`` or
  ``skipif`` need when tests are collected, before any fixture runs;
- ``open_images_set``: the real photos of ``realdata``'s VOC set as an Open Images set (official CSV
  columns, a small hierarchy, group-of boxes, verified negatives; ``tests.open_images_data``), written
  once per session; tests that change its files copy them first.

Tiers: ``make test`` runs everything; ``make test-fast`` (``-m "not slow and not multirank"``) leaves out
the slow tests and those that launch ranks, for the inner loop.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import multirank
from tests.open_images_data import write_open_images_set
from tests import vcluster as vcluster_mod
from tests import slurm as slurm_mod

REALDATA = multirank.REPO.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def run_megdet():
    return multirank.run_megdet


@pytest.fixture(scope="session")
def launch_env():
    return multirank.base_env


@pytest.fixture(scope="session")
def job_env(launch_env):
    """``job_env(**extra)``: the launch environment with this interpreter's bin folder (megdet, mpirun)
    first on PATH, for batch jobs that find the commands by name."""
    def job_env(**extra):
        env = launch_env(extra)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
        return env
    return job_env


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory, run_megdet) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    done = run_megdet(["synth", "--out", str(root / "shapes"), "--train", "24", "--val", "8", "--size", "64"])
    assert done.returncode == 0, done.stderr
    for split in ("train", "val"):
        done = run_megdet(["pack", "--coco-json", str(root / "shapes" / "annotations" / f"instances_{split}.json"),
                           "--images", str(root / "shapes" / split), "--out", str(root / split)])
        assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="session")
def slurm():
    """A running one-node Slurm (installed first when root and missing); stopped after the session."""
    reason = slurm_mod.ensure_debian_packages(slurm_mod.SLURM_PACKAGES, slurm_mod.SLURM_COMMANDS)
    if reason:
        pytest.skip(f"no Slurm here: {reason}")
    cluster = slurm_mod.Slurm(Path(tempfile.mkdtemp(prefix="megdet-slurm-")))
    try:
        cluster.start()
    except (RuntimeError, KeyError, OSError, subprocess.SubprocessError) as error:
        cluster.stop()
        pytest.skip(f"Slurm daemons did not come up here: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def vcluster():
    try:
        cluster = vcluster_mod.start_session_cluster(nodes=3, cpus=4)
    except vcluster_mod.ClusterError as error:
        pytest.skip(f"no virtual cluster here: {error}")
    try:
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"the real data sets are not at {REALDATA} (../shared/realdata beside the checkout)")
    return REALDATA


@pytest.fixture(scope="session")
def open_images_set(realdata, tmp_path_factory):
    return write_open_images_set(realdata, tmp_path_factory.mktemp("open_images"))
