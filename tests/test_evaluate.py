"""COCO box evaluation: the published cocoapi table, real ground truth fed back, the CLI's errors, and
the gather of detections over 2 real ranks."""
import json
import re

import numpy as np
import pytest
import torch

from hpc.errors import UserError
from megdet.engine import evaluate
from tests.conftest import REALDATA
from tests.multirank import expect_ok, run_ranks

COCOAPI = REALDATA / "cocoapi_val2014_100"
GT = COCOAPI / "instances_val2014_100.json"
FAKE_BBOX = COCOAPI / "instances_val2014_fakebbox100_results.json"
FAKE_SEGM = COCOAPI / "instances_val2014_fakesegm100_results.json"
CHESS = REALDATA / "roboflow_chess_v23" / "valid" / "_annotations.coco.json"

needs_cocoapi = pytest.mark.skipif(not GT.exists(), reason=f"{COCOAPI} is absent (the shared real data)")


def published_bbox_table():
    return published_table("bbox")


def published_table(iou_type):
    """The 12 numbers of the ``iou_type`` table in the cocoapi demo's published output, in summarize() order."""
    text = (COCOAPI / "val2014_fake_eval_res.txt").read_text()
    section = text.split(f"type={iou_type}", 1)[1].split("type=", 1)[0]
    numbers = [float(n) for n in re.findall(r"\] = (-?\d\.\d{3})", section)]
    assert len(numbers) == 12, section
    return numbers


def as_printed(metrics):
    """The metrics (percent) as COCOeval.summarize prints them: fractions with 3 digits."""
    return [float(f"{metrics[name] / 100:0.3f}") for name in evaluate.METRIC_NAMES]



@needs_cocoapi
def test_cli_reproduces_the_published_cocoapi_bbox_table(run_megdet, tmp_path):
    done = run_megdet(["eval", "--gt", str(GT), "--results", str(FAKE_BBOX), "--out", str(tmp_path / "eval")],
                      timeout=120)
    assert done.returncode == 0, done.stderr
    published = published_bbox_table()
    printed = [float(n) for n in re.findall(r"\] = (-?\d\.\d{3})", done.stdout)]
    assert printed == published, done.stdout
    metrics = json.loads((tmp_path / "eval" / evaluate.EVAL_METRICS_FILE).read_text())
    assert as_printed(metrics) == published
    assert metrics["num_images"] == 100 and metrics["num_detections"] == 734
    assert [p.name for p in (tmp_path / "eval").iterdir()] == [evaluate.EVAL_METRICS_FILE], "no temporary files left"


@needs_cocoapi
@pytest.mark.parametrize("args, message", [
    (["--gt", "/no/such/gt.json", "--results", str(FAKE_BBOX)], "ground truth file /no/such/gt.json does not exist"),
    (["--gt", str(GT), "--results", "/no/such/dets.json"], "results file /no/such/dets.json does not exist"),
    (["--gt", str(GT)], "give both --gt"),
])
def test_cli_errors_are_one_line_with_exit_code_2(run_megdet, tmp_path, args, message):
    done = run_megdet(["eval", *args, "--out", str(tmp_path / "eval")], timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("megdet eval: error: "), done.stderr
    assert message in done.stderr
    assert not (tmp_path / "eval").exists(), "no output on error"


@needs_cocoapi
def test_bad_results_name_the_problem(tmp_path):
    coco_gt = evaluate.load_ground_truth(GT)
    (tmp_path / "dict.json").write_text('{"image_id": 1}')
    with pytest.raises(UserError, match="must hold a list of detections"):
        evaluate.load_results(tmp_path / "dict.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(UserError, match="is not valid JSON"):
        evaluate.load_results(tmp_path / "broken.json")
    (tmp_path / "no_score.json").write_text('[{"image_id": 42, "category_id": 1, "bbox": [0, 0, 1, 1]}]')
    with pytest.raises(UserError, match="lacks one of image_id, category_id, bbox, score"):
        evaluate.load_results(tmp_path / "no_score.json")
    with pytest.raises(UserError, match=r"1 image ids that the ground truth lacks \(e.g. \[999999\]\)"):
        evaluate.evaluate(coco_gt, [{"image_id": 999999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}])
    with pytest.raises(UserError, match=r"category ids \[0\]"):
        evaluate.evaluate(coco_gt, [{"image_id": 42, "category_id": 0, "bbox": [0, 0, 5, 5], "score": 1.0}])


@needs_cocoapi
def test_no_detections_is_zero_ap_not_a_crash():
    metrics, table = evaluate.evaluate(evaluate.load_ground_truth(GT), [])
    assert metrics["AP"] == 0.0 and metrics["AR100"] == 0.0
    assert "Average Precision" in table


@pytest.mark.skipif(not CHESS.exists(), reason=f"{CHESS} is absent (the shared real data)")
def test_ground_truth_fed_back_through_detector_outputs_scores_100():
    """The chess set numbers annotations from 0 (pycocotools' "no match") and has a category id 0:
    detector outputs (xyxy, labels 1..C) mapped back to COCO ids must score AP 100."""
    coco_gt = evaluate.load_ground_truth(CHESS)
    category_ids = sorted(coco_gt.getCatIds())
    assert category_ids[0] == 0
    per_image = {}
    for image_id in coco_gt.getImgIds():
        annotations = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id))
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],
                             dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([category_ids.index(a["category_id"]) + 1 for a in annotations], dtype=torch.int64)
        output = {"boxes": boxes, "scores": torch.linspace(1.0, 0.5, len(annotations)), "labels": labels}
        per_image[image_id] = evaluate.detections_to_array(output, category_ids)
    results = evaluate.arrays_to_results(per_image)
    assert {r["category_id"] for r in results} == {a["category_id"] for a in coco_gt.dataset["annotations"]}
    metrics, _ = evaluate.evaluate(coco_gt, results)
    assert metrics["AP"] == pytest.approx(100.0) and metrics["AP75"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="Invalid labels"):
        evaluate.detections_to_array({"boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                                      "labels": torch.tensor([0])}, category_ids)


def results_to_arrays(results):
    """A COCO results list -> per-image [D, 6] arrays, the inverse of ``evaluate.arrays_to_results``."""
    rows = {}
    for result in results:
        rows.setdefault(int(result["image_id"]), []).append([*result["bbox"], result["score"], result["category_id"]])
    return {image_id: np.asarray(r, dtype=np.float64).reshape(-1, 6) for image_id, r in rows.items()}


def body_distributed_evaluation(comm, out_dir):
    """Rank r holds the images whose position is r mod 2, plus the first image on both ranks (as a
    padding sampler does); rank 0 writes the files; every rank returns the metrics."""
    results = evaluate.load_results(FAKE_BBOX)
    per_image = results_to_arrays(results)
    image_ids = sorted(per_image)
    mine = {i: per_image[i] for k, i in enumerate(image_ids) if k % comm.size == comm.rank or k == 0}
    coco_gt = evaluate.load_ground_truth(GT)
    metrics, table = evaluate.evaluate_distributed(comm, coco_gt, mine, out_dir=out_dir)
    return {"metrics": metrics, "has_table": "Average Precision" in table, "local_images": len(mine)}


@needs_cocoapi
@pytest.mark.multirank
def test_two_ranks_give_the_metrics_of_one(tmp_path):
    values = expect_ok(run_ranks("tests.test_evaluate:body_distributed_evaluation", 2, "horovodrun",
                                 out_dir=str(tmp_path / "eval")))
    coco_gt = evaluate.load_ground_truth(GT)
    per_image = results_to_arrays(evaluate.load_results(FAKE_BBOX))
    single, _ = evaluate.evaluate(coco_gt, evaluate.arrays_to_results(per_image))
    assert as_printed(single) == published_bbox_table()
    for value in values:
        assert value["metrics"] == single and value["has_table"]
    assert values[0]["local_images"] + values[1]["local_images"] == len(per_image) + 1
    written = json.loads((tmp_path / "eval" / evaluate.RESULTS_FILE).read_text())
    assert len(written) == 734 and sorted({r["image_id"] for r in written}) == sorted(per_image)
    assert json.loads((tmp_path / "eval" / evaluate.EVAL_METRICS_FILE).read_text())["AP"] == single["AP"]


@needs_cocoapi
def test_cli_reproduces_the_published_cocoapi_segm_table(run_megdet, tmp_path):
    done = run_megdet(["eval", "--gt", str(GT), "--results", str(FAKE_SEGM), "--iou-type", "segm",
                       "--out", str(tmp_path / "eval")], timeout=120)
    assert done.returncode == 0, done.stderr
    published = published_table("segm")
    printed = [float(n) for n in re.findall(r"\] = (-?\d\.\d{3})", done.stdout)]
    assert printed == published, done.stdout
    assert done.stdout.startswith("segm: 734 detections on 100 images")
    metrics = json.loads((tmp_path / "eval" / evaluate.EVAL_METRICS_FILE).read_text())
    assert as_printed(metrics) == published and metrics["num_detections"] == 734


@needs_cocoapi
def test_segm_results_of_boxes_are_a_one_line_error_and_write_nothing(run_megdet, tmp_path):
    done = run_megdet(["eval", "--gt", str(GT), "--results", str(FAKE_BBOX), "--iou-type", "segm",
                       "--out", str(tmp_path / "eval")], timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("megdet eval: error: "), done.stderr
    assert f"detection 0 of {FAKE_BBOX} lacks one of image_id, category_id, segmentation, score" in done.stderr
    assert "--iou-type bbox" in done.stderr
    assert not (tmp_path / "eval").exists(), "no output on error"


@needs_cocoapi
def test_segm_uses_the_mask_area_not_a_results_box(tmp_path):
    """Detections that also carry a box (as a Mask R-CNN writes them) give the same mask AP: pycocotools
    would take the box's area for the small/medium/large ranges; here a 1 x 1 box for every detection."""
    coco_gt = evaluate.load_ground_truth(GT)
    results = evaluate.load_segm_results(FAKE_SEGM)
    with_boxes = [{**r, "bbox": [0.0, 0.0, 1.0, 1.0]} for r in results]
    metrics, _ = evaluate.evaluate(coco_gt, with_boxes, iou_type="segm")
    assert as_printed(metrics) == published_table("segm")
    assert all("area" not in r for r in with_boxes), "the caller's dicts are left alone"


@needs_cocoapi
def test_bad_segm_results_name_the_detection():
    coco_gt = evaluate.load_ground_truth(GT)
    detection = {"image_id": 42, "category_id": 18, "score": 1.0}
    with pytest.raises(UserError, match="detection 1 of the results lacks one of image_id, category_id, segmentation"):
        evaluate.evaluate(coco_gt, [{**detection, "segmentation": {"size": [478, 640], "counts": "PPYo0"}},
                                    {**detection, "bbox": [0, 0, 5, 5]}], iou_type="segm")
    with pytest.raises(UserError, match="detection 0 of the results has a \"segmentation\" that is not a compressed RLE"):
        evaluate.evaluate(coco_gt, [{**detection, "segmentation": [[0, 0, 5, 0, 5, 5]]}], iou_type="segm")
    with pytest.raises(UserError, match="detection 0 has a 10x10 mask but image 42 is 478x640 .* original image size"):
        evaluate.evaluate(coco_gt, [{**detection, "segmentation": {"size": [10, 10], "counts": "0P2"}}],
                          iou_type="segm")
    if CHESS.exists():
        chess = evaluate.load_ground_truth(CHESS)
        image = chess.dataset["images"][0]
        with pytest.raises(UserError, match="ground-truth annotation 1 of image 0 has no segmentation"):
            evaluate.evaluate(chess, [{"image_id": image["id"], "category_id": 1, "score": 1.0,
                                       "segmentation": {"size": [image["height"], image["width"]], "counts": "0"}}],
                              iou_type="segm")
