"""`megdet train` and `megdet eval CONFIG --checkpoint` as users launch them: 2 ranks under horovodrun.

One small synthetic set (64-pixel shapes) and one straight 40-iteration run are shared by the tests.
"""
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
import torch

from hpc import checkpoint
from hpc.optim.lamb import CPU_BLOCK_NUMEL
from tests.multirank import MEGDET, REPO, TINY, launch_command, tiny_config

pytestmark = [pytest.mark.multirank, pytest.mark.slow]


@pytest.fixture(scope="module")
def straight_run(run_megdet, shapes_shards):
    out = shapes_shards / "straight"
    done = run_megdet(["train", *tiny_config(shapes_shards, out)], nprocs=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done


def test_a_run_trains_checkpoints_evaluates_and_plots(straight_run):
    out, done = straight_run
    assert "finished 40 iterations on 2 ranks" in done.stdout
    banner = done.stdout[done.stdout.index("megdet train: world of 2 ranks on 1 node (2 per node), launcher horovodrun"):]
    for line in ("  engines: gradients horovod", "  devices: CPU", "  amp: bf16 autocast; channels-last activations",
                 "  ops: pure-PyTorch nms/roi_align",
                 f"  optimizer: PMDLAMB: multi-tensor kernel, cache blocks of {CPU_BLOCK_NUMEL:,} elements",
                 "  batch norm: cross-GPU BN over groups of 2 ranks (4 images), inside a node", "  horovod built with: mpi, gloo", "  data: 0 loader worker(s) per rank"):
        assert line in banner[:1000], (line, banner[:1000])
    assert done.stdout.count("megdet train: world of") == 1, "rank 0 alone says what runs, once"
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in done.stdout
    assert sorted(p.name for p in out.glob("model_*.pt")) == ["model_0000020.pt", "model_0000040.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["AP50"] <= 100.0 and metrics["num_images"] == 8
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "loss" in line]
    assert [line["iter"] for line in train_lines] == list(range(5, 41, 5))
    assert all(line["images_per_s"] > 0 and line["lr"] > 0 for line in train_lines)
    assert train_lines[-1]["loss"] < train_lines[0]["loss"], "40 steps on 24 images must lower the loss"
    assert (out / "metrics.png").stat().st_size > 10_000


def test_accumulated_micro_batches_and_tensorboard_on_one_process(run_megdet, shapes_shards):
    """solver.batch_size=4 from 2 passes of 2 images on one rank (Horovod's backward_passes_per_step
    path is tested in test_distributed_optimizer); the run's TensorBoard events read back."""
    from tests.test_plot import tensorboard_scalars

    out = shapes_shards / "accumulated"
    done = run_megdet(["train", *tiny_config(shapes_shards, out, val=False), "model.bn_size=null", "solver.max_iter=6",
                       "solver.steps=[4]", "solver.warmup_iters=2", "train.log_period=3", "train.checkpoint_period=6",
                       "solver.backward_passes_per_step=2", "train.tensorboard=true"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finished 6 iterations on 1 ranks" in done.stdout and f"tensorboard --logdir {out.parent}" in done.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["iter"] for line in lines] == [3, 6] and all(line["images_per_s"] > 0 for line in lines)
    scalars = tensorboard_scalars(out)
    assert [step for step, _ in scalars["loss/loss"]] == [3, 6]
    assert scalars["loss/loss"][-1][1] == pytest.approx(lines[-1]["loss"], rel=1e-6)
    refused = run_megdet(["train", *tiny_config(shapes_shards, shapes_shards / "refused", val=False),
                          "solver.backward_passes_per_step=3"])
    assert refused.returncode == 2 and "data.images_per_rank=2 x solver.backward_passes_per_step=3" in refused.stderr


def _rank_processes(launcher_process):
    """The rank processes themselves (horovodrun starts each through a shell)."""
    return [p for p in psutil.Process(launcher_process.pid).children(recursive=True)
            if p.name().startswith("python") and "megdet.cli" in p.cmdline()]


def test_sigusr1_on_one_rank_checkpoints_and_resume_is_exact(launch_env, run_megdet, shapes_shards, straight_run):
    """SIGUSR1 reaches one rank only; both stop at the same iteration, checkpoint, exit 75. Resuming
    then gives the same parameters as the straight 40-iteration run."""
    out = shapes_shards / "interrupted"
    argv = launch_command("horovodrun", 2, [*MEGDET, "train", *tiny_config(shapes_shards, out, val=False)])
    first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=launch_env({}), start_new_session=True)
    deadline = time.time() + 600
    while not (out / "model_0000020.pt").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    ranks = _rank_processes(first)
    assert len(ranks) == 2 and first.poll() is None, "the run ended before iteration 20"
    os.kill(ranks[1].pid, signal.SIGUSR1)
    log, _ = first.communicate(timeout=300)
    assert first.returncode != 0
    assert f"exiting with {checkpoint.EXIT_PREEMPTED} so the job can be requeued" in log, log[-3000:]
    # horovodrun itself exits 1 and reports each rank's status; mpirun and srun pass 75 on.
    assert f"exit with status code {checkpoint.EXIT_PREEMPTED}." in log, log[-3000:]
    stopped_at = checkpoint.latest(out)
    stopped_iteration = int(stopped_at.stem.split("_")[1])
    assert 20 <= stopped_iteration < 40
    assert checkpoint.load(stopped_at)["iteration"] == stopped_iteration

    resumed = run_megdet(["train", *tiny_config(shapes_shards, out, val=False), "--resume"], nprocs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {stopped_at} at iteration {stopped_iteration}" in resumed.stdout
    straight = checkpoint.load(straight_run[0] / "model_0000040.pt")
    again = checkpoint.load(out / "model_0000040.pt")
    for name, value in straight["model"].items():
        assert torch.allclose(value.double(), again["model"][name].double(), rtol=0, atol=1e-6), name
    assert again["optimizer"]["iteration"] == 40
    metric_iters = [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metric_iters == sorted(set(metric_iters)), "each iteration once in the metrics after a resume"


def test_distributed_evaluation_equals_one_process(run_megdet, shapes_shards, straight_run):
    ckpt = str(straight_run[0] / "model_0000040.pt")
    metrics = []
    for nprocs in (1, 2):
        eval_dir = shapes_shards / f"eval{nprocs}"
        done = run_megdet(["eval", *tiny_config(shapes_shards, straight_run[0]), "--checkpoint", ckpt,
                           "--out", str(eval_dir)], nprocs=nprocs)
        assert done.returncode == 0, done.stderr[-3000:]
        metrics.append(json.loads((eval_dir / "metrics.json").read_text()))
    assert metrics[0] == metrics[1]


def _error_lines(done, command):
    return [line for line in (done.stdout + done.stderr).splitlines() if f"megdet {command}: error" in line]


@pytest.mark.parametrize("override, message", [
    ("solver.max_itr=5", "unknown config key 'solver.max_itr'"),
    ("solver.batch_size=5", "batch_size=5"),
    ("model.bn_size=3", "bn_size=3"),
    ("data.train=/nonexistent/shards", "/nonexistent/shards"),
])
def test_bad_input_is_one_line_on_every_rank_and_writes_nothing(run_megdet, shapes_shards, override, message):
    out = shapes_shards / f"bad-{override.split('=')[0]}"
    done = run_megdet(["train", *tiny_config(shapes_shards, out), override], nprocs=2, timeout=180)
    assert done.returncode != 0
    lines = _error_lines(done, "train")
    assert len(lines) == 2 and all(message in line for line in lines), done.stdout[-2000:] + done.stderr[-2000:]
    assert {"(rank 0/2)" in lines[0] or "(rank 0/2)" in lines[1], "(rank 1/2)" in lines[0] or "(rank 1/2)" in lines[1]} == {True}
    assert not out.exists(), "no partial output after a bad input"


def test_a_checkpoint_of_another_model_is_refused_by_name(run_megdet, shapes_shards, straight_run):
    ckpt = straight_run[0] / "model_0000040.pt"
    done = run_megdet(["eval", *tiny_config(shapes_shards, straight_run[0]), "model.name=resnet50_fpn",
                       "--checkpoint", str(ckpt)])
    assert done.returncode == 2
    assert _error_lines(done, "eval") == [
        f"megdet eval: error: checkpoint {ckpt} holds a resnet18_fpn with 3 classes, but shapes_r18_cpu builds a "
        "resnet50_fpn with 3: evaluate it with the config that trained it"]


def test_mask_training_on_shards_without_segmentations_is_one_line(run_megdet, tmp_path):
    """VOC's annotations carry no masks: model.mask_on refuses them before training, naming the fix."""
    from tests.test_pack import subset

    ann, images, _ = subset(tmp_path, "voc100", count=4)
    done = run_megdet(["pack", "--coco-json", str(ann), "--images", str(images), "--out", str(tmp_path / "voc")])
    assert done.returncode == 0, done.stderr
    out = tmp_path / "run"
    done = run_megdet(["train", "shapes_r18_cpu", *TINY, "model.num_classes=20", "model.mask_on=true", "model.bn_size=null",
                       "solver.batch_size=2",
                       f"data.train={tmp_path / 'voc'}", "data.val=", f"train.output_dir={out}"])
    assert done.returncode == 2 and len(_error_lines(done, "train")) == 1, done.stderr[-2000:]
    assert "model.mask_on=true but the training shards" in done.stderr and "have no segmentations" in done.stderr
    assert not out.exists()


def test_show_draws_the_ground_truth_and_detections_of_a_run(run_megdet, shapes_shards, straight_run):
    from PIL import Image

    out = shapes_shards / "pictures.png"
    done = run_megdet(["show", str(straight_run[0]), "--images", "3", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"megdet show: 3 images of {shapes_shards / 'val'} with model_0000040.pt's detections: {out}" in done.stdout
    width, height = Image.open(out).size
    assert width == 800 and height == 1200, "one row of two panels per image"
    assert "pictures " in straight_run[1].stdout and (straight_run[0] / "show.png").exists()
    refused = run_megdet(["show", str(shapes_shards / "no-such-run")])
    assert refused.returncode == 2 and "does not exist" in refused.stderr, refused.stderr
