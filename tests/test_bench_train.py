"""`megdet bench train` once at a tiny size (1 rank here, 2 under horovodrun), and its bad inputs.
Asserts the shape of the results, nothing about speed."""
import json

import pytest

from megdet.bench import train
from tests.multirank import skip_unless_launcher

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
TINY = ["data.min_sizes=[64]", "data.max_size=64", "data.images_per_rank=2", "data.num_workers=0"]
STEPS = ["--steps", "2", "--warmup", "1"]


@pytest.fixture
def bench(run_megdet):
    """``bench(shards, out, *options, override=None, nprocs=1)``: ``megdet bench train`` on ``shards`` (the
    shapes_shards fixture's folder); OMP_NUM_THREADS is left unset: the benchmark shares the cores out itself."""
    def bench(shards, out, *options, override=None, nprocs=1):
        overrides = [f"data.train={shards / 'train'}", *TINY, *([override] if override else [])]
        return run_megdet(["bench", "train", "shapes_r18_cpu", *overrides, *STEPS, "--out", str(out), *options],
                          nprocs=nprocs, timeout=300, threads=True)
    return bench


def test_one_and_two_ranks_give_rows_with_shares_and_efficiency(bench, shapes_shards, tmp_path):
    skip_unless_launcher("horovodrun")
    done = bench(shapes_shards, tmp_path / "out", "--ranks", "1,2", "--engine", "horovod")
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
def test_bad_input_is_one_line_and_writes_nothing(bench, shapes_shards, tmp_path, options, override, message):
    done = bench(shapes_shards, tmp_path / "out", *options, override=override)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "megdet bench: error" in done.stderr and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_rank_count_the_launcher_did_not_start_is_refused_on_every_rank(bench, shapes_shards, tmp_path):
    skip_unless_launcher("horovodrun")
    done = bench(shapes_shards, tmp_path / "out", "--ranks", "3", nprocs=2)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "megdet bench: error" in line]
    assert len(lines) == 2 and all("started 2 ranks but --ranks is 3" in line for line in lines), done.stderr[-2000:]
    assert "megdet/bench" not in done.stdout + done.stderr, "no traceback from the ranks (horovodrun prints its own)"
    assert not (tmp_path / "out").exists()
