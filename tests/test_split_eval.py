"""COCO scoring split across ranks by category (``megdet.engine.coco_split``): the deal of the
categories, and the precision / recall / scores arrays and the summary table of 1, 2 and 3 real ranks
against single-process pycocotools on the real sets (cocoapi val2014 100 images, bbox and segm; VOC100
detections), uneven deals included; ``megdet eval --gt --results`` on 2 ranks; the training path's
``evaluate_distributed`` with masks on 3 ranks; bad results in one line on every rank."""
from __future__ import annotations

import contextlib
import io
import json
import re
from collections import Counter

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools import mask as mask_util
from pycocotools.cocoeval import COCOeval

from hpc.comm.local import LocalCommunicator
from megdet.engine import coco_split, evaluate
from tests.conftest import REALDATA
from tests.multirank import expect_ok, run_ranks
from tests.test_evaluate import as_printed, results_to_arrays

COCOAPI = REALDATA / "cocoapi_val2014_100"
COCO_GT = COCOAPI / "instances_val2014_100.json"
FAKE_BBOX = COCOAPI / "instances_val2014_fakebbox100_results.json"
FAKE_SEGM = COCOAPI / "instances_val2014_fakesegm100_results.json"
VOC_GT = REALDATA / "padilla_voc100" / "instances_default.json"
VOC_DETS = REALDATA / "padilla_voc100" / "coco_dets_as_results_remapped_to_instances_default.json"
TWO_CATEGORIES = (1, 15)  # person and the VOC set's second most detected class
# name: (ground truth, results, iou type, categories kept in the ground truth and results: None = all)
CASES = {
    "cocoapi-bbox": (COCO_GT, FAKE_BBOX, "bbox", None),
    "cocoapi-segm": (COCO_GT, FAKE_SEGM, "segm", None),
    "voc100-bbox": (VOC_GT, VOC_DETS, "bbox", None),
    # 80 categories, detections of 2: at 3 ranks one rank scores categories without any detection
    "cocoapi-bbox-2-detected": (COCO_GT, FAKE_BBOX, "bbox", ("results", TWO_CATEGORIES)),
    # 2 categories in all: at 3 ranks one rank scores none
    "voc100-2-categories": (VOC_GT, VOC_DETS, "bbox", ("both", TWO_CATEGORIES)),
}
ARRAYS = ("precision", "recall", "scores")

needs_realdata = pytest.mark.skipif(not (COCO_GT.exists() and VOC_GT.exists()),
                                    reason=f"the real data sets are not at {REALDATA} (../shared/realdata)")


def load_case(name):
    """(ground-truth instances dict, results list, iou type) of case ``name``, fresh from the files."""
    gt_path, results_path, iou_type, kept = CASES[name]
    dataset, results = json.loads(gt_path.read_text()), json.loads(results_path.read_text())
    if kept is not None:
        where, categories = kept
        results = [r for r in results if r["category_id"] in categories]
        if where == "both":
            dataset["categories"] = [c for c in dataset["categories"] if c["id"] in categories]
            dataset["annotations"] = [a for a in dataset["annotations"] if a["category_id"] in categories]
    return dataset, results, iou_type


def pycocotools_reference(dataset, results, iou_type):
    """Single-process pycocotools: accumulate()'s arrays, stats and printed summary."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluator.summarize()
    return {**{key: evaluator.eval[key] for key in ARRAYS}, "stats": evaluator.stats, "table": printed.getvalue()}


@pytest.fixture(scope="module")
def references():
    return {name: pycocotools_reference(*load_case(name)) for name in CASES}


def split_scores(comm, name):
    """Case ``name`` scored with the categories split over ``comm``'s ranks: on rank 0 the combined
    arrays, stats and table, and on every rank its share, the metrics and table of ``evaluate``."""
    dataset, results, iou_type = load_case(name)
    coco_gt = evaluate.ground_truth_from_dict(dataset)
    out = {"share": coco_split.deal_categories(sorted(coco_gt.getCatIds()),
                                               coco_split.detections_per_category(results), comm.size)[comm.rank]}
    evaluator = coco_split.score_on_ranks(comm, coco_gt, results, iou_type)
    if evaluator is not None:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            evaluator.summarize()
        out.update({key: evaluator.eval[key] for key in ARRAYS}, stats=evaluator.stats, table=printed.getvalue())
    out["metrics"], out["evaluate_table"] = evaluate.evaluate(coco_gt, results, iou_type=iou_type, comm=comm)
    return out


def body_split_scores(comm, names):
    return {name: split_scores(comm, name) for name in names}


def check_equal_to_reference(scored, reference, name):
    for key in ARRAYS:
        ours, theirs = scored[key], reference[key]
        assert ours.shape == theirs.shape, (name, key)
        assert np.array_equal(ours == -1, theirs == -1) and np.array_equal(np.isnan(ours), np.isnan(theirs)), \
            f"{name}: {key} has its -1/NaN cells elsewhere"
        assert np.allclose(ours, theirs, atol=1e-12, rtol=0, equal_nan=True), (name, key)
    assert scored["table"] == reference["table"], name
    assert np.array_equal(scored["stats"], reference["stats"]), name


def without_launcher_prefix(text):
    """The ranks' output without the "[R]<stdout>:" that horovodrun puts before each line."""
    return re.sub(r"^\[\d+\]<std(?:out|err)>:", "", text, flags=re.MULTILINE)


def printed_numbers(table):
    """The 12 numbers of a printed COCOeval summary."""
    return [float(n) for n in re.findall(r"\] = (-?\d\.\d{3})", table)]


def test_the_deal_covers_every_category_once_balances_detections_and_repeats():
    results = json.loads(FAKE_BBOX.read_text()) if FAKE_BBOX.exists() else \
        [{"category_id": c} for c in range(1, 81) for _ in range(c % 7)]
    detections = coco_split.detections_per_category(results)
    categories = list(range(1, 91))  # ten without any detection
    for ranks in (1, 2, 3, 4, 8, 100):
        shares = coco_split.deal_categories(categories, detections, ranks)
        assert len(shares) == ranks
        assert sorted(c for share in shares for c in share) == categories, "every category exactly once"
        assert all(share == sorted(share) for share in shares)
        loads = [sum(detections.get(c, 0) for c in share) for share in shares]
        assert max(loads) - min(loads) <= max(detections.values()), (ranks, loads)
        assert coco_split.deal_categories(list(reversed(categories)), dict(reversed(detections.items())), ranks) \
            == shares, "the same deal whatever the input order"
        sizes = [len(share) for share in shares]
        assert max(sizes) - min(sizes) <= 1 if ranks >= len(categories) else min(sizes) >= 1
    # the heaviest category alone on one rank when it outweighs the rest
    assert coco_split.deal_categories([1, 2, 3], {1: 100, 2: 30, 3: 30}, 2) == [[1], [2, 3]]
    assert coco_split.deal_categories([5, 6], Counter(), 3) == [[5], [6], []]
    with pytest.raises(ValueError, match="Invalid ranks: 0"):
        coco_split.deal_categories([1], {}, 0)


@needs_realdata
@pytest.mark.parametrize("name", list(CASES))
def test_one_rank_equals_pycocotools(references, name):
    scored = split_scores(LocalCommunicator(), name)
    check_equal_to_reference(scored, references[name], name)
    assert scored["evaluate_table"] == references[name]["table"]
    assert as_printed(scored["metrics"]) == printed_numbers(references[name]["table"])


@needs_realdata
def test_pieces_land_at_their_categories_in_any_order(references):
    """Three shares scored apart and handed to ``combine`` in reverse order give the reference arrays;
    a category missing or twice is refused."""
    dataset, results, iou_type = load_case("cocoapi-bbox")
    coco_gt = evaluate.ground_truth_from_dict(dataset)
    shares = coco_split.deal_categories(sorted(coco_gt.getCatIds()), coco_split.detections_per_category(results), 3)
    pieces = [coco_split.score_categories(coco_gt, results, share, iou_type) for share in shares]
    evaluator = coco_split.combine(coco_gt, pieces[::-1], iou_type)
    for key in ARRAYS:
        assert np.array_equal(evaluator.eval[key], references["cocoapi-bbox"][key]), key
    with pytest.raises(ValueError, match="each exactly once"):
        coco_split.combine(coco_gt, pieces[:2], iou_type)
    with pytest.raises(ValueError, match="each exactly once"):
        coco_split.combine(coco_gt, pieces + pieces[:1], iou_type)


@needs_realdata
@pytest.mark.multirank
@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_score_their_categories_and_rank_0_prints_the_table_of_one(references, ranks):
    values = expect_ok(run_ranks("tests.test_split_eval:body_split_scores", ranks, "horovodrun", timeout=300,
                                 names=list(CASES)))
    for name, reference in references.items():
        check_equal_to_reference(values[0][name], reference, name)
        shares = [value[name]["share"] for value in values]
        dataset, results, _ = load_case(name)
        assert sorted(c for share in shares for c in share) == sorted(c["id"] for c in dataset["categories"])
        for value in values:
            assert value[name]["evaluate_table"] == reference["table"], (name, value)
            assert value[name]["metrics"] == values[0][name]["metrics"]
        if ranks == 3 and name == "cocoapi-bbox-2-detected":
            detected = {r["category_id"] for r in results}
            assert any(share and not detected & set(share) for share in shares), "a rank without detections"
        if ranks == 3 and name == "voc100-2-categories":
            assert [] in shares, "a rank without categories"


def fake_segm_with_boxes():
    """The fake segm results, each with its mask's bounding box (as a Mask R-CNN writes both)."""
    return [{**r, "bbox": mask_util.toBbox(r["segmentation"]).tolist()} for r in json.loads(FAKE_SEGM.read_text())]


def body_distributed_boxes_and_masks(comm, out_dir):
    """Rank r holds every size-th image from its own, with each detection's mask; every rank returns
    the metrics and table, rank 0 writes the files."""
    results = fake_segm_with_boxes()
    per_image = results_to_arrays(results)
    masks = {}
    for r in results:
        masks.setdefault(r["image_id"], []).append(r["segmentation"])
    mine = sorted(per_image)[comm.rank::comm.size]
    metrics, table = evaluate.evaluate_distributed(comm, evaluate.load_ground_truth(COCO_GT),
                                                   {i: per_image[i] for i in mine}, out_dir=out_dir,
                                                   masks={i: masks[i] for i in mine})
    return {"metrics": metrics, "table": table}


@needs_realdata
@pytest.mark.multirank
def test_training_evaluation_of_boxes_and_masks_on_three_ranks(references, tmp_path):
    values = expect_ok(run_ranks("tests.test_split_eval:body_distributed_boxes_and_masks", 3, "horovodrun",
                                 timeout=300, out_dir=str(tmp_path / "eval")))
    dataset, _, _ = load_case("cocoapi-segm")
    boxes = pycocotools_reference(dataset, fake_segm_with_boxes(), "bbox")["table"]
    masks = references["cocoapi-segm"]["table"]
    assert all(value == values[0] for value in values)
    assert values[0]["table"] == f"bbox:\n{boxes}segm:\n{masks}"
    metrics = values[0]["metrics"]
    assert as_printed({m: metrics[evaluate.MASK_PREFIX + m] for m in evaluate.METRIC_NAMES}) == printed_numbers(masks)
    assert as_printed(metrics) == printed_numbers(boxes)
    assert len(json.loads((tmp_path / "eval" / evaluate.SEGM_RESULTS_FILE).read_text())) == 734
    assert json.loads((tmp_path / "eval" / evaluate.EVAL_METRICS_FILE).read_text())["mask_AP"] == metrics["mask_AP"]


@needs_realdata
@pytest.mark.multirank
@pytest.mark.parametrize("iou_type, results, launcher, env", [
    ("bbox", FAKE_BBOX, "horovodrun", {}),
    ("segm", FAKE_SEGM, "mpirun-torch", {"MEGDET_COMM": "torch"}),
])
def test_cli_on_two_ranks_prints_the_table_of_one(run_megdet, references, tmp_path, iou_type, results, launcher, env):
    done = run_megdet(["eval", "--gt", str(COCO_GT), "--results", str(results), "--iou-type", iou_type,
                       "--out", str(tmp_path / "eval")], nprocs=2, launcher=launcher, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    reference = references[f"cocoapi-{iou_type}"]["table"]
    printed = without_launcher_prefix(done.stdout)
    assert printed.count(reference) == 1, printed
    assert f"{iou_type}: 734 detections on 100 images of {COCO_GT} on 2 ranks" in printed
    metrics = json.loads((tmp_path / "eval" / evaluate.EVAL_METRICS_FILE).read_text())
    assert as_printed(metrics) == printed_numbers(reference)


def bad_results(kind):
    """(results, the text the error line must hold) of a bad results file."""
    good = json.loads(FAKE_BBOX.read_text())[:5]
    if kind == "unknown category":
        return [*good, {**good[0], "category_id": 1234}], "category ids [1234] that the ground truth lacks"
    if kind == "unknown image":
        return [*good, {**good[0], "image_id": 999999}], "image ids that the ground truth lacks (e.g. [999999])"
    return [], "holds no detections ([])"


@needs_realdata
@pytest.mark.multirank
@pytest.mark.parametrize("kind", ["unknown category", "unknown image", "empty"])
def test_bad_results_are_one_line_on_every_rank(run_megdet, tmp_path, kind):
    results, message = bad_results(kind)
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(results))
    done = run_megdet(["eval", "--gt", str(COCO_GT), "--results", str(path), "--out", str(tmp_path / "eval")],
                      nprocs=2, timeout=300)
    assert done.returncode != 0, done.stderr  # each rank exits 2; horovodrun reports 1
    errors = dict(re.findall(r"megdet eval: error \(rank (\d)/2\): (.*?)(?=megdet eval: error|\n|$)", done.stderr))
    assert sorted(errors) == ["0", "1"] and all(message in line for line in errors.values()), done.stderr
    assert "<stderr>:Traceback" not in done.stderr, "a rank's traceback (horovodrun prints its own)"
    assert not (tmp_path / "eval").exists()
