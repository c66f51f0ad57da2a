"""`megdet bench train` once at a tiny size (1 rank here, 2 under horovodrun), and its bad inputs.
Asserts the shape of the results, nothing about speed."""
import json
import subprocess
import sys

import pytest

from megdet.bench import train
from tests.multirank import REPO, _base_env, launch_command, skip_unless_launcher

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
MEGDET = [sys.executable, "-m", "megdet.cli"]
TINY = ["data.min_sizes=[64]", "data.max_size=64", "data.images_per_rank=2", "data.num_workers=0"]
STEPS = ["--steps", "2", "--warmup", "1"]


def megdet(args, nprocs=1, timeout=300):
    argv = [*MEGDET, *args]
    if nprocs > 1:
        argv = launch_command("horovodrun", nprocs, argv)
    # OMP_NUM_THREADS from _base_env is dropped: the benchmark shares the cores out itself
    env = {k: v for k, v in _base_env(None).items() if k != "OMP_NUM_THREADS"}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    done = megdet(["synth", "--out", str(root / "shapes"), "--train", "16", "--val", "4", "--size", "64"])
    assert done.returncode == 0, done.stderr
    done = megdet(["pack", "--coco-json", str(root / "shapes" / "annotations" / "instances_train.json"),
                   "--images", str(root / "shapes" / "train"), "--out", str(root / "train")])
    assert done.returncode == 0, done.stderr
    return root


def bench(shards, out, *options, override=None, nprocs=1):
    overrides = [f"data.train={shards / 'train'}", *TINY, *([override] if override else [])]
    return megdet(["bench", "train", "shapes_r18_cpu", *overrides, *STEPS, "--out", str(out), *options], nprocs=nprocs)


def test_one_and_two_ranks_give_rows_with_shares_and_efficiency(shards, tmp_path):
    skip_unless_launcher("horovodrun")
    done = bench(shards, tmp_path / "out", "--ranks", "1,2", "--engine", "horovod")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "train.json").read_text())
    rows = results["rows"]
    assert [(r["ranks"], r["engine"]) for r in rows] == [(1, "local"), (2, "horovod")]
    for row in rows:
        assert set(row) == {"ranks", "images_per_rank", "seconds_per_step", "images_per_s", "data_share",
                            "forward_backward_share", "communication_share", "optimizer_share",
                            "scaling_efficiency", "engine"}
        assert row["images_per_rank"] == 2 and row["seconds_per_step"] > 0 and row["images_per_s"] > 0
        shares = [row[f"{phase}_share"] for phase in train.PHASES]
        assert all(0 <= share <= 1 for share in shares) and sum(shares) == pytest.approx(1, abs=0.05)
    assert rows[0]["scaling_efficiency"] == 1.0
    assert rows[1]["scaling_efficiency"] == pytest.approx(rows[1]["images_per_s"] / (2 * rows[0]["images_per_s"]))
    assert set(results["inputs"]["threads_per_rank"]) == {"1", "2"}
    assert "| horovod | 2 | 2 |" in done.stdout and "threads per rank" in done.stdout


@pytest.mark.parametrize("options, override, message", [
    (["--ranks", "0"], None, "Invalid --ranks: '0'"),
    (["--ranks", "1,two"], None, "Invalid --ranks: '1,two'"),
    (["--steps", "0"], None, "Invalid --steps: 0"),
    ([], "data.train=/nonexistent/shards", "/nonexistent/shards"),
])
def test_bad_input_is_one_line_and_writes_nothing(shards, tmp_path, options, override, message):
    done = bench(shards, tmp_path / "out", *options, override=override)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "megdet bench: error" in done.stderr and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_rank_count_the_launcher_did_not_start_is_refused_on_every_rank(shards, tmp_path):
    skip_unless_launcher("horovodrun")
    done = bench(shards, tmp_path / "out", "--ranks", "3", nprocs=2)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "megdet bench: error" in line]
    assert len(lines) == 2 and all("started 2 ranks but --ranks is 3" in line for line in lines), done.stderr[-2000:]
    assert "megdet/bench" not in done.stdout + done.stderr, "no traceback from the ranks (horovodrun prints its own)"
    assert not (tmp_path / "out").exists()
