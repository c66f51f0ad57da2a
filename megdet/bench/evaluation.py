"""``megdet bench eval``: seconds to score a COCO-val-sized box set: pycocotools in one process against
our category split (``megdet.engine.coco_split``) on 1, 2 and 4 ranks, and faster-coco-eval when it is
installed, measured side by side in one run, each checked against pycocotools' numbers.

    megdet bench eval                                   # 5000 images, 100 detections each; ranks 1,2,4
    megdet bench eval --images 500 --ranks 1,2          # a smaller set
    megdet bench eval --gt instances_val2017.json --results detections.json   # your own files

The generated set (``synthetic_set``, from ``--seed``) is shaped like COCO val2017: 80 categories with
COCO's ids, 30% of the boxes of category 1 (person: 11004 of 36781 in val2017) and the rest falling
off geometrically (the second class holds about 5%, the rarest a few boxes), about 7.3 boxes per
image (36k over 5000 images), box sides log-uniform from 4 to 400 pixels (about 40% small, 30%
medium, 30% large, as in COCO), 1% crowd boxes; and ``--detections`` detections per image: a
jittered copy of most ground-truth boxes (10% with a wrong category), the rest random boxes with
lower scores. Files go to ``--out`` (``gt.json``, ``results.json``).

What is timed, on loaded files (JSON parsing is not):
  pycocotools       a copy of the results (``loadRes`` adds keys to the dicts it is given), ``loadRes``,
                    ``evaluate()``, ``accumulate()``, ``summarize()``, in this process;
  faster-coco-eval  the same steps with its own COCO and COCOeval_faster, in this process;
  ours              ``megdet.engine.evaluate.evaluate``: the results' checks, each rank's copy,
                    ``loadRes``, ``evaluate()`` and ``accumulate()`` of its categories, the gather to
                    rank 0, the combination and ``summarize()``; the slowest rank's wall time after a
                    barrier; 1 rank in this process, N > 1 under ``--engine``'s launcher.
Each scorer runs ``--repeat`` times (the three in this process in turn, round by round, so that they
meet the machine's load alike) and the table gives its fastest run: on a machine shared with other
work, the least disturbed one. ``x_pycocotools`` is pycocotools' seconds over the row's;
``detections_per_rank`` the detections of each rank's deal of the categories (one category is never
split, so COCO's person class, 30% of the detections, bounds the speed-up near 1 / 0.3).
``printed_equal``: the 12 numbers equal pycocotools' to the 3 printed digits. ``exact``: for ours, the
printed table and the 12 float64 numbers equal pycocotools' bit for bit (tests/test_split_eval.py
checks the arrays); for faster-coco-eval, the 12 numbers and its precision, recall and scores arrays
bit for bit, with ``max_abs_diff`` the arrays' largest difference from pycocotools' and the note
saying whether their -1 cells (no ground truth) are in the same places. Ranks on one host share its
cores: more ranks than cores are oversubscribed and measure the split's overhead, not a speed-up.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from hpc import comm as comm_mod
from hpc import launch
from hpc.errors import UserError
from hpc.files import write_atomic
from megdet.bench import report, spawn

NAME = "eval"
COLUMNS = ("scorer", "ranks", "seconds", "x_pycocotools", "detections_per_rank", "exact", "printed_equal",
           "max_abs_diff", "note")
DEFAULT_RANKS = "1,2,4"
ARRAYS = ("precision", "recall", "scores")
METRIC_COUNT = 12  # COCOeval.summarize's numbers (faster-coco-eval's stats go on with its extra ones)
# COCO's 80 category ids (1..90 with gaps)
COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
                     31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
                     56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
                     85, 86, 87, 88, 89, 90)
PERSON_SHARE = 0.30  # val2017: 11004 of 36781 boxes
TAIL_DECAY = 0.94  # each next class has 6% fewer boxes: the second about 5% of all, the rarest a few boxes
BOXES_PER_IMAGE = 7.3  # val2017: 36781 boxes / 5000 images
MAX_BOXES_PER_IMAGE = 60
SIDE_RANGE = (4.0, 400.0)  # pixels, log-uniform
CROWD_SHARE = 0.01
FOUND_SHARE = 0.8  # ground-truth boxes with a detection near them
WRONG_CLASS_SHARE = 0.1
IMAGE_WIDTH, IMAGE_HEIGHTS = 640, (360, 640)


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=5000, help="images of the generated set (default: %(default)s)")
    parser.add_argument("--detections", type=int, default=100,
                        help="detections per image of the generated set (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated set (default: %(default)s)")
    parser.add_argument("--gt", help="score this COCO instances file instead of a generated set (with --results)")
    parser.add_argument("--results", help="COCO box results to score against --gt")
    parser.add_argument("--ranks", default=None,
                        help=f"rank counts of our split, comma-separated (default: {DEFAULT_RANKS}; under a "
                             "launcher: the launched world)")
    parser.add_argument("--engine", default="horovod", choices=spawn.ENGINES,
                        help="when no launcher started us: how to start the N-rank runs (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="timed runs of each scorer; the table gives the fastest, the one least disturbed by "
                             "other work on the machine (default: %(default)s)")


def run(args) -> int:
    if (args.gt is None) != (args.results is None):
        raise UserError("give both --gt and --results to score your own files, or neither for a generated set")
    for name in ("images", "detections", "repeat"):
        if getattr(args, name) < 1:
            raise UserError(f"Invalid --{name}: {getattr(args, name)}; need at least 1")
    if (launch.detect().size or 1) > 1:
        if args.gt is None:
            raise UserError("under a launcher, give --gt and --results (megdet bench eval without a launcher "
                            "writes a generated set and starts the ranks itself)")
        return _run_rank(args)
    return _compare(args, spawn.parse_ranks(args.ranks or DEFAULT_RANKS))


def synthetic_set(images: int, detections: int, seed: int) -> Tuple[Dict, List[Dict]]:
    """(COCO instances dict, box results) shaped like COCO val2017 (see the module's docstring):
    ``images`` images, ``detections`` detections on each."""
    rng = np.random.default_rng(seed)
    tail = TAIL_DECAY ** np.arange(len(COCO_CATEGORY_IDS) - 1)
    spread = np.concatenate([[PERSON_SHARE], (1 - PERSON_SHARE) * tail / tail.sum()])
    categories = np.asarray(COCO_CATEGORY_IDS)
    dataset = {"images": [], "annotations": [], "categories": [{"id": int(c), "name": str(c)} for c in categories]}
    results: List[Dict] = []
    for image_id in range(1, images + 1):
        height = int(rng.integers(*IMAGE_HEIGHTS, endpoint=True))
        dataset["images"].append({"id": image_id, "width": IMAGE_WIDTH, "height": height})
        count = min(int(rng.geometric(1 / BOXES_PER_IMAGE)), MAX_BOXES_PER_IMAGE)
        boxes = _random_boxes(rng, count, height)  # [G, 4] x, y, w, h
        labels = rng.choice(categories, size=count, p=spread)
        crowd = rng.random(count) < CROWD_SHARE
        for box, label, is_crowd in zip(boxes, labels, crowd):
            dataset["annotations"].append({"id": len(dataset["annotations"]) + 1, "image_id": image_id,
                                           "category_id": int(label), "bbox": box.tolist(),
                                           "area": float(box[2] * box[3]), "iscrowd": int(is_crowd)})
        found = rng.random(count) < FOUND_SHARE
        near = boxes[found][:detections]
        # (D, 4): each found box moved by up to 15% of its size, its sides scaled by up to 15%
        near = near + near[:, [2, 3, 2, 3]] * rng.uniform(-0.15, 0.15, size=near.shape)
        near_labels = np.where(rng.random(len(near)) < WRONG_CLASS_SHARE,
                               rng.choice(categories, size=len(near), p=spread), labels[found][:detections])
        others = detections - len(near)
        all_boxes = np.concatenate([near, _random_boxes(rng, others, height)])
        all_labels = np.concatenate([near_labels, rng.choice(categories, size=others, p=spread)])
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(near)), rng.uniform(0.0, 0.6, others)])
        for box, label, score in zip(all_boxes, all_labels, scores):
            results.append({"image_id": image_id, "category_id": int(label),
                             "bbox": [round(float(v), 2) for v in box], "score": round(float(score), 5)})
    return dataset, results


def _random_boxes(rng: np.random.Generator, count: int, height: int) -> np.ndarray:
    """[count, 4] boxes x, y, w, h inside an IMAGE_WIDTH x ``height`` image, sides log-uniform in
    SIDE_RANGE, aspect ratios log-uniform in [1/2, 2]."""
    side = np.exp(rng.uniform(*np.log(SIDE_RANGE), size=count))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=count))
    w = np.minimum(side * np.sqrt(aspect), IMAGE_WIDTH - 1)
    h = np.minimum(side / np.sqrt(aspect), height - 1)
    x = rng.uniform(0, IMAGE_WIDTH - w)
    y = rng.uniform(0, height - h)
    return np.round(np.stack([x, y, w, h], axis=1), 2)


def _compare(args, ranks: List[int]) -> int:
    """Every scorer on the same files: pycocotools, faster-coco-eval and ours on 1 rank in this process,
    in turn, ``--repeat`` rounds; then ours on each N > 1 under the launcher; rows with the ratios and
    the checks."""
    from megdet.engine import evaluate

    if args.gt is None:
        folder = Path(args.out)
        dataset, results = synthetic_set(args.images, args.detections, args.seed)
        gt_path, results_path = folder / "gt.json", folder / "results.json"
        write_atomic(gt_path, json.dumps(dataset))
        write_atomic(results_path, json.dumps(results))
        print(f"megdet bench eval: {len(dataset['images'])} images, {len(dataset['annotations'])} boxes, "
              f"{len(results)} detections in {folder}", flush=True)
    else:
        gt_path, results_path = Path(args.gt), Path(args.results)
    results = evaluate.load_results(results_path)
    scorers = _in_process_scorers(gt_path, with_ours=1 in ranks)
    seconds: Dict[str, List[float]] = {name: [] for name in scorers}
    outcomes: Dict = {}
    for _ in range(args.repeat):  # in turn, so that each scorer meets the machine's load alike
        for name, score in scorers.items():
            elapsed, outcomes[name] = score(results)
            seconds[name].append(elapsed)
    reference = outcomes["pycocotools"]
    rows = [{"scorer": "pycocotools", "ranks": 1, "seconds": min(seconds["pycocotools"]), "exact": "reference"},
            _faster_coco_eval_row(seconds.get("faster-coco-eval"), outcomes.get("faster-coco-eval"), reference)]
    if "ours" in scorers:
        rows.append({**outcomes["ours"], "seconds": min(seconds["ours"])})
    with tempfile.TemporaryDirectory(prefix="megdet-bench-eval-") as scratch:
        for n in ranks:
            if n > 1:
                rows += spawn.run_ranks(NAME, args.engine, n, Path(scratch) / str(n),
                                        [f"--gt={gt_path}", f"--results={results_path}", f"--repeat={args.repeat}"])
    cores = len(os.sched_getaffinity(0))
    for row in rows:
        if row["seconds"] is not None:
            row["x_pycocotools"] = rows[0]["seconds"] / row["seconds"]
        if row["scorer"] == "ours":
            metrics = row.pop("metrics")
            row["exact"] = row.pop("table") == reference["table"] and metrics == reference["percent"]
            row["printed_equal"] = _printed(m / 100.0 for m in metrics) == _printed(reference["stats"])
            if row["ranks"] > cores:
                row["note"] = f"{row['ranks']} ranks on {cores} cores: oversubscribed"
    inputs = {"images": args.images, "detections": args.detections, "seed": args.seed, "gt": str(gt_path),
              "results": str(results_path), "ranks": ranks, "engine": args.engine, "repeat": args.repeat,
              "cores": cores}
    print(report.write(args.out, NAME, rows, COLUMNS, inputs=inputs))
    return 0


def _in_process_scorers(gt_path: Path, with_ours: bool) -> Dict[str, Callable]:
    """{name: score(results) -> (seconds, outcome)} of the scorers that run in this process, each on
    its own copy of the ground truth: pycocotools, faster-coco-eval (when installed), ours on 1 rank."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from megdet.engine import evaluate

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
    scorers = {"pycocotools": lambda results: _timed_coco_eval(coco_gt, COCOeval, results)}
    try:
        from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster
    except ImportError:
        pass
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            faster_gt = FasterCOCO(str(gt_path))
        scorers["faster-coco-eval"] = lambda results: _timed_coco_eval(faster_gt, COCOeval_faster, results)
    if with_ours:
        comm, our_gt = comm_mod.init("local"), evaluate.load_ground_truth(gt_path)
        scorers["ours"] = lambda results: _ours(comm, our_gt, results)
    return scorers


def _timed_coco_eval(coco_gt, evaluator_class, results: List[Dict]) -> Tuple[float, Dict]:
    """(seconds, outcome) of copying the results (``loadRes`` adds keys to the dicts it is given; ours
    copies too), loadRes, evaluate, accumulate and summarize; the outcome holds the printed summary,
    the stats (also in percent, as our metrics are) and the precision, recall and scores arrays."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        start = time.perf_counter()
        evaluator = evaluator_class(coco_gt, coco_gt.loadRes([dict(r) for r in results]), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        mark = printed.tell()
        evaluator.summarize()
        seconds = time.perf_counter() - start
    stats = [float(s) for s in evaluator.stats[:METRIC_COUNT]]
    return seconds, {"table": printed.getvalue()[mark:], "stats": stats, "percent": [s * 100.0 for s in stats],
                     **{key: np.asarray(evaluator.eval[key]) for key in ARRAYS}}


def _faster_coco_eval_row(seconds: Optional[List[float]], outcome: Optional[Dict], reference: Dict) -> Dict:
    """faster-coco-eval's row: its fastest time and its numbers against pycocotools', or a row saying
    it is not installed."""
    row: Dict = {"scorer": "faster-coco-eval", "ranks": 1, "seconds": None}
    if outcome is None:
        return {**row, "note": "not installed (pip install faster-coco-eval to measure it)"}
    from faster_coco_eval import __version__

    differences, same_cells = [], True
    for key in ARRAYS:
        theirs, ours = outcome[key], reference[key]
        same_cells &= theirs.shape == ours.shape and bool(np.array_equal(theirs == -1, ours == -1))
        differences.append(float(np.max(np.abs(theirs - ours))) if theirs.shape == ours.shape else float("inf"))
    return {**row, "seconds": min(seconds), "exact": outcome["stats"] == reference["stats"] and max(differences) == 0.0,
            "printed_equal": _printed(outcome["stats"]) == _printed(reference["stats"]),
            "max_abs_diff": max(differences),
            "note": f"version {__version__}; -1 cells {'same' if same_cells else 'differ'}"}


def _printed(stats) -> List[str]:
    """The numbers as COCOeval.summarize prints them."""
    return [f"{s:0.3f}" for s in stats]


def _ours(comm, coco_gt, results: List[Dict]) -> Tuple[float, Dict]:
    """(seconds, outcome) of ``evaluate`` on ``comm``'s ranks after a barrier, the slowest rank's
    (collective); the outcome is our row without its time: the detections of each rank's deal of the
    categories, the table and the metrics for the check."""
    from megdet.engine import coco_split, evaluate

    comm.barrier()
    start = time.perf_counter()
    metrics, table = evaluate.evaluate(coco_gt, results, comm=comm)
    seconds = max(comm.allgather_object(time.perf_counter() - start))
    detections = coco_split.detections_per_category(results)
    shares = coco_split.deal_categories(sorted(coco_gt.getCatIds()), detections, comm.size)
    return seconds, {"scorer": "ours", "ranks": comm.size, "table": table,
                     "metrics": [metrics[name] for name in evaluate.METRIC_NAMES],
                     "detections_per_rank": " / ".join(str(sum(detections[c] for c in share)) for share in shares)}


def _run_rank(args) -> int:
    """One launched measurement of ours on --gt and --results, the fastest of --repeat; rank 0 writes
    the row."""
    from megdet.engine import evaluate

    comm = comm_mod.init()
    with comm.all_or_none():
        coco_gt, results = evaluate.load_ground_truth(args.gt), evaluate.load_results(args.results)
    seconds = []
    for _ in range(args.repeat):
        elapsed, row = _ours(comm, coco_gt, results)
        seconds.append(elapsed)
    if comm.rank == 0:
        report.write(args.out, NAME, [{**row, "seconds": min(seconds)}], COLUMNS,
                     inputs={"gt": args.gt, "results": args.results, "repeat": args.repeat})
    return 0
