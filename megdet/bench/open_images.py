"""``megdet bench open-images``: seconds to read and score an Open Images validation-sized result.

    megdet bench open-images --images 41620 --detections-per-image 100 --out runs/bench/open-images

Writes a synthetic set (``megdet.data.open_images_synth``: 41,620 images as Open Images' validation
split, about 7 boxes and exactly --detections-per-image detections each) into --data, else into a
temporary folder, then runs the stages of ``megdet eval --metric open-images`` one after the other:
  read_ground_truth  classes, hierarchy, boxes and image-level labels files -> validated arrays
  read_detections    the results CSV -> validated arrays
  evaluate           expansion, verified classes, per-image matching (NumPy), AP per class
Each row gives the wall clock and this process's CPU time; on a machine shared with other work the
CPU seconds are the figures to compare, and ``cpu_share`` is each stage's part of the total. The mAP
is printed so that two runs of the same set can be checked against each other.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Dict, List

from hpc.errors import UserError
from megdet.bench import report
from megdet.data import open_images
from megdet.data.open_images_synth import write_synthetic_open_images
from megdet.engine import open_images_metric

NAME = "open_images"
COLUMNS = ("stage", "rows", "wall_s", "cpu_s", "cpu_share", "rows_per_cpu_s")
VALIDATION_IMAGES = 41_620  # Open Images V5/V6 validation split (and the 2019 challenge's validation set)


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=VALIDATION_IMAGES, help="images (default: %(default)s)")
    parser.add_argument("--detections-per-image", type=int, default=100, help="(default: %(default)s)")
    parser.add_argument("--boxes-per-image", type=float, default=7.3,
                        help="mean ground-truth boxes per image (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic set (default: %(default)s)")
    parser.add_argument("--data", help="folder to write the synthetic set into and keep (default: a temporary one)")


def run(args) -> int:
    if args.images < 1 or args.detections_per_image < 0 or args.boxes_per_image < 0:
        raise UserError(f"--images {args.images}, --detections-per-image {args.detections_per_image}, "
                        f"--boxes-per-image {args.boxes_per_image}: give at least 1 image and no negative count")
    with tempfile.TemporaryDirectory(prefix="oi-bench-") as scratch:
        folder = Path(args.data) if args.data else Path(scratch)
        rows: List[Dict] = []
        with _timed(rows, "write_synthetic_set") as row:
            paths = write_synthetic_open_images(folder, args.images, args.detections_per_image,
                                                args.boxes_per_image, seed=args.seed)
        with _timed(rows, "read_ground_truth") as row:
            hierarchy = open_images.read_hierarchy(paths["hierarchy"], paths["classes"])
            truth = open_images.read_ground_truth(paths["boxes"], paths["labels"], hierarchy)
            row["rows"] = len(truth.boxes.label) + len(truth.image_labels.label)
        with _timed(rows, "read_detections") as row:
            detections = open_images.read_detections(paths["results"], truth, hierarchy)
            row["rows"] = len(detections.label)
        with _timed(rows, "evaluate") as row:
            result = open_images_metric.evaluate(hierarchy, truth, detections)
            row["rows"] = len(detections.label)
    scored = rows[1:]  # the stages of megdet eval; writing the set is not one
    total = sum(row["cpu_s"] for row in scored)
    for row in scored:
        row["cpu_share"] = row["cpu_s"] / total if total else None
        row["rows_per_cpu_s"] = row["rows"] / row["cpu_s"] if row["cpu_s"] else None
    rows.append({"stage": "megdet eval (the three)", "rows": rows[2]["rows"],
                 "wall_s": sum(row["wall_s"] for row in scored), "cpu_s": total, "cpu_share": 1.0,
                 "rows_per_cpu_s": rows[2]["rows"] / total if total else None})
    inputs = {"images": args.images, "detections_per_image": args.detections_per_image,
              "boxes_per_image": args.boxes_per_image, "seed": args.seed, "mAP": result.mean_ap,
              "detections": result.detections}
    table = report.write(args.out, NAME, rows, COLUMNS, inputs, report.machine(cuda=False))
    print(f"{args.images} images x {args.detections_per_image} detections, {len(truth.boxes.label)} boxes: "
          f"mAP@0.5 {result.mean_ap:.4f}")
    print(table)
    print(f"results in {args.out}")
    return 0


class _timed:
    """``with _timed(rows, stage) as row``: appends ``row`` with the block's wall and CPU seconds."""

    def __init__(self, rows: List[Dict], stage: str):
        self.row = {"stage": stage, "rows": None}
        rows.append(self.row)

    def __enter__(self) -> Dict:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self.row

    def __exit__(self, *exc) -> None:
        self.row["wall_s"] = time.perf_counter() - self.wall
        self.row["cpu_s"] = time.process_time() - self.cpu
