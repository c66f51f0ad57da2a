"""Evaluations scored beside training (``train.async_eval``) as users run them: 2 ranks under horovodrun
on the 64-pixel shapes, the scores checked against ``megdet eval`` of the checkpoint they scored."""
import json
import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from hpc import checkpoint
from tests.multirank import MEGDET, REPO, launch_command, skip_unless_launcher, tiny_config

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
ASYNC = ["train.eval_period=10", "train.async_eval=true"]
WORKER = "megdet.engine.scoring_worker"


def async_config(shards, out, *extra):
    return [*tiny_config(shards, out), *ASYNC, *extra]


def evaluation_lines(out):
    """(iteration, AP) of the evaluation lines of a run's metrics.jsonl, in file order."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(line["iter"], line["AP"]) for line in lines if "AP" in line]


def scored(out, iteration):
    """The metrics a background score of ``iteration`` wrote, without its iteration."""
    metrics = json.loads((out / "evaluations" / f"iter_{iteration:07d}" / "metrics.json").read_text())
    assert metrics.pop("iteration") == iteration
    return metrics


def scoring_workers():
    return [p for p in psutil.process_iter(["cmdline"]) if WORKER in " ".join(p.info["cmdline"] or [])]


def test_a_target_reached_while_training_stops_every_rank_and_keeps_the_scored_weights(run_megdet, shapes_shards,
                                                                                       tmp_path):
    out = tmp_path / "target"
    done = run_megdet(["train", *async_config(shapes_shards, out, "train.target_metric=AP50", "train.target_ap=[0.0]")],
                      nprocs=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "scored beside training by a background process on each of the 2 ranks; stops at box AP50 >= 0.0" in done.stdout
    reached = re.search(r"target reached: box AP50 [\d.]+ >= target 0.0 at iteration 10, [\d.]+ s into training; "
                        r"stopping at iteration (\d+)", done.stdout)
    assert reached, done.stdout[-3000:]
    stopped = int(reached.group(1))
    assert 10 < stopped < 40, "training went on while the score was computed, and stopped once it arrived"
    assert f"finished {stopped} iterations on 2 ranks" in done.stdout
    assert f"result (the weights that reached the target) {out / 'model_0000010.pt'}" in done.stdout
    assert checkpoint.load(out / f"model_{stopped:07d}.pt")["iteration"] == stopped, "both ranks saved it together"
    assert [iteration for iteration, _ in evaluation_lines(out)] == [10], "logged against the iteration it scored"

    again = run_megdet(["eval", *tiny_config(shapes_shards, out), "--checkpoint", str(out / "model_0000010.pt"),
                        "--out", str(tmp_path / "eval10")])
    assert again.returncode == 0, again.stderr[-3000:]
    in_step = json.loads((tmp_path / "eval10" / "metrics.json").read_text())
    assert scored(out, 10) == {key: value for key, value in in_step.items() if not key.startswith("num_")}


def test_a_target_reached_in_step_stops_every_rank_at_that_iteration_with_the_same_report(run_megdet, shapes_shards,
                                                                                           tmp_path):
    out = tmp_path / "in-step"
    done = run_megdet(["train", *tiny_config(shapes_shards, out), "train.eval_period=10", "train.async_eval=false",
                       "train.target_metric=AP50", "train.target_ap=[0.0]"], nprocs=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"target reached: box AP50 [\d.]+ >= target 0.0 at iteration 10, [\d.]+ s into training; "
                     r"stopping\n", done.stdout), done.stdout[-3000:]
    assert f"finished 10 iterations on 2 ranks; checkpoint {out / 'model_0000010.pt'}" in done.stdout
    assert [iteration for iteration, _ in evaluation_lines(out)] == [10]


def test_a_run_waits_for_its_scores_names_a_missed_target_and_a_resume_scores_the_pending_one_again(
        run_megdet, shapes_shards, tmp_path):
    out = tmp_path / "all"
    done = run_megdet(["train", *async_config(shapes_shards, out, "train.target_ap=[100.0]")], nprocs=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"target not reached in 40 iterations: box AP [\d.]+ < target 100.0 at the last evaluation",
                     done.stdout), done.stdout[-3000:]
    first = evaluation_lines(out)
    assert [iteration for iteration, _ in first] == [10, 20, 30, 40], "in order, the last one in step at the end"
    at_20 = scored(out, 20)
    assert checkpoint.load(out / "model_0000020.pt")["pending_evaluations"] == [{"iteration": 20, "ranks": 2}]

    resumed = run_megdet(["train", *async_config(shapes_shards, out), "--resume", str(out / "model_0000020.pt")],
                         nprocs=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "at iteration 20; scoring again the evaluation(s) of iteration(s) 20" in resumed.stdout
    assert scored(out, 20) == at_20, "the same detections, the same numbers"
    assert evaluation_lines(out) == first, "each evaluation once in the metrics, with the same AP"


def test_a_scoring_process_killed_mid_way_ends_the_run_with_one_line_on_every_rank(launch_env, shapes_shards,
                                                                                    tmp_path):
    """The ground truth the scoring processes read is swapped for a FIFO, so both block in it until one
    is killed."""
    skip_unless_launcher("horovodrun")
    out = tmp_path / "killed"
    argv = launch_command("horovodrun", 2, [*MEGDET, "train", *async_config(shapes_shards, out)])
    run = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=launch_env({}), start_new_session=True)
    try:
        ground_truth = out / "evaluations" / "ground_truth.json"
        deadline = time.time() + 300
        while not ground_truth.exists() and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        ground_truth.unlink()
        os.mkfifo(ground_truth)
        while len(scoring_workers()) < 2 and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        workers = scoring_workers()
        assert len(workers) == 2, "both ranks started scoring the evaluation at iteration 10"
        workers[0].send_signal(signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode != 0
    lines = [line for line in (stdout + stderr).splitlines() if "megdet train: error" in line]
    assert len(lines) == 2 and all("scoring of the evaluation at iteration 10 on rank" in line
                                   and "was killed by signal 9" in line and "scoring_rank" in line for line in lines), \
        stdout[-2000:] + stderr[-2000:]
    ranks_said = [line for line in (stdout + stderr).splitlines() if re.match(r"\[\d\]<std(out|err)>:", line)]
    assert not [line for line in ranks_said if "Traceback" in line], "no rank's traceback (horovodrun has its own)"
    assert not scoring_workers(), "the other rank's scoring process is stopped with the run"


@pytest.mark.parametrize("overrides, message", [
    (["train.async_eval=true", "train.eval_period=10", "data.val="], "data.val is empty"),
    (["train.async_eval=true", "train.eval_period=0"], "train.eval_period=0 evaluates only at the end"),
    (["train.eval_period=50"], "train.eval_period=50 is longer than the run (solver.max_iter=40)"),
    (["train.target_ap=[30.0, 20.0]"], "gives a mask AP but the model has no masks"),
])
def test_bad_evaluation_settings_are_one_line_on_every_rank_before_training(run_megdet, shapes_shards, tmp_path,
                                                                            overrides, message):
    out = tmp_path / "bad"
    done = run_megdet(["train", *tiny_config(shapes_shards, out), *overrides], nprocs=2, timeout=180)
    assert done.returncode != 0
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "megdet train: error" in line]
    assert len(lines) == 2 and all(message in line for line in lines), done.stdout[-2000:] + done.stderr[-2000:]
    assert not out.exists(), "nothing written before the refusal"
