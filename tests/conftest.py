"""Fixtures every test file may ask for by name:

- ``run_megdet``: the command runner, ``run_megdet(["train", ...], nprocs=2)`` (``tests.multirank.run_megdet``;
  not named ``megdet``, which would hide the package in a test that also imports it);
- ``launch_env``: the base environment of a launched process (``tests.multirank.base_env``);
- ``shapes_shards``: 64-pixel synthetic shapes (24 training, 8 validation images) packed into
  ``ROOT/train`` and ``ROOT/val`` once per session; returns ROOT;
- ``realdata``: the real COCO-format sets in ``../shared/realdata`` (the test is skipped, naming the
  folder, where they are not); ``REALDATA``, the same folder, for the paths that ``parametrize`` or
  ``skipif`` need when tests are collected, before any fixture runs.

Tiers: ``make test`` runs everything; ``make test-fast`` (``-m "not slow and not multirank"``) leaves out
the slow tests and those that launch ranks, for the inner loop.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import multirank

REALDATA = multirank.REPO.parent / "shared" / "realdata"


@pytest.fixture(scope="session")
def run_megdet():
    return multirank.run_megdet


@pytest.fixture(scope="session")
def launch_env():
    return multirank.base_env


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
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"the real data sets are not at {REALDATA} (../shared/realdata beside the checkout)")
    return REALDATA
