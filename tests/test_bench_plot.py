"""``megdet plot`` on benchmark results: allreduce bandwidth, train scaling, projected time to train."""
import json

import numpy as np
import pytest
from PIL import Image

from megdet.bench import plot as bench_plot
from megdet.engine import metrics

SHARES = {"data_share": 0.1, "forward_backward_share": 0.7, "communication_share": 0.15, "optimizer_share": 0.05}
ROWS = {
    "allreduce": [{"engine": engine, "fusion": fusion, "tensors": tensors, "ranks": 2, "bytes": 4096 * 4 ** k,
                   "time_us": 10.0 * 4 ** k, "algbw_GBps": 0.4 * (k + 1), "busbw_GBps": 0.4 * (k + 1)}
                  for engine, fusion, tensors in (("horovod", "on", 1), ("horovod", "off", 16), ("torch", "-", 1))
                  for k in range(8)],
    "train": [{"ranks": 1, "images_per_rank": 4, "seconds_per_step": 2.0, "images_per_s": 2.0, **SHARES,
               "scaling_efficiency": 1.0, "engine": "local"},
              {"ranks": 2, "images_per_rank": 4, "seconds_per_step": 2.5, "images_per_s": 3.2, **SHARES,
               "scaling_efficiency": 0.8, "engine": "horovod"}],
    "project": [{"gpus": gpus, "batch": batch, "step_s": 0.5, "images_per_s": 100.0 * gpus, "efficiency": 0.9,
                 "projected_s": 30.0 * 8 / gpus * 3600, "paper_s": hours and hours * 3600}
                for gpus, batch, hours in ((8, 16, 33.2), (16, 32, None), (128, 256, 4.1), (160, 256, None))],
}



def write_results(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "inputs": {}, "machine": {}, "rows": rows}))
    return path


def assert_png(path, name):
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == tuple(s * metrics.PLOT_DPI for s in bench_plot.SIZES[name])
        assert len(np.unique(np.asarray(png.convert("L")))) > 10, "curves were drawn"


@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_results_file_or_its_folder_becomes_a_png_beside_it(run_megdet, tmp_path, name):
    path = write_results(tmp_path / name, name, ROWS[name])
    done = run_megdet(["plot", str(path)], timeout=120)
    assert done.returncode == 0, done.stderr
    assert_png(tmp_path / name / f"{name}.png", name)
    assert str(tmp_path / name / f"{name}.png") in done.stdout
    done = run_megdet(["plot", str(tmp_path / name), "--out", str(tmp_path / "elsewhere.png")],
                      timeout=120)
    assert done.returncode == 0, done.stderr
    assert_png(tmp_path / "elsewhere.png", name)


def test_a_training_run_folder_still_draws_its_metrics(run_megdet, tmp_path):
    metrics.MetricsLogger(tmp_path / metrics.METRICS_FILE, enabled=True).log(1, loss=1.0, lr=0.1)
    write_results(tmp_path, "train", ROWS["train"])
    done = run_megdet(["plot", str(tmp_path)], timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / metrics.PLOT_FILE).exists() and not (tmp_path / "train.png").exists()


@pytest.fixture
def error_of(run_megdet):
    """``error_of(*args)``: the one-line error of ``megdet plot ARGS``, which must exit 2."""
    def error_of(*args):
        done = run_megdet(["plot", *args], timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        return done.stderr
    return error_of


def test_missing_unknown_or_broken_results_are_one_line_errors(error_of, tmp_path):
    message = error_of(str(tmp_path / "allreduce.json"))
    assert f"no results file {tmp_path / 'allreduce.json'}" in message and "megdet bench allreduce" in message
    message = error_of(str(tmp_path))
    assert str(tmp_path) in message and "megdet bench allreduce" in message and "megdet train" in message
    path = write_results(tmp_path, "cgbn", [{"variant": "CGBN"}])
    message = error_of(str(path))
    assert str(path) in message and "'cgbn'" in message and "allreduce, train, project" in message
    (tmp_path / "train.json").write_text("{not json")
    message = error_of(str(tmp_path / "train.json"))
    assert "is not a benchmark results file" in message and "megdet bench train" in message
    write_results(tmp_path, "train", [])
    assert "has no rows" in error_of(str(tmp_path / "train.json"))
    write_results(tmp_path, "allreduce", ROWS["allreduce"])
    assert "holds 2 results files" in error_of(str(tmp_path), "--out", str(tmp_path / "x.png"))
    assert not list(tmp_path.glob("*.png"))
