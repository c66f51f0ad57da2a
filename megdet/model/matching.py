"""Target assignment shared by the RPN and the RoI heads: match candidates (anchors or proposals) to
ground-truth boxes by IoU, then sample a fixed number of them at a fixed positive fraction.

Kept apart from the heads (as detectron2's Matcher and subsample_labels) so that each rule can be
tested on tiny tensors. Boxes are ``Tensor[*, 4]`` (x1, y1, x2, y2) in pixels.
"""
from __future__ import annotations

from typing import Tuple

import torch

from megdet.model.ops import box_ioa, box_iou

BACKGROUND = 0
IGNORE = -1
FOREGROUND = 1


class Matcher:
    """Assigns each candidate a ground-truth box and a label: FOREGROUND (1), BACKGROUND (0) or IGNORE (-1).

    Args:
        low_threshold: max IoU below this -> background.
        high_threshold: max IoU at or above this -> foreground; in between -> ignored.
        allow_low_quality_matches: also make foreground, for each ground-truth box, the candidates with
            its highest IoU (ties included), so that every box gets an anchor (Faster R-CNN's RPN rule).
            Unlike detectron2, a box overlapping no candidate at all (best IoU 0) matches nothing.
        crowd_ioa_threshold: a background candidate lying at least this fraction inside a crowd region
            is ignored (Detectron's CROWD_FILTER_THRESH); crowd boxes are never matched as foreground.
    """

    def __init__(self, *, low_threshold: float, high_threshold: float, allow_low_quality_matches: bool,
                 crowd_ioa_threshold: float = 0.7):
        if not 0.0 <= low_threshold <= high_threshold <= 1.0:
            raise ValueError(f"Invalid matcher thresholds: low {low_threshold}, high {high_threshold} "
                             "(need 0 <= low <= high <= 1)")
        self.low_threshold = low_threshold
        self.high_threshold = high_threshold
        self.allow_low_quality_matches = allow_low_quality_matches
        self.crowd_ioa_threshold = crowd_ioa_threshold

    def __call__(self, gt_boxes: torch.Tensor, gt_is_crowd: torch.Tensor,
                 candidates: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Match ``candidates`` ``Tensor[P, 4]`` to ``gt_boxes`` ``Tensor[G, 4]`` (``gt_is_crowd`` ``Tensor[G]``).

        Returns ``matched`` ``Tensor[P]`` int64, the index into ``gt_boxes`` of each candidate's best
        non-crowd box (0 when there is none; meaningful for foreground only), and ``labels`` ``Tensor[P]``
        int8.
        """
        num_candidates = candidates.shape[0]
        device = candidates.device
        labels = torch.full((num_candidates,), BACKGROUND, dtype=torch.int8, device=device)
        matched = torch.zeros(num_candidates, dtype=torch.int64, device=device)
        real = torch.nonzero(~gt_is_crowd).squeeze(1)
        if real.numel() > 0:
            iou = box_iou(gt_boxes[real], candidates)                                   # (G', P)
            best_iou, best_gt = iou.max(dim=0)
            matched = real[best_gt]
            labels[best_iou >= self.low_threshold] = IGNORE
            labels[best_iou >= self.high_threshold] = FOREGROUND
            if self.allow_low_quality_matches:
                best_per_gt = iou.max(dim=1, keepdim=True).values                        # (G', 1)
                is_best = (iou == best_per_gt) & (best_per_gt > 0)
                labels[is_best.any(dim=0)] = FOREGROUND
        if gt_is_crowd.any():
            inside_crowd = box_ioa(candidates, gt_boxes[gt_is_crowd]).max(dim=1).values
            labels[(labels == BACKGROUND) & (inside_crowd >= self.crowd_ioa_threshold)] = IGNORE
        return matched, labels


def sample_labels(labels: torch.Tensor, *, batch_size: int,
                  positive_fraction: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random sample of at most ``batch_size`` candidates, at most ``positive_fraction`` of them positive.

    ``labels`` ``Tensor[P]``: > 0 positive (foreground or its class), 0 background, < 0 ignored.
    When there are too few positives the rest is filled with negatives (as detectron2 and torchvision).
    Returns ``(positive_indices, negative_indices)``, ``Tensor[*]`` int64 each.
    """
    positive = torch.nonzero(labels > 0).squeeze(1)
    negative = torch.nonzero(labels == 0).squeeze(1)
    num_positive = min(positive.numel(), int(batch_size * positive_fraction))
    num_negative = min(negative.numel(), batch_size - num_positive)
    positive = positive[torch.randperm(positive.numel(), device=labels.device)[:num_positive]]
    negative = negative[torch.randperm(negative.numel(), device=labels.device)[:num_negative]]
    return positive, negative
