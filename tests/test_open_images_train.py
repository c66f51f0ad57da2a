"""Open Images end to end on real photographs: ``open_images_set`` packed by ``megdet pack``, a Table 5
preset trained a few iterations on 2 ranks (its class count and iterations from the shards), the Open
Images metric at the end and from ``megdet eval CONFIG --checkpoint``, and the same mAP from the files:
the detections the run wrote against the CSV files exported from the shards."""
import json

import pytest
import yaml

from megdet.engine.metrics import OPEN_IMAGES_METRIC

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
TRAIN_IMAGES = 70  # tests.open_images_data: the train split
# largedet_oi_r50_fpn_bs16 at a CPU's size: ResNet-18 from scratch on 2 ranks x 2 images, 128-pixel images;
# 0.4 epochs of the 70 training images at batch 4 are 7 iterations, LR steps at epochs 0.2 and 0.3.
SMALL = ["model.name=resnet18_fpn", "model.backbone_weights=null", "model.bn_size=4", "data.images_per_rank=2",
         "solver.batch_size=4", "data.min_sizes=[96,128]", "data.max_size=160", "data.test_min_size=128",
         "data.num_workers=0", "solver.epochs=0.4", "solver.step_epochs=[0.2,0.3]", "solver.warmup_iters=2",
         "train.log_period=1", "train.checkpoint_period=100", "eval.images_per_rank=4", "eval.score_threshold=0.0"]


def oi_pack(run_megdet, open_images_set, split, out):
    done = run_megdet(["pack", "--boxes", str(open_images_set[split]["boxes"]), "--labels",
                       str(open_images_set[split]["labels"]), "--classes", str(open_images_set["classes"]),
                       "--hierarchy", str(open_images_set["hierarchy"]), "--images", str(open_images_set[split]["images"]),
                       "--out", str(out), "--images-per-shard", "20"])
    assert done.returncode == 0, done.stderr
    return out


def test_pack_train_on_two_ranks_and_evaluate_with_the_open_images_metric(run_megdet, open_images_set, tmp_path):
    train = oi_pack(run_megdet, open_images_set, "train", tmp_path / "train")
    val = oi_pack(run_megdet, open_images_set, "validation", tmp_path / "validation")
    run = tmp_path / "run"
    preset = ["largedet_oi_r50_fpn_bs16", *SMALL, f"data.train={train}", f"data.val={val}", f"train.output_dir={run}"]
    done = run_megdet(["train", *preset], nprocs=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finished 7 iterations on 2 ranks" in done.stdout
    assert "Open Images mAP@0.5 = " in done.stdout and "Average Precision" not in done.stdout

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["num_classes"] == 24  # 20 VOC classes and 4 above them, from the manifest
    assert (resolved["solver"]["max_iter"], resolved["solver"]["steps"]) == (7, [4, 5])  # round(0.4 * 70 / 4)...
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics[OPEN_IMAGES_METRIC] <= 100.0 and metrics["num_images"] == 30
    assert metrics["num_detections"] == 30 * 100  # eval.score_threshold=0: every image keeps its 100 best
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line[OPEN_IMAGES_METRIC] for line in logged if OPEN_IMAGES_METRIC in line] == [metrics[OPEN_IMAGES_METRIC]]
    per_class = json.loads((run / "open_images_metrics.json").read_text())
    assert per_class["mAP@0.5"] * 100 == pytest.approx(metrics[OPEN_IMAGES_METRIC])
    assert {"/m/voc_animal", "/m/voc_pet"} <= set(per_class["classes"]), "boxes count for their ancestors"

    # the run's detections against the files exported from the shards: the same mAP, from the CSV path
    exported = tmp_path / "exported"
    assert run_megdet(["pack", "--out", str(val), "--export-csv", str(exported)]).returncode == 0
    files = run_megdet(["eval", "--metric", "open-images", "--boxes", str(exported / "boxes.csv"), "--labels",
                        str(exported / "labels.csv"), "--classes", str(exported / "classes.csv"), "--hierarchy",
                        str(exported / "hierarchy.json"), "--results", str(run / "detections.csv"),
                        "--out", str(tmp_path / "from_files")])
    assert files.returncode == 0, files.stderr
    from_files = json.loads((tmp_path / "from_files" / "open_images_metrics.json").read_text())
    # the shards hold float32 pixel boxes: the ground truth agrees with the files' to 1e-7
    assert from_files["mAP@0.5"] == pytest.approx(per_class["mAP@0.5"], abs=1e-6)

    # megdet eval CONFIG --checkpoint on the same shards: the Open Images metric again, the same mAP
    evaluated = run_megdet(["eval", *preset, "--checkpoint", str(run / "model_0000007.pt"),
                            "--out", str(tmp_path / "eval")], nprocs=2)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again[OPEN_IMAGES_METRIC] == pytest.approx(metrics[OPEN_IMAGES_METRIC], abs=1e-9)
    assert "Open Images mAP@0.5 = " in evaluated.stdout
