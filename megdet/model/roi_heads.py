"""Fast R-CNN box head on FPN: multi-level RoIAlign, two fully connected layers, class scores and
class-specific box deltas; target assignment, losses and inference post-processing; and, for Mask
R-CNN, the mask branch on the positive RoIs (training) or the detections (inference).

Shapes: N images; R RoIs over the batch (Ri of image i); C FPN channels; S x S pooled bins;
K classes (labels 1..K, 0 = background); D detections of an image.
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megdet.model.box_coder import BoxCoder
from megdet.model.mask_head import MaskHead, mask_loss, mask_probabilities, mask_targets
from megdet.model.matching import IGNORE, Matcher, sample_labels
from megdet.model.ops import backend, batched_nms, box_area, clip_boxes, nonempty, roi_align, roi_sample_grid

# A RoI's level is floor(CANONICAL_LEVEL + log2(sqrt(area) / CANONICAL_BOX_SIZE)) (FPN paper, eq. 1):
# an ImageNet-sized 224 x 224 RoI pools from P4.
CANONICAL_BOX_SIZE = 224
CANONICAL_LEVEL = 4
# Keeps log2 finite for empty boxes and puts a box of exactly 112 px on level 3, as detectron2.
LEVEL_MAPPING_EPS = 1e-8


class RoISample(NamedTuple):
    """The RoIs of one image sampled for the losses, in S fixed slots (``sample_labels``), positives first:
    rois (S, 4); classes (S,) int64, 0 background, IGNORE for the slots that hold no sampled RoI; box_targets
    (S, 4), zero but for positives; matched (S,) int64, each RoI's ground-truth index (meaningful for
    positives); positive (S,) bool."""

    rois: torch.Tensor
    classes: torch.Tensor
    box_targets: torch.Tensor
    matched: torch.Tensor
    positive: torch.Tensor


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign each RoI on the FPN level its size maps to.

    Args:
        output_size: S (7 in the papers).
        strides: strides of the levels that RoIs may be pooled from, finest first (4, 8, 16, 32: P2-P5).
        sampling_ratio: samples per bin per axis, 0 = adaptive (detectron2's default).
        aligned: half-pixel correction (detectron2's ROIAlignV2).
    """

    def __init__(self, *, output_size: int, strides: Sequence[int], sampling_ratio: int, aligned: bool):
        super().__init__()
        self.output_size = output_size
        self.strides = tuple(strides)
        self.min_level = int(math.log2(self.strides[0]))
        self.max_level = int(math.log2(self.strides[-1]))
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def level_of(self, boxes: torch.Tensor) -> torch.Tensor:
        """Index into ``strides`` ``Tensor[R]`` int64 for ``boxes`` ``Tensor[R, 4]`` (x1, y1, x2, y2)."""
        size = torch.sqrt(box_area(boxes))
        level = torch.floor(CANONICAL_LEVEL + torch.log2(size / CANONICAL_BOX_SIZE + LEVEL_MAPPING_EPS))
        return level.clamp(min=self.min_level, max=self.max_level).long() - self.min_level

    def forward(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features``: levels (N, C, Hi, Wi) matching ``strides``; ``boxes``: N tensors (Ri, 4) in input
        pixels. Returns (R, C, S, S) in the order of the concatenated boxes.

        With torchvision's compiled RoIAlign (a GPU), ``_pool_every_level``, which reads nothing from
        the device; with the pure-PyTorch one (the CPU), ``_pool_by_level``, one host read per call."""
        rois = torch.cat([torch.cat((torch.full_like(b[:, :1], i), b), dim=1) for i, b in enumerate(boxes)])
        levels = self.level_of(rois[:, 1:])
        if backend(rois.device.type) == "torchvision":
            return self._pool_every_level(features, rois, levels)
        return self._pool_by_level(features, rois, levels)

    def _pool_every_level(self, features: Sequence[torch.Tensor], rois: torch.Tensor,
                          levels: torch.Tensor) -> torch.Tensor:
        """Each level pools all R RoIs, those of the other levels collapsed to empty boxes, and each RoI
        keeps its own level's result: no level sizes to read. An empty box costs next to nothing with
        adaptive sampling and ``aligned`` (no samples: one idle thread per bin and channel); unaligned
        RoIs grow to one cell and a fixed ``sampling_ratio`` samples it anyway, and then it costs what
        a small RoI does. The gradient reaches each RoI's own level only."""
        pooled = None
        for level, (level_features, stride) in enumerate(zip(features, self.strides)):
            here = levels == level
            level_rois = torch.cat((rois[:, :1], rois[:, 1:].masked_fill(~here[:, None], 0.0)), dim=1)
            level_pooled = roi_align(level_features, level_rois, (self.output_size, self.output_size),
                                     1.0 / stride, self.sampling_ratio, self.aligned)
            pooled = level_pooled if pooled is None else torch.where(here[:, None, None, None], level_pooled, pooled)
        return pooled

    def _pool_by_level(self, features: Sequence[torch.Tensor], rois: torch.Tensor,
                       levels: torch.Tensor) -> torch.Tensor:
        """The RoIs sorted by level, each level pooling its own: the level sizes and each level's largest
        sampling grid (which sizes the pure-PyTorch kernel's tensors) read in one host synchronisation."""
        by_level = torch.sort(levels, stable=True).indices
        rois = rois[by_level]
        num_levels = len(self.strides)
        read = torch.cat([torch.bincount(levels, minlength=num_levels),
                          self._largest_grids(rois, levels[by_level])]).tolist()
        sizes = read[:num_levels]
        grids = [tuple(read[num_levels + 2 * i:num_levels + 2 * i + 2]) for i in range(num_levels)]
        pooled = [roi_align(level_features, level_rois, (self.output_size, self.output_size), 1.0 / stride,
                            self.sampling_ratio, self.aligned, grid)
                  for level_features, level_rois, stride, grid
                  in zip(features, torch.split(rois, sizes), self.strides, grids)]
        return torch.cat(pooled)[torch.argsort(by_level)]

    def _largest_grids(self, rois: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """(L * 2,) int64: each level's largest samples per bin along y and x over its ``rois``."""
        scaled = rois.to(torch.float32, copy=True)  # in the cells of each RoI's own level: spatial_scale 1
        scaled[:, 1:] *= torch.tensor([1.0 / s for s in self.strides], device=rois.device)[levels, None]
        grid_h, grid_w = roi_sample_grid(scaled, (self.output_size, self.output_size), 1.0, self.sampling_ratio,
                                         self.aligned)[4:]
        grids = torch.stack((grid_h, grid_w), dim=1)                                        # (R, 2)
        largest = torch.zeros((len(self.strides), 2), dtype=grids.dtype, device=grids.device)
        return largest.scatter_reduce_(0, levels[:, None].expand(-1, 2), grids, "amax").flatten()


class BoxHead(nn.Module):
    """(R, C, S, S) -> (R, hidden): flatten, then two fully connected layers with ReLU ("2fc")."""

    def __init__(self, *, in_channels: int, pooled_size: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * pooled_size * pooled_size, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(pooled.flatten(1)))))


class BoxPredictor(nn.Module):
    """(R, hidden) -> class logits (R, K + 1) (column 0 = background) and deltas (R, K*4), one box per class."""

    def __init__(self, *, hidden: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(hidden, num_classes + 1)
        self.bbox_pred = nn.Linear(hidden, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, hidden: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(hidden), self.bbox_pred(hidden)


class RoIHeads(nn.Module):
    """Box losses in training, detections in inference.

    Args:
        pooler, box_head, predictor: the network.
        matcher: proposals -> ground truth (IoU 0.5, no low-quality matches).
        box_coder: ``BoxCoder((10, 10, 5, 5))``.
        batch_size_per_image, positive_fraction: RoIs sampled per image (512 at 0.25).
        smooth_l1_beta: box loss; 0 is L1 (detectron2's default).
        score_threshold, nms_threshold, detections_per_image: inference (0.05, 0.5 per class, 100).
        mask_pooler, mask_head: Mask R-CNN's branch (14x14 RoIAlign, ``MaskHead``), or None for boxes only.
    """

    def __init__(self, *, pooler: MultiScaleRoIAlign, box_head: BoxHead, predictor: BoxPredictor,
                 matcher: Matcher, box_coder: BoxCoder, num_classes: int, batch_size_per_image: int,
                 positive_fraction: float, smooth_l1_beta: float, score_threshold: float,
                 nms_threshold: float, detections_per_image: int, mask_pooler: Optional[MultiScaleRoIAlign] = None,
                 mask_head: Optional[MaskHead] = None):
        super().__init__()
        self.pooler = pooler
        self.box_head = box_head
        self.predictor = predictor
        self.matcher = matcher
        self.box_coder = box_coder
        self.num_classes = num_classes
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.smooth_l1_beta = smooth_l1_beta
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.detections_per_image = detections_per_image
        self.mask_pooler = mask_pooler
        self.mask_head = mask_head

    @property
    def mask_on(self) -> bool:
        return self.mask_head is not None

    def forward(self, features: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor],
                image_sizes: Sequence[Tuple[int, int]],
                targets: Optional[Sequence[Dict[str, torch.Tensor]]] = None):
        """Training: ``{"loss_cls", "loss_box"}`` (+ "loss_mask"). Inference: N dicts of "boxes" (D, 4) in
        input pixels (clipped), "scores" (D,), "labels" (D,) int64 in 1..K (+ "mask_probs" (D, M, M))."""
        if self.training:
            samples = self.sample_rois(proposals, targets)
            rois = [sample.rois for sample in samples]
        else:
            rois = list(proposals)
        logits, deltas = self.predictor(self.box_head(self.pooler(features, rois)))
        if self.training:
            losses = self.losses(logits, deltas, samples)
            if self.mask_on:
                losses["loss_mask"] = self.mask_losses(features, samples, targets)
            return losses
        detections = self.detections(logits, deltas, rois, image_sizes)
        if self.mask_on:
            self.predict_masks(features, detections)
        return detections

    @torch.no_grad()
    def sample_rois(self, proposals: Sequence[torch.Tensor],
                    targets: Sequence[Dict[str, torch.Tensor]]) -> List[RoISample]:
        """Add each image's ground truth to its proposals, match, sample: one ``RoISample`` per image.

        Crowd boxes, and the zero boxes that stand for proposals the RPN had none for, are candidates
        that are never sampled (selecting them out would read the device)."""
        samples = []
        for image_proposals, target in zip(proposals, targets):
            gt_boxes, is_crowd = target["boxes"], target["iscrowd"]
            candidates = torch.cat((image_proposals, gt_boxes))
            matched, match_labels = self.matcher(gt_boxes, is_crowd, candidates)
            never = ~nonempty(candidates) | torch.cat((torch.zeros_like(image_proposals[:, 0], dtype=torch.bool),
                                                       is_crowd))
            classes = target["labels"][matched] if gt_boxes.shape[0] else torch.zeros_like(matched)
            classes = classes.masked_fill(match_labels <= 0, 0).masked_fill((match_labels == IGNORE) | never, IGNORE)
            sample = sample_labels(classes, batch_size=self.batch_size_per_image,
                                   positive_fraction=self.positive_fraction)
            rois = candidates[sample.indices]
            slot_matched = matched[sample.indices]
            if gt_boxes.shape[0]:
                box_targets = self.box_coder.encode(rois, gt_boxes[slot_matched])
                box_targets = box_targets.masked_fill(~sample.positive[:, None], 0.0)
            else:  # no box to match: no positive
                box_targets = torch.zeros_like(rois)
            samples.append(RoISample(rois, classes[sample.indices].masked_fill(~sample.valid, IGNORE), box_targets,
                                     slot_matched, sample.positive))
        return samples

    def losses(self, logits: torch.Tensor, deltas: torch.Tensor,
               samples: Sequence[RoISample]) -> Dict[str, torch.Tensor]:
        """Cross-entropy over all sampled RoIs (mean); box loss of each foreground RoI's own class, summed
        and divided by the number of sampled RoIs (detectron2). Both are 0, not NaN, without RoIs.
        Padding slots (class IGNORE) are left out of both, and the count stays on the device."""
        classes = torch.cat([sample.classes for sample in samples])
        regression_targets = torch.cat([sample.box_targets for sample in samples])
        num_sampled = (classes != IGNORE).sum().clamp(min=1)
        loss_cls = F.cross_entropy(logits, classes, reduction="sum", ignore_index=IGNORE) / num_sampled
        foreground = classes > 0
        # (R, K*4) -> (R, K, 4); each RoI's deltas of its class (labels 1..K -> column 0..K-1), zero for the others
        rows = torch.arange(classes.shape[0], device=classes.device)
        own_deltas = deltas.view(deltas.shape[0], -1, 4)[rows, (classes - 1).clamp(min=0)]
        loss_box = F.smooth_l1_loss(own_deltas.masked_fill(~foreground[:, None], 0.0), regression_targets,
                                    beta=self.smooth_l1_beta, reduction="sum") / num_sampled
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    def mask_losses(self, features: Sequence[torch.Tensor], samples: Sequence[RoISample],
                    targets: Sequence[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """Mask R-CNN's loss on the positive RoIs only: the mask head on their 14x14 pooled features, against
        each one's ground-truth mask cropped to the RoI and resampled to 28x28 (``mask_targets``);
        per-pixel BCE on the ground-truth class's map, averaged over positive RoIs.

        Positives come first in each image's sample; their counts are read from the device, once for
        the batch (the mask branch's one host synchronisation), so that the mask head runs on the
        positives alone rather than on every slot that could hold one."""
        counts = torch.stack([sample.positive.sum() for sample in samples]).tolist()
        positive_rois = [sample.rois[:count] for sample, count in zip(samples, counts)]
        matched = [sample.matched[:count] for sample, count in zip(samples, counts)]
        logits = self.mask_head(self.mask_pooler(features, positive_rois))
        mask_target = torch.cat([mask_targets(target["masks"], match, roi)
                                 for target, match, roi in zip(targets, matched, positive_rois)])
        labels = torch.cat([target["labels"][match] for target, match in zip(targets, matched)])
        return mask_loss(logits, labels, mask_target)

    @torch.no_grad()
    def predict_masks(self, features: Sequence[torch.Tensor], detections: List[Dict[str, torch.Tensor]]) -> None:
        """Each detection's 28x28 mask probabilities of its class, into detections[i]["mask_probs"]."""
        boxes = [d["boxes"] for d in detections]
        probs = mask_probabilities(self.mask_head(self.mask_pooler(features, boxes)), torch.cat([d["labels"] for d in detections]))
        for detection, image_probs in zip(detections, torch.split(probs, [b.shape[0] for b in boxes])):
            detection["mask_probs"] = image_probs

    @torch.no_grad()
    def detections(self, logits: torch.Tensor, deltas: torch.Tensor, rois: Sequence[torch.Tensor],
                   image_sizes: Sequence[Tuple[int, int]]) -> List[Dict[str, torch.Tensor]]:
        """Per image: decode every class's box, clip, keep scores > threshold and non-empty boxes, NMS per
        class, keep the top ``detections_per_image``."""
        probabilities = F.softmax(logits.float(), dim=1)
        boxes = self.box_coder.decode(deltas, torch.cat(rois))                  # (R, K*4)
        detections = []
        start = 0
        for image_rois, image_size in zip(rois, image_sizes):
            stop = start + image_rois.shape[0]
            # (Ri, K*4) -> (Ri*K, 4); scores (Ri, K) -> (Ri*K,), row-major so class = index % K
            image_boxes = clip_boxes(boxes[start:stop].reshape(-1, 4), image_size)
            image_scores = probabilities[start:stop, 1:].reshape(-1)
            image_classes = torch.arange(1, self.num_classes + 1, device=logits.device).repeat(stop - start)
            keep = torch.nonzero((image_scores > self.score_threshold) & nonempty(image_boxes)).squeeze(1)
            kept = keep[batched_nms(image_boxes[keep], image_scores[keep], image_classes[keep],
                                    self.nms_threshold)][:self.detections_per_image]
            detections.append({"boxes": image_boxes[kept], "scores": image_scores[kept],
                               "labels": image_classes[kept]})
            start = stop
        return detections
