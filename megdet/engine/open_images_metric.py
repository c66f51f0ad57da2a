"""The Open Images detection challenge metric: mAP@0.5 with the class hierarchy, verified image-level
labels and group-of boxes. NumPy only.

    megdet eval --metric open-images --boxes validation-annotations-bbox.csv \\
        --labels validation-annotations-human-imagelabels-boxable.csv \\
        --hierarchy bbox_labels_600_hierarchy.json --classes class-descriptions-boxable.csv --results dets.csv

In memory (class indices into ``hierarchy.names``; boxes xmin, ymin, xmax, ymax normalised to [0, 1]):

    truth = {"img0": ImageTruth(boxes, labels, group_of, positive_labels, negative_labels), ...}
    detections = {"img0": ImageDetections(boxes, scores, labels), ...}
    result = evaluate_arrays(hierarchy, truth, detections)   # result.mean_ap, result.average_precision [C]

The protocol is that of the TF Object Detection API's ``OpenImagesDetectionChallengeEvaluator`` (with
its ground truth expanded by ``oid_hierarchical_labels_expansion.py``), written anew; docs/open_images.md
states each rule with an example:
  1. Ground-truth boxes and positive image-level labels are copied up to every ancestor class, negative
     image-level labels down to every descendant. Detections are not expanded.
  2. A class is evaluated on an image only when it is verified there: a (expanded) box or image-level
     label of it, positive or negative. Other detections on the image are ignored.
  3. Per image and class, detections in decreasing score take the ordinary (not group-of) box of their
     class with which their IoU is highest; IoU >= 0.5 makes the first of them a true positive, later
     ones false positives (a box is matched once; a detection does not fall back to another box).
  4. A detection that is not a true positive and whose intersection with a group-of box of its class
     covers >= 0.5 of its own area joins the group-of box it overlaps most; each group-of box joined by
     some detection is one true positive with the highest score among them, the joiners are ignored.
     A group-of box nobody joins is a miss.
  5. AP per class: the area under the precision-recall curve with precision made non-increasing (all
     points, VOC 2010+), recall over the class's expanded boxes (each group-of box counts once). mAP:
     the mean over the classes that have a box in the evaluated images; a class with boxes and no
     detections has AP 0.
Ties in score are ranked later-first in the order (image, ordinary detections, group-of true positives),
which is the reference's order wherever its sort of the scores is stable.

Compared with the reference (the TF Object Detection API of March 2019, its NumPy code run once by hand
outside this repository, TensorFlow stubbed; docs/open_images.md): on the mixed hand-worked case of
tests/test_open_images_metric.py, the same six APs and mAP to the last bit; on a 2,000-image synthetic
set (200,000 detections), the same mAP to the last bit when no two scores tie, and per-class APs within
8.2e-6 with 5-decimal scores, whose ties the reference ranks in the order of NumPy's unstable sort. One
difference by design: a label that sits at several places of the hierarchy with children of its own
(4 such in the official one) is listed by the reference's expansion once per place as an ancestor of
those children, so their boxes get two copies for it, one of which no detection can match; we copy a
box once to each ancestor.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Hashable, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from hpc.errors import UserError
from hpc.files import write_json_atomic
from megdet.data.open_images import (BoxTable, ClassHierarchy, DetectionTable, GroundTruth, ImageLabelTable,
                                     read_detections, read_ground_truth, read_hierarchy)

MATCHING_IOU = 0.5        # IoU with an ordinary box, and intersection over the detection's area with a group-of box
MAX_DETECTIONS_PER_CLASS = 10_000  # per image: the reference keeps the best this many (its NMS output size)
METRICS_FILE = "open_images_metrics.json"


class ImageTruth(NamedTuple):
    """One image's ground truth, not expanded. M boxes, P and Q image-level labels."""

    boxes: np.ndarray            # float [M, 4]: xmin, ymin, xmax, ymax, normalised
    labels: np.ndarray           # int [M]: class index
    group_of: np.ndarray         # bool [M]
    positive_labels: np.ndarray  # int [P]: classes verified present
    negative_labels: np.ndarray  # int [Q]: classes verified absent


class ImageDetections(NamedTuple):
    """One image's detections. D of them."""

    boxes: np.ndarray   # float [D, 4]: xmin, ymin, xmax, ymax, normalised
    scores: np.ndarray  # float [D], in [0, 1]
    labels: np.ndarray  # int [D]: class index


@dataclass(frozen=True)
class OpenImagesResult:
    """AP per class and mAP@0.5; detection counts say where every detection went."""

    class_names: Tuple[str, ...]
    display_names: Tuple[str, ...]
    average_precision: np.ndarray  # float64 [C]: NaN for a class with no box in the evaluated images
    num_boxes: np.ndarray          # int64 [C]: its boxes after expansion (the recall denominator)
    num_images: int
    # scored: ranked as TP or FP; in_group_of: joined a group-of box (ignored); unverified: class not
    # verified on the image (ignored); empty_box: zero width or height (dropped, as the reference does);
    # over_limit: beyond the MAX_DETECTIONS_PER_CLASS best of a class in an image (dropped)
    detections: Dict[str, int]

    @property
    def evaluated(self) -> np.ndarray:
        """bool [C]: the classes that enter the mean (they have a box)."""
        return self.num_boxes > 0

    @property
    def mean_ap(self) -> float:
        """mAP@0.5 over the classes that have a box; NaN if none has."""
        return float(self.average_precision[self.evaluated].mean()) if self.evaluated.any() else float("nan")

    def table(self, rows: int = 5) -> str:
        """mAP, then the ``rows`` best and worst classes by AP, as aligned text."""
        order = [int(c) for c in np.flatnonzero(self.evaluated)]
        order.sort(key=lambda c: (-self.average_precision[c], self.class_names[c]))
        counts = ", ".join(f"{value} {name.replace('_', ' ')}" for name, value in self.detections.items())
        lines = [f"Open Images mAP@0.5 = {self.mean_ap:.4f} over {len(order)} classes with boxes "
                 f"(of {len(self.class_names)}), {self.num_images} images",
                 f"detections: {counts}"]
        ranked = list(enumerate(order, start=1))
        shown = ranked if len(ranked) <= 2 * rows else ranked[:rows] + [None] + ranked[-rows:]
        width = max([len(self.display_names[c]) for c in order] + [5])
        lines.append(f"{'rank':>4}  {'class':<{width}}  {'LabelName':<12} {'AP':>6} {'boxes':>7}")
        for entry in shown:
            if entry is None:
                lines.append(f"{'...':>4}")
                continue
            rank, c = entry
            lines.append(f"{rank:>4}  {self.display_names[c]:<{width}}  {self.class_names[c]:<12} "
                         f"{self.average_precision[c]:6.4f} {int(self.num_boxes[c]):7d}")
        return "\n".join(lines)

    def to_json(self) -> Dict:
        """mAP, counts, and {LabelName: {"name", "AP", "boxes"}} for the classes that have boxes."""
        return {"mAP@0.5": self.mean_ap, "num_images": self.num_images, "detections": dict(self.detections),
                "classes": {self.class_names[c]: {"name": self.display_names[c],
                                                  "AP": float(self.average_precision[c]),
                                                  "boxes": int(self.num_boxes[c])}
                            for c in np.flatnonzero(self.evaluated)}}


def evaluate(hierarchy: ClassHierarchy, truth: GroundTruth, detections: DetectionTable) -> OpenImagesResult:
    """The challenge metric of ``detections`` against ``truth`` (not expanded) over ``hierarchy``'s classes."""
    num_images, num_classes = len(truth.image_ids), len(hierarchy)
    boxes = expand_boxes(truth.boxes, hierarchy)
    ranked, counts = rank_detections(detections, verified_keys(boxes, truth.image_labels, hierarchy), num_classes)
    det_image, det_label = detections.image[ranked], detections.label[ranked]
    det_boxes, det_scores = detections.boxes[ranked], detections.scores[ranked]

    # boxes by (image, class), the file's order kept within a class: argmax takes the first of equal IoUs
    by_image = np.lexsort((boxes.label, boxes.image))
    gt_image, gt_label = boxes.image[by_image], boxes.label[by_image]
    gt_boxes, gt_group_of = boxes.boxes[by_image], boxes.group_of[by_image]
    det_bounds = np.searchsorted(det_image, np.arange(num_images + 1))
    gt_bounds = np.searchsorted(gt_image, np.arange(num_images + 1))
    true_positive = np.zeros(len(ranked), bool)  # an image without boxes has none
    in_group_of = np.zeros(len(ranked), bool)
    groups: List[Tuple[int, np.ndarray, np.ndarray]] = []  # (image, classes [K], scores [K]) of group-of TPs
    for image in np.flatnonzero((np.diff(det_bounds) > 0) & (np.diff(gt_bounds) > 0)):
        dets = slice(det_bounds[image], det_bounds[image + 1])
        gts = slice(gt_bounds[image], gt_bounds[image + 1])
        tp, joined, labels, scores = match_image(det_boxes[dets], det_scores[dets], det_label[dets],
                                                 gt_boxes[gts], gt_label[gts], gt_group_of[gts])
        true_positive[dets], in_group_of[dets] = tp, joined
        groups.append((image, labels, scores))
    scored = ~in_group_of
    counts = {"scored": int(scored.sum()), "in_group_of": int(in_group_of.sum()), **counts}

    # the ranked entries: scored detections, then one true positive per group-of box that was joined
    group_images = np.concatenate([np.full(len(labels), image, np.int64) for image, labels, _ in groups]
                                  + [np.zeros(0, np.int64)])
    entry_label = np.concatenate([det_label[scored]] + [labels for _, labels, _ in groups]).astype(np.int64)
    entry_score = np.concatenate([det_scores[scored]] + [scores for _, _, scores in groups])
    entry_tp = np.r_[true_positive[scored], np.ones(len(group_images), bool)]
    # ties in score: later first in (image, ordinary detections before group-of entries, position)
    entry_image = np.r_[det_image[scored], group_images]
    entry_kind = np.r_[np.zeros(int(scored.sum()), np.int64), np.ones(len(group_images), np.int64)]
    position = np.arange(len(entry_label))
    order = np.lexsort((-position, -entry_kind, -entry_image, -entry_score, entry_label))
    num_boxes = np.bincount(boxes.label, minlength=num_classes).astype(np.int64)
    average_precision = class_average_precisions(entry_label[order], entry_tp[order], num_boxes)
    return OpenImagesResult(hierarchy.names, hierarchy.display_names, average_precision, num_boxes, num_images,
                            counts)


def rank_detections(detections: DetectionTable, verified: np.ndarray, num_classes: int
                    ) -> Tuple[np.ndarray, Dict[str, int]]:
    """(rows int64 [D'], counts): the detections that take part, sorted by image, class, decreasing score
    (later row first on ties): the order in which they take boxes. Left out, and counted: classes not
    verified on the image (rule 2), boxes of zero width or height, and all but the
    ``MAX_DETECTIONS_PER_CLASS`` best of a class in an image, as the reference does."""
    verified_here = np.isin(detections.image * num_classes + detections.label, verified)
    corners = detections.boxes
    nonempty = (corners[:, 2] > corners[:, 0]) & (corners[:, 3] > corners[:, 1])
    rows = np.flatnonzero(verified_here & nonempty)
    rows = rows[np.lexsort((-rows, -detections.scores[rows], detections.label[rows], detections.image[rows]))]
    image, label = detections.image[rows], detections.label[rows]
    starts = np.flatnonzero(np.r_[True, (np.diff(image) != 0) | (np.diff(label) != 0)])
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    within_limit = rank < MAX_DETECTIONS_PER_CLASS
    counts = {"unverified": int((~verified_here).sum()), "empty_box": int((verified_here & ~nonempty).sum()),
              "over_limit": int((~within_limit).sum())}
    return rows[within_limit], counts


def expand_boxes(boxes: BoxTable, hierarchy: ClassHierarchy) -> BoxTable:
    """Each box followed by its copies for every ancestor of its class (rule 1)."""
    rows, labels = hierarchy.up.expand(boxes.label)
    return BoxTable(boxes.image[rows], labels, boxes.boxes[rows], boxes.group_of[rows])


def verified_keys(boxes: BoxTable, image_labels: ImageLabelTable, hierarchy: ClassHierarchy) -> np.ndarray:
    """int64 [K], sorted: image * C + class for each class verified on each image (rule 2), from the
    expanded ``boxes`` and the image-level labels (positives expanded up, negatives down)."""
    num_classes = len(hierarchy)
    up_rows, up_labels = hierarchy.up.expand(image_labels.label[image_labels.positive])
    down_rows, down_labels = hierarchy.down.expand(image_labels.label[~image_labels.positive])
    keys = [boxes.image * num_classes + boxes.label,
            image_labels.image[image_labels.positive][up_rows] * num_classes + up_labels,
            image_labels.image[~image_labels.positive][down_rows] * num_classes + down_labels]
    return np.unique(np.concatenate(keys))


def match_image(det_boxes: np.ndarray, det_scores: np.ndarray, det_labels: np.ndarray, gt_boxes: np.ndarray,
                gt_labels: np.ndarray, gt_group_of: np.ndarray
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rules 3 and 4 on one image, all classes at once. D detections sorted by class then decreasing
    score; G expanded boxes (xmin, ymin, xmax, ymax).

    Returns: true positive bool [D]; joined a group-of box bool [D]; the classes and scores of the
    group-of true positives, int64 [K] and float64 [K], in box order.
    """
    intersection = _intersection(det_boxes, gt_boxes)                   # [D, G]
    det_area = _area(det_boxes)
    same_class = det_labels[:, None] == gt_labels[None, :]             # [D, G]
    union = det_area[:, None] + _area(gt_boxes)[None, :] - intersection
    iou = np.where(same_class & ~gt_group_of[None, :], intersection / union, -1.0)
    best = iou.argmax(axis=1)                                           # [D]: the first of equal IoUs
    hits = np.flatnonzero(iou[np.arange(len(best)), best] >= MATCHING_IOU)
    # a box is taken by the first (highest scored) detection whose best box it is
    _, first = np.unique(best[hits], return_index=True)
    true_positive = np.zeros(len(det_boxes), bool)
    true_positive[hits[first]] = True

    joined = np.zeros(len(det_boxes), bool)
    if not gt_group_of.any():
        return true_positive, joined, np.zeros(0, np.int64), np.zeros(0)
    ioa = np.where(same_class & gt_group_of[None, :], intersection / det_area[:, None], -1.0)
    group = ioa.argmax(axis=1)
    joined = (ioa[np.arange(len(group)), group] >= MATCHING_IOU) & ~true_positive
    boxes_joined, first = np.unique(group[joined], return_index=True)
    scores = det_scores[joined][first]  # the highest: each class's detections come in decreasing score
    # the reference keeps a group-of box's entry only when its best score is above 0
    positive = scores > 0
    return true_positive, joined, gt_labels[boxes_joined[positive]].astype(np.int64), scores[positive]


def class_average_precisions(labels: np.ndarray, true_positive: np.ndarray, num_boxes: np.ndarray) -> np.ndarray:
    """float64 [C]: AP of each class (rule 5) from its ranked entries, NaN where ``num_boxes`` is 0.

    labels: int [E] sorted, each class's entries in rank order; true_positive: bool [E];
    num_boxes: int [C], the recall denominators."""
    average_precision = np.full(len(num_boxes), np.nan)
    bounds = np.searchsorted(labels, np.arange(len(num_boxes) + 1))
    for c in np.flatnonzero(num_boxes > 0):
        tp = true_positive[bounds[c]:bounds[c + 1]]
        if not tp.any():
            average_precision[c] = 0.0
            continue
        precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
        # the precision envelope: at each rank, the best precision at this or any later rank
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        # recall rises by 1 / num_boxes at each true positive
        average_precision[c] = envelope[tp].sum() / num_boxes[c]
    return average_precision


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 [A, B]: areas of the pairwise intersections of boxes a [A, 4] and b [B, 4]."""
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    return width * height


def evaluate_arrays(hierarchy: ClassHierarchy, truth: Mapping[Hashable, ImageTruth],
                    detections: Mapping[Hashable, ImageDetections]) -> OpenImagesResult:
    """The metric of per-image arrays: ``truth`` names the evaluated images (keys of one sortable
    type); every image of ``detections`` must be one of them."""
    image_ids = sorted(truth)
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    strangers = [image_id for image_id in detections if image_id not in index]
    if strangers:
        raise UserError(f"detections for {len(strangers)} images without ground truth (e.g. {strangers[:3]}): "
                        "evaluate the detections of the ground truth's images")
    images = [truth[image_id] for image_id in image_ids]
    for image_id, t in zip(image_ids, images):
        _check_lengths(image_id, "ground truth", boxes=np.reshape(t.boxes, (-1, 4)), labels=t.labels,
                       group_of=t.group_of)
    for image_id, d in detections.items():
        _check_lengths(image_id, "detections", boxes=np.reshape(d.boxes, (-1, 4)), scores=d.scores, labels=d.labels)
    boxes = BoxTable(_repeat_index(image_ids, [len(t.labels) for t in images]),
                     _stacked([t.labels for t in images], np.int64), _boxes([t.boxes for t in images]),
                     _stacked([t.group_of for t in images], bool))
    positive = [np.asarray(t.positive_labels, np.int64).reshape(-1) for t in images]
    negative = [np.asarray(t.negative_labels, np.int64).reshape(-1) for t in images]
    image_labels = ImageLabelTable(
        np.r_[_repeat_index(image_ids, [len(p) for p in positive]),
              _repeat_index(image_ids, [len(n) for n in negative])],
        _stacked(positive + negative, np.int64),
        np.r_[np.ones(sum(map(len, positive)), bool), np.zeros(sum(map(len, negative)), bool)])
    ordered = [(index[image_id], d) for image_id, d in detections.items()]
    table = DetectionTable(np.repeat(np.array([i for i, _ in ordered], np.int64), [len(d.labels) for _, d in ordered]),
                           _stacked([d.labels for _, d in ordered], np.int64), _boxes([d.boxes for _, d in ordered]),
                           _stacked([d.scores for _, d in ordered], np.float64))
    _check_arrays(hierarchy, boxes, image_labels, table)
    return evaluate(hierarchy, GroundTruth(tuple(image_ids), boxes, image_labels), table)


def _check_lengths(image_id, what: str, **arrays) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Invalid {what} of image {image_id!r}: one entry per box in each of {lengths}")


def _repeat_index(image_ids, counts: List[int]) -> np.ndarray:
    return np.repeat(np.arange(len(image_ids), dtype=np.int64), counts)


def _stacked(arrays, dtype) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype).reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype)


def _boxes(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).reshape(-1, 4) for a in arrays]) if arrays else np.zeros((0, 4))


def _check_arrays(hierarchy: ClassHierarchy, boxes: BoxTable, image_labels: ImageLabelTable,
                  detections: DetectionTable) -> None:
    """The in-memory API's contract: class indices exist, boxes and scores are in range."""
    for name, labels in (("ground-truth", boxes.label), ("image-level", image_labels.label),
                         ("detection", detections.label)):
        outside = (labels < 0) | (labels >= len(hierarchy))
        if outside.any():
            raise ValueError(f"Invalid {name} labels: {sorted(set(labels[outside].tolist()))[:5]} "
                             f"(class indices are 0..{len(hierarchy) - 1})")
    for name, corners in (("ground-truth", boxes.boxes), ("detection", detections.boxes)):
        if not (np.isfinite(corners).all() and (corners >= 0).all() and (corners <= 1).all()
                and (corners[:, 2] >= corners[:, 0]).all() and (corners[:, 3] >= corners[:, 1]).all()):
            raise ValueError(f"Invalid {name} boxes: need xmin <= xmax and ymin <= ymax, all in [0, 1]")
    if not (np.isfinite(detections.scores).all() and (detections.scores >= 0).all()
            and (detections.scores <= 1).all()):
        raise ValueError("Invalid detection scores: need each in [0, 1]")


def evaluate_files(boxes_path, labels_path, hierarchy_path, classes_path, results_path) -> OpenImagesResult:
    """The metric of a results CSV against the official ground-truth files (``megdet.data.open_images``)."""
    hierarchy = read_hierarchy(hierarchy_path, classes_path)
    truth = read_ground_truth(boxes_path, labels_path, hierarchy)
    if not truth.image_ids:
        raise UserError(f"boxes file {boxes_path} and image labels file {labels_path} name no image: give the "
                        "ground truth of the evaluated images")
    return evaluate(hierarchy, truth, read_detections(results_path, truth, hierarchy))


def run_files(boxes_path, labels_path, hierarchy_path, classes_path, results_path,
              out_dir: Optional[str] = None) -> int:
    """``megdet eval --metric open-images``: print mAP and the class table; with ``out_dir``, write
    ``METRICS_FILE`` there (only once the evaluation succeeded)."""
    result = evaluate_files(boxes_path, labels_path, hierarchy_path, classes_path, results_path)
    print(result.table())
    if out_dir is not None:
        print(f"metrics: {write_json_atomic(Path(out_dir) / METRICS_FILE, result.to_json())}")
    return 0
