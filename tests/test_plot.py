"""Metrics JSON lines (rank 0 only, resume-safe) and ``megdet plot``."""
import json

import numpy as np
import pytest
from PIL import Image

from hpc.errors import UserError
from megdet.engine import metrics



def write_run(run_dir, iterations=40):
    logger = metrics.MetricsLogger(run_dir / metrics.METRICS_FILE, enabled=True)
    for iteration in range(1, iterations + 1):
        logger.log(iteration, loss=2.0 / iteration, loss_cls=1.0 / iteration, lr=0.01 * min(1.0, iteration / 10),
                   images_per_s=100.0 + iteration)
        if iteration % 10 == 0:
            logger.log(iteration, AP=iteration / 2, AP50=iteration)
    return logger


def test_lines_have_iter_time_and_scalars_and_only_rank_0_writes(tmp_path):
    write_run(tmp_path)
    metrics.MetricsLogger(tmp_path / "other.jsonl", enabled=False).log(1, loss=1.0)
    assert not (tmp_path / "other.jsonl").exists()
    lines = [json.loads(line) for line in (tmp_path / metrics.METRICS_FILE).read_text().splitlines()]
    assert len(lines) == 44 and lines[0]["iter"] == 1 and lines[0]["loss"] == 2.0
    assert all(isinstance(line["time"], float) for line in lines)
    assert [line["iter"] for line in lines if "AP" in line] == [10, 20, 30, 40]
    logger = metrics.MetricsLogger(tmp_path / metrics.METRICS_FILE, enabled=True)
    logger.log(41, loss=float("nan"))
    assert json.loads((tmp_path / metrics.METRICS_FILE).read_text().splitlines()[-1])["loss"] is None


def tensorboard_scalars(folder):
    """{tag: [(step, value), ...]} of every TensorBoard event file in ``folder``, read by tensorboard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_beside_the_lines_read_back_and_purged_on_resume(tmp_path):
    logger = metrics.MetricsLogger(tmp_path / metrics.METRICS_FILE, enabled=True, tensorboard=True)
    for iteration in (10, 20, 30):
        logger.log(iteration, loss=3.0 / iteration, loss_cls=1.0, lr=0.02, images_per_s=40.0 + iteration)
    logger.log(30, AP=12.5, AP50=30.0)
    logger.close()
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["loss/loss"] == [(10, pytest.approx(0.3)), (20, pytest.approx(0.15)), (30, pytest.approx(0.1))]
    assert scalars["train/images_per_s"][-1] == (30, 70.0) and scalars["eval/AP"] == [(30, 12.5)]
    assert {"loss/loss_cls", "train/lr", "eval/AP50"} <= set(scalars)
    resumed = metrics.MetricsLogger(tmp_path / metrics.METRICS_FILE, enabled=True, resume_from=20, tensorboard=True)
    resumed.log(30, loss=7.0)
    resumed.close()
    assert tensorboard_scalars(tmp_path)["loss/loss"] == [(10, pytest.approx(0.3)), (20, pytest.approx(0.15)),
                                                          (30, 7.0)], "the interrupted run's iteration 30 is purged"


def test_resume_drops_the_lines_after_the_checkpoint(tmp_path):
    write_run(tmp_path)
    with (tmp_path / metrics.METRICS_FILE).open("a") as handle:
        handle.write('{"iter": 41, "lo')  # the killed run's last, torn line
    resumed = metrics.MetricsLogger(tmp_path / metrics.METRICS_FILE, enabled=True, resume_from=25)
    resumed.log(26, loss=0.1)
    iterations = [r["iter"] for r in metrics.read_metrics(tmp_path / metrics.METRICS_FILE)]
    assert iterations == list(range(1, 11)) + [10] + list(range(11, 21)) + [20] + list(range(21, 27))


def test_plot_draws_a_png(run_megdet, tmp_path):
    write_run(tmp_path)
    done = run_megdet(["plot", str(tmp_path)], timeout=120)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / metrics.PLOT_FILE) as png:
        assert png.format == "PNG"
        assert png.size == tuple(s * metrics.PLOT_DPI for s in metrics.PLOT_SIZE_INCHES)
        assert len(np.unique(np.asarray(png.convert("L")))) > 10, "curves were drawn"
    assert str(tmp_path / metrics.PLOT_FILE) in done.stdout


def test_missing_empty_or_broken_metrics_are_one_line_errors(run_megdet, tmp_path):
    done = run_megdet(["plot", str(tmp_path / "nowhere")], timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "no metrics file" in done.stderr and "megdet train" in done.stderr
    (tmp_path / metrics.METRICS_FILE).write_text("")
    with pytest.raises(UserError, match="is empty"):
        metrics.read_metrics(tmp_path / metrics.METRICS_FILE)
    (tmp_path / metrics.METRICS_FILE).write_text('{"iter": 1, "loss": 1}\n{"iter": 2, "loss"\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        metrics.read_metrics(tmp_path / metrics.METRICS_FILE)
    (tmp_path / metrics.METRICS_FILE).write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="line 1 has no integer"):
        metrics.read_metrics(tmp_path / metrics.METRICS_FILE)
    assert not (tmp_path / metrics.PLOT_FILE).exists()
