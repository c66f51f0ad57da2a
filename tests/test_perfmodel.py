"""The time-to-train model's arithmetic (hpc.perfmodel) and the `megdet bench project` command."""
import json

import pytest

from hpc import perfmodel
from megdet import config
from megdet.bench import project

GB = 1e9


def test_busbw_follows_nccl_tests():
    assert perfmodel.algbw(1e9, 0.5) == 2e9
    assert perfmodel.busbw_allreduce(3e9, 2) == pytest.approx(3e9)
    assert perfmodel.busbw_allreduce(3e9, 8) == pytest.approx(1.75 * 3e9)


def test_ring_allreduce_time():
    assert perfmodel.ring_allreduce_seconds(1e9, 1, 10 * GB, 5e-6) == 0
    # n = 4: 2 * 3 / 4 * 100 MB / 10 GB/s = 15 ms, plus 2 * 3 ring steps of 5 us.
    assert perfmodel.ring_allreduce_seconds(100e6, 4, 10 * GB, 5e-6) == pytest.approx(0.015 + 30e-6)
    latency = [perfmodel.ring_allreduce_seconds(0, n, 10 * GB, 1e-6) for n in (2, 8, 64)]
    assert latency == pytest.approx([2e-6, 14e-6, 126e-6])


def test_cgbn_cost_is_two_ring_allreduces_per_layer():
    channels, group, busbw, latency = [64, 256], 8, 10 * GB, 5e-6
    by_hand = sum(perfmodel.ring_allreduce_seconds((group + 1 + 2 * c) * 8, group, busbw, latency)
                  + perfmodel.ring_allreduce_seconds(2 * c * 4, group, busbw, latency) for c in channels)
    assert perfmodel.cgbn_seconds(channels, group, busbw, latency) == pytest.approx(by_hand)
    assert perfmodel.cgbn_seconds(channels, 1, busbw, latency) == 0


def efficiency(busbw_Bps, n=64, compute_s=1.0, images=2):
    allreduce = perfmodel.ring_allreduce_seconds(166e6, n, busbw_Bps, 0.0)
    step_n = perfmodel.step_seconds(compute_s, allreduce, 0.0, images)
    step_1 = perfmodel.step_seconds(compute_s, 0.0, 0.0, images)
    return perfmodel.scaling_efficiency(perfmodel.images_per_second(n, images, step_n),
                                        perfmodel.images_per_second(1, images, step_1), n)


def test_efficiency_is_one_without_communication_and_drops_with_finite_bandwidth():
    assert efficiency(float("inf")) == pytest.approx(1.0)
    assert efficiency(10 * GB) < efficiency(100 * GB) < 1.0


def test_overlap_hides_allreduce_up_to_the_backward_pass():
    assert perfmodel.exposed_allreduce_seconds(0.3, backward_s=1.0, overlap=0.0) == 0.3
    assert perfmodel.exposed_allreduce_seconds(0.3, backward_s=1.0, overlap=0.1) == pytest.approx(0.2)
    assert perfmodel.exposed_allreduce_seconds(0.3, backward_s=1.0, overlap=1.0) == 0


def test_input_rate_bounds_the_step_and_time_to_train_multiplies():
    assert perfmodel.step_seconds(0.5, 0.1, 0.0, images_per_gpu=4) == pytest.approx(0.6)
    assert perfmodel.step_seconds(0.5, 0.1, 0.0, images_per_gpu=4, input_rate=4.0) == 1.0
    assert perfmodel.time_to_train_seconds(3360, 0.25) == 840
    assert perfmodel.format_duration(713) == "11m53s"
    assert perfmodel.format_duration(33.2 * 3600) == "33.2 h"


def test_inference_waits_for_the_rank_with_the_most_images():
    assert perfmodel.inference_seconds(5000, 160, 0.1) == pytest.approx(32 * 0.1)  # ceil(31.25)
    assert perfmodel.inference_seconds(5000, 8, 0.1) == pytest.approx(625 * 0.1)


def test_overlapped_scoring_hides_all_but_the_last_evaluation_as_far_as_training_lasts():
    scoring_s, evaluations = 40.0, 14
    assert perfmodel.exposed_scoring_seconds(scoring_s, evaluations, 50.0, overlapped=False) == 14 * 40.0
    assert perfmodel.exposed_scoring_seconds(scoring_s, evaluations, 50.0, overlapped=True) == 40.0
    assert perfmodel.exposed_scoring_seconds(scoring_s, evaluations, 30.0, overlapped=True) == 13 * 10.0 + 40.0
    assert perfmodel.exposed_scoring_seconds(scoring_s, 0, 50.0, overlapped=True) == 0


def test_paper_rows_iterations_match_the_presets():
    for name in ("megdet_r50_fpn_bs16", "megdet_r50_fpn_bs256_bn32", "megdet_r50_fpn_bs256_bn32_long",
                 "largedet_coco_12min"):
        cfg = config.load(name)
        rows = [row for row in project.PAPER_ROWS if row.gpus == cfg.paper.gpus
                and row.batch == cfg.solver.batch_size and row.iterations == cfg.solver.max_iter]
        assert rows, name


@pytest.fixture
def bench_project(run_megdet):
    """``bench_project(out, *options)``: ``megdet bench project --out OUT OPTIONS``."""
    def bench_project(out, *options):
        return run_megdet(["bench", "project", "--out", str(out), *options], timeout=120)
    return bench_project


def test_command_writes_rows_and_inputs(bench_project, tmp_path):
    done = bench_project(tmp_path, "--gpus", "8,160", "--step-time", "0.5", "--bandwidth", "10")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "project.md").read_text().startswith("| gpus |")
    result = json.loads((tmp_path / "project.json").read_text())
    assert result["inputs"]["step_time_s"] == 0.5 and result["inputs"]["busbw_GBps"] == 10
    assert "step_time_s: 0.5" in done.stdout
    [largedet] = [row for row in result["rows"] if row["gpus"] == 160 and row["evaluation"] == "not counted"]
    assert largedet["source"] == "LargeDet Table 4" and largedet["iterations"] == 3360
    assert largedet["paper"] == "11m53s"
    assert largedet["projected_s"] == pytest.approx(3360 * largedet["step_s"])
    assert {row["gpus"] for row in result["rows"]} == {8, 160}


def test_command_counts_the_12_minute_runs_evaluations(bench_project, tmp_path):
    step_time, scoring_s = 0.5, 30.0
    done = bench_project(tmp_path, "--gpus", "160", "--step-time", str(step_time), "--scoring-seconds", str(scoring_s))
    assert done.returncode == 0, done.stderr
    assert "forward ~ 0.333 of a training step per image" in done.stdout and "scoring_s: 30.0" in done.stdout
    result = json.loads((tmp_path / "project.json").read_text())
    trained, synchronous, overlapped = result["rows"]
    assert [row["evaluation"] for row in result["rows"]] == ["not counted", "synchronous scoring", "overlapped scoring"]
    cfg = config.load("largedet_coco_12min")
    period, max_iter = cfg.train.eval_period, cfg.solver.max_iter
    assert max_iter % period == 0  # so the evaluation at the end is the last of every period's
    evaluations = max_iter // period
    assert synchronous["evaluations"] == overlapped["evaluations"] == evaluations
    inference_s = -(-5000 // 160) * step_time / project.STEP_IMAGES / 3  # ceil(5000 / 160) images, forward = 1/3
    assert synchronous["eval_s"] == pytest.approx(evaluations * (inference_s + scoring_s))
    assert scoring_s < period * trained["step_s"]  # so overlapped scoring hides all but the last
    assert overlapped["eval_s"] == pytest.approx(evaluations * inference_s + scoring_s)
    for row in (synchronous, overlapped):
        assert row["projected_s"] == pytest.approx(trained["projected_s"] + row["eval_s"])
    assert synchronous["projected_s"] - overlapped["projected_s"] == pytest.approx(scoring_s * (evaluations - 1))
    table = (tmp_path / "project.md").read_text()
    assert "| synchronous scoring |" in table and "| overlapped scoring |" in table


def test_command_reads_train_and_allreduce_results(bench_project, tmp_path):
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"rows": [{"ranks": 2, "seconds_per_step": 9.0, "images_per_rank": 2},
                                          {"ranks": 1, "seconds_per_step": 0.8, "images_per_rank": 4}]}))
    allreduce = tmp_path / "allreduce.json"
    allreduce.write_text(json.dumps({"rows": [
        {"engine": "horovod", "bytes": 4096, "busbw_GBps": 50.0},
        {"engine": "horovod", "bytes": 1 << 28, "busbw_GBps": 7.0},
        {"engine": "torch", "bytes": 1 << 28, "busbw_GBps": 9.0}]}))
    done = bench_project(tmp_path / "out", "--gpus", "12", "--train-results", str(train),
                         "--allreduce-results", str(allreduce))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "out" / "project.json").read_text())
    assert result["inputs"]["step_time_s"] == 0.8 and result["inputs"]["step_images_per_rank"] == 4
    assert result["inputs"]["busbw_GBps"] == 9.0
    [row] = result["rows"]
    assert row["source"] == "no paper row" and row["batch"] == 24 and row["bn_size"] == 8
    assert row["compute_s"] == pytest.approx(0.4)  # 2 images at 0.8 s per 4 images


@pytest.mark.parametrize("options, bad", [
    (["--gpus", "8,x"], "8,x"),
    (["--gpus", "0"], "0"),
    (["--train-results", "runs/nowhere/train.json"], "runs/nowhere/train.json"),
    (["--bandwidth", "-3"], "-3"),
    (["--latency-us", "-1"], "-1"),
    (["--gpus", "12", "--batch", "100"], "100"),
    (["--scoring-seconds", "-2"], "--scoring-seconds: '-2'"),
    (["--scoring-seconds", "forty"], "--scoring-seconds: 'forty'"),
])
def test_bad_input_is_one_line(bench_project, tmp_path, options, bad):
    done = bench_project(tmp_path, *options)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and bad in done.stderr
    assert "Traceback" not in done.stderr
