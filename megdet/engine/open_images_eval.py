"""A model's detections on Open Images shards, scored by the Open Images challenge metric: what training
on such shards evaluates with at the end, and what ``megdet eval CONFIG --checkpoint`` runs on them.

    local, _ = evaluate.infer_on_shards(model, dataset, transform, comm, ...)   # this rank's share
    merged, _ = evaluate.share_detections(comm, local)                            # every rank's
    metrics, table = evaluate_distributed(comm, dataset, merged, out_dir="runs/x")  # collective

Rank 0 turns the detections and the ground truth packed in the shards into the metric's
per-image arrays (boxes normalised by each image's size) and scores them with
``megdet.engine.open_images_metric.evaluate_arrays``, over the classes and hierarchy the shards were
packed with. ``metrics[OPEN_IMAGES_METRIC]`` is the mAP@0.5 in percent. With ``out_dir``, rank 0 writes
``detections.csv`` (the official results format: ``megdet eval --metric open-images --results`` scores
it against the files ``megdet pack --export-csv`` writes, to the same mAP), the per-class
``open_images_metrics.json`` and ``metrics.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from hpc.errors import UserError
from hpc.files import write_atomic, write_json_atomic
from megdet.data.open_images_shards import GROUP_OF, shard_hierarchy
from megdet.engine.metrics import EVAL_METRICS_FILE, OPEN_IMAGES_METRIC
from megdet.engine.open_images_metric import METRICS_FILE as CLASS_METRICS_FILE
from megdet.engine.open_images_metric import ImageDetections, ImageTruth, evaluate_arrays

DETECTIONS_FILE = "detections.csv"
DETECTIONS_HEADER = "ImageID,LabelName,Score,XMin,XMax,YMin,YMax"


def image_truth(annotations: Dict, height: int, width: int) -> ImageTruth:
    """The metric's ground truth of one image from its shard record (``ShardDataset.annotations``):
    pixel boxes (float32, within 1e-7 of the files' fractions) back to normalised corners."""
    return ImageTruth(_normalised(annotations["boxes"], height, width), annotations["category_ids"],
                      annotations["flags"][:, GROUP_OF] == 1, annotations["positive_labels"],
                      annotations["negative_labels"])


def image_detections(detections: np.ndarray, height: int, width: int) -> ImageDetections:
    """``evaluate.detections_to_array``'s rows [D, 6] (x, y, w, h in pixels, score, category id) -> the
    metric's normalised detections of one image."""
    return ImageDetections(_normalised(detections[:, :4], height, width), detections[:, 4].clip(0.0, 1.0),
                           detections[:, 5].astype(np.int64))


def _normalised(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """COCO xywh pixels [K, 4] -> (xmin, ymin, xmax, ymax) fractions of the image, clipped to [0, 1]."""
    x, y, w, h = np.asarray(boxes, np.float64).reshape(-1, 4).T
    return np.stack([x / width, y / height, (x + w) / width, (y + h) / height], axis=1).clip(0.0, 1.0)


def evaluate_distributed(comm, dataset, merged: Dict[int, np.ndarray],
                         out_dir=None) -> Tuple[Dict[str, float], str]:
    """Score every rank's detections (``merged``: image id -> [D, 6], the same on every rank) on rank 0
    with the Open Images metric against the ground truth in ``dataset`` (every image of it), write the files of
    the module docstring into ``out_dir`` when given; (metrics, printed table) on every rank. Collective."""
    outcome: Tuple[Optional[str], Optional[Dict[str, float]], str] = (None, None, "")
    if comm.rank == 0:
        try:
            outcome = (None, *_score(dataset, merged, out_dir))
        except UserError as error:
            outcome = (str(error), None, "")
    error, metrics, table = comm.broadcast_object(outcome)
    if error is not None:
        raise UserError(error)
    return metrics, table


def _score(dataset, merged: Dict[int, np.ndarray], out_dir) -> Tuple[Dict[str, float], str]:
    hierarchy = shard_hierarchy(dataset)
    names = [Path(str(file_name)).stem for file_name in dataset.file_names]  # <ImageID>.jpg
    truth, detections = {}, {}
    index_of = {int(image_id): index for index, image_id in enumerate(dataset.image_ids)}
    for index, name in enumerate(names):
        height, width = (int(side) for side in dataset.image_sizes[index])
        truth[name] = image_truth(dataset.annotations(index), height, width)
    for image_id, rows in merged.items():
        index = index_of[int(image_id)]
        height, width = (int(side) for side in dataset.image_sizes[index])
        detections[names[index]] = image_detections(rows, height, width)
    result = evaluate_arrays(hierarchy, truth, detections)
    count = sum(len(d.scores) for d in detections.values())
    metrics = {OPEN_IMAGES_METRIC: 100.0 * result.mean_ap}
    if out_dir is not None:
        out = Path(out_dir)
        lines = [DETECTIONS_HEADER] + [
            f"{name},{hierarchy.names[label]},{score!r},{x1!r},{x2!r},{y1!r},{y2!r}"  # repr: the floats exactly
            for name in sorted(detections)
            for (x1, y1, x2, y2), score, label in zip(detections[name].boxes.tolist(),
                                                      detections[name].scores.tolist(),
                                                      detections[name].labels.tolist())]
        write_atomic(out / DETECTIONS_FILE, "\n".join(lines) + "\n")
        write_json_atomic(out / CLASS_METRICS_FILE, result.to_json())
        write_json_atomic(out / EVAL_METRICS_FILE, {**metrics, "num_images": len(truth), "num_detections": count})
    return metrics, result.table() + "\n"
