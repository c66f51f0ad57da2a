"""Target assignment shared by the RPN and the RoI heads: match candidates (anchors or proposals) to
ground-truth boxes by IoU, then sample a fixed number of them at a fixed positive fraction.

Kept apart from the heads (as detectron2's Matcher and subsample_labels) so that each rule can be
tested on tiny tensors. Boxes are ``Tensor[*, 4]`` (x1, y1, x2, y2) in pixels.

Neither reads the device: which ground-truth boxes are crowds and which candidates are sampled stay
masks on the device, and every shape depends only on shapes (no host synchronisation per image).
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from megdet.model.ops import box_ioa, box_iou

BACKGROUND = 0
IGNORE = -1
FOREGROUND = 1
# Below any IoU or IoA (both >= 0), so that a masked-out pair is never a best match.
NO_OVERLAP = -1.0


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
        int8. Crowd boxes are masked out of the IoU matrix rather than selected out of it, so the
        matrix is (G, P) whatever the crowds, and so is the IoA matrix of the crowd rule.
        """
        num_candidates = candidates.shape[0]
        device = candidates.device
        labels = torch.full((num_candidates,), BACKGROUND, dtype=torch.int8, device=device)
        matched = torch.zeros(num_candidates, dtype=torch.int64, device=device)
        if gt_boxes.shape[0] == 0:
            return matched, labels
        crowd = gt_is_crowd[:, None]                                                     # (G, 1)
        iou = box_iou(gt_boxes, candidates).masked_fill_(crowd, NO_OVERLAP)              # (G, P)
        # the first best box on ties, as a max over the non-crowd rows alone; all rows crowd: IoU -1
        best_iou, matched = iou.max(dim=0)
        labels = labels.masked_fill(best_iou >= self.low_threshold, IGNORE)
        labels = labels.masked_fill(best_iou >= self.high_threshold, FOREGROUND)
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=1, keepdim=True).values                            # (G, 1)
            is_best = (iou == best_per_gt) & (best_per_gt > 0)
            labels = labels.masked_fill(is_best.any(dim=0), FOREGROUND)
        inside_crowd = box_ioa(candidates, gt_boxes).masked_fill_(~crowd.T, NO_OVERLAP).max(dim=1).values  # (P,)
        labels = labels.masked_fill((labels == BACKGROUND) & (inside_crowd >= self.crowd_ioa_threshold), IGNORE)
        return matched, labels


class Sample(NamedTuple):
    """A sample of candidates in S fixed slots (``sample_labels``), each ``Tensor[S]``.

    indices: int64 indices into the candidates. valid: bool, the slots that hold a sampled candidate
    (the others pad the sample when fewer candidates are eligible). positive: bool, the valid slots of
    positive candidates; they come first, the negatives after them, the padding last.
    """

    indices: torch.Tensor
    valid: torch.Tensor
    positive: torch.Tensor


def sample_labels(labels: torch.Tensor, *, batch_size: int, positive_fraction: float) -> Sample:
    """Random sample of at most ``batch_size`` candidates, at most ``positive_fraction`` of them positive.

    ``labels`` ``Tensor[P]``: > 0 positive (foreground or its class), 0 background, < 0 ignored.
    A uniform sample of min(#positive, batch_size * positive_fraction) positives, and of the negatives
    as many as fill ``batch_size`` (as detectron2 and torchvision), each drawn without replacement:
    every candidate gets a uniform random key, and the positives and the negatives with the largest
    keys are taken, by ``topk`` (float64 keys: a tie, which would favour the lower index, has
    probability about P^2 / 2^54). Returns S = min(batch_size, P) slots (``Sample``), positives first;
    the counts stay on the device.
    """
    num_candidates = labels.shape[0]
    device = labels.device
    slots = min(batch_size, num_candidates)
    positive_slots = min(int(batch_size * positive_fraction), num_candidates)
    keys = torch.rand(num_candidates, dtype=torch.float64, device=device)
    # the largest keys of each kind first; the other candidates' keys -1 come after them
    positive_keys, positive = keys.masked_fill(labels <= 0, -1.0).topk(positive_slots)
    negative_keys, negative = keys.masked_fill(labels != 0, -1.0).topk(slots)
    num_positive = (positive_keys >= 0).sum()
    num_negative = torch.minimum((negative_keys >= 0).sum(), batch_size - num_positive)
    # slot j holds positive j while j < num_positive, then negative j - num_positive
    slot = torch.arange(slots, device=device)
    is_positive = slot < num_positive
    source = torch.where(is_positive, slot, slot - num_positive + positive_slots)
    indices = torch.cat((positive, negative))[source]
    return Sample(indices, slot < num_positive + num_negative, is_positive)
