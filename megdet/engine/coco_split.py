"""COCO scoring split across ranks by category: each rank runs pycocotools' matching and accumulation
for its share of the categories, rank 0 puts the per-category arrays together and prints COCOeval's
own summary. The numbers equal single-process pycocotools bit for bit.

    shares = deal_categories(sorted(coco_gt.getCatIds()), detections_per_category(results), comm.size)
    mine = score_categories(coco_gt, results, shares[comm.rank], "bbox")   # this rank's K_r categories
    evaluator = combine(coco_gt, comm.gather_object(mine), "bbox")         # on rank 0
    evaluator.summarize()

or all of it, collectively: ``evaluator = score_on_ranks(comm, coco_gt, results, "bbox")``.

Shapes, as in pycocotools: T IoU thresholds (10), R recall thresholds (101), K categories in ascending
id order (``params.catIds``), A area ranges (4: all, small, medium, large), M detection limits (3:
1, 10, 100). ``accumulate()`` gives precision and scores [T, R, K, A, M] and recall [T, K, A, M], -1
where a category has no ground truth in a setting.

Why the split is exact: with ``params.useCats = 1`` (pycocotools' default, and ours) ``evaluate()``
matches the detections of one (image, category) against the ground truth of the same pair only, and
``accumulate()`` fills category k's slice from that category's matches alone, so restricting
``params.catIds`` to a subset computes the same slices. A detection's order within its (image,
category), which breaks score ties in pycocotools' stable sorts, is its order in the results list;
a rank's subset keeps that order. The detection ids ``loadRes`` gives by position differ between a
subset and the whole, but only ``gtMatches`` records them and ``accumulate()`` reads ``dtMatches``
(the ground truth's ids). ``summarize()`` then averages the combined arrays exactly as it averages
single-process ones. ``useCats = 0`` (proposal recall, categories pooled) does not split by category
and is not used here.
"""
from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params


@dataclass
class CategoryScores:
    """``accumulate()``'s arrays for ``category_ids`` (K_r of them, ascending): ``precision`` and
    ``scores`` [T, R, K_r, A, M], ``recall`` [T, K_r, A, M]."""

    category_ids: List[int]
    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray


def detections_per_category(results: Sequence[Dict]) -> Counter:
    """{category id: number of detections} of a COCO results list."""
    return Counter(result["category_id"] for result in results)


def deal_categories(category_ids: Sequence[int], detections: Dict[int, int], ranks: int) -> List[List[int]]:
    """``category_ids`` dealt to ``ranks`` ranks, each rank's list ascending; every category goes to
    exactly one rank, and the same inputs give the same deal on every rank.

    Balanced by ``detections`` (per category; missing means 0), the cost that grows with a category:
    the most detected category first, each to the rank with the fewest detections so far (then the
    fewest categories, then the lowest rank). The most and the least loaded rank then differ by at
    most one category's detections. A rank may get no category (more ranks than categories).
    """
    if ranks < 1:
        raise ValueError(f"Invalid ranks: {ranks} (need at least 1)")
    loads = [0] * ranks
    shares: List[List[int]] = [[] for _ in range(ranks)]
    for category in sorted(category_ids, key=lambda c: (-detections.get(c, 0), c)):
        rank = min(range(ranks), key=lambda r: (loads[r], len(shares[r]), r))
        loads[rank] += detections.get(category, 0)
        shares[rank].append(category)
    return [sorted(share) for share in shares]


def score_categories(coco_gt: COCO, results: Sequence[Dict], category_ids: Sequence[int], iou_type: str,
                     image_ids: Optional[Sequence[int]] = None) -> CategoryScores:
    """pycocotools' ``evaluate()`` + ``accumulate()`` of ``results`` (checked COCO results: boxes, or
    RLE masks for ``iou_type`` "segm") over ``category_ids`` only, on ``image_ids`` (default: every
    ground-truth image). The caller's dicts are left alone."""
    category_ids = sorted(int(c) for c in category_ids)
    params = Params(iouType=iou_type)
    if not category_ids:
        T, R, A, M = len(params.iouThrs), len(params.recThrs), len(params.areaRng), len(params.maxDets)
        return CategoryScores([], -np.ones((T, R, 0, A, M)), -np.ones((T, 0, A, M)), -np.ones((T, R, 0, A, M)))
    wanted = set(category_ids)  # 42.0 in {42}: a float id that holds an integer matches, as in pycocotools
    # loadRes adds keys to the dicts it is given. It gives detections that have a "bbox" the box's
    # area, not the mask's, which would move them between the small/medium/large ranges of segm AP
    # (detectron2 drops it too).
    if iou_type == "segm":
        mine = [{key: value for key, value in r.items() if key != "bbox"} for r in results
                if r["category_id"] in wanted]
    else:
        mine = [dict(r) for r in results if r["category_id"] in wanted]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(mine) if mine else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.catIds = category_ids
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    accumulated = evaluator.eval
    return CategoryScores(category_ids, accumulated["precision"], accumulated["recall"], accumulated["scores"])


def combine(coco_gt: COCO, pieces: Sequence[CategoryScores], iou_type: str,
            image_ids: Optional[Sequence[int]] = None) -> COCOeval:
    """A ``COCOeval`` whose ``eval`` holds the full precision, scores [T, R, K, A, M] and recall
    [T, K, A, M] over every ground-truth category, each piece's K_r slices placed at its categories'
    positions in ``params.catIds`` (ascending ids): ready for ``summarize()``. ValueError unless the
    pieces cover every category exactly once."""
    evaluator = COCOeval(coco_gt, None, iou_type)
    params = evaluator.params
    if image_ids is not None:
        params.imgIds = sorted(int(i) for i in image_ids)
    position = {category: k for k, category in enumerate(params.catIds)}
    dealt = [category for piece in pieces for category in piece.category_ids]
    if sorted(dealt) != sorted(position):
        raise ValueError(f"Invalid pieces: they hold categories {sorted(dealt)}, the ground truth "
                         f"{sorted(position)} (each exactly once)")
    T, R, K, A, M = len(params.iouThrs), len(params.recThrs), len(params.catIds), len(params.areaRng), len(params.maxDets)
    precision, recall, scores = -np.ones((T, R, K, A, M)), -np.ones((T, K, A, M)), -np.ones((T, R, K, A, M))
    for piece in pieces:
        ks = [position[category] for category in piece.category_ids]
        precision[:, :, ks] = piece.precision
        recall[:, ks] = piece.recall
        scores[:, :, ks] = piece.scores
    evaluator.eval = {"params": params, "counts": [T, R, K, A, M], "precision": precision, "recall": recall,
                      "scores": scores}
    return evaluator


def score_on_ranks(comm, coco_gt: COCO, results: Sequence[Dict], iou_type: str,
                   image_ids: Optional[Sequence[int]] = None) -> Optional[COCOeval]:
    """Every rank scores its deal of the categories (``deal_categories`` by ``results``' detections),
    rank 0 gathers the pieces: on rank 0 the combined ``COCOeval`` (``combine``), None on the others.
    Collective; every rank passes the same ``results`` (checked) and ground truth."""
    shares = deal_categories(sorted(coco_gt.getCatIds()), detections_per_category(results), comm.size)
    mine = score_categories(coco_gt, results, shares[comm.rank], iou_type, image_ids)
    pieces = comm.gather_object(mine, root=0)
    return combine(coco_gt, pieces, iou_type, image_ids) if comm.rank == 0 else None


def _empty_results(coco_gt: COCO) -> COCO:
    """A detections COCO with no detections (pycocotools' loadRes rejects an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                       "annotations": []}
    coco_dt.createIndex()
    return coco_dt
