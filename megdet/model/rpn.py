"""Region Proposal Network (Ren et al. 2015) over FPN levels.

Shapes: N images; L levels (P2-P6); A anchors per position; Hi, Wi the size of level i;
M = sum over levels of Hi*Wi*A, all anchors of one image; G ground-truth boxes of an image.

``RPNHead`` is the network only (a shared 3x3 conv, then objectness and box-delta 1x1 convs); ``RPN``
does the rest: anchors, target assignment, sampling, losses, and decoding + NMS into proposals.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megdet.model.anchors import AnchorGenerator
from megdet.model.box_coder import BoxCoder
from megdet.model.matching import FOREGROUND, Matcher, sample_labels
from megdet.model.ops import batched_nms, clip_boxes, nonempty


class RPNHead(nn.Module):
    """Per level: ``objectness`` (N, A, Hi, Wi) logits and ``deltas`` (N, A*4, Hi, Wi), weights shared
    across levels."""

    def __init__(self, *, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.objectness = nn.Conv2d(in_channels, num_anchors, 1)
        self.deltas = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for conv in (self.conv, self.objectness, self.deltas):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        objectness, deltas = [], []
        for level in features:
            hidden = F.relu(self.conv(level))
            objectness.append(self.objectness(hidden))
            deltas.append(self.deltas(hidden))
        return objectness, deltas


def flatten_level_outputs(objectness: List[torch.Tensor],
                          deltas: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Per level, objectness (N, A, Hi, Wi) -> (N, Hi*Wi*A) and deltas (N, A*4, Hi, Wi) -> (N, Hi*Wi*A, 4),
    in the anchors' (Hi, Wi, A) order."""
    flat_objectness = [o.permute(0, 2, 3, 1).flatten(1) for o in objectness]
    flat_deltas = []
    for d in deltas:
        n, _, height, width = d.shape
        # (N, A*4, Hi, Wi) -> (N, A, 4, Hi, Wi) -> (N, Hi, Wi, A, 4) -> (N, Hi*Wi*A, 4)
        flat_deltas.append(d.view(n, -1, 4, height, width).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return flat_objectness, flat_deltas


class RPN(nn.Module):
    """Proposals and RPN losses.

    Args:
        head: ``RPNHead``. anchor_generator: ``AnchorGenerator`` (one size per level).
        matcher: anchors -> ground truth (0.7 / 0.3 with low-quality matches in the paper).
        box_coder: ``BoxCoder((1, 1, 1, 1))``.
        batch_size_per_image, positive_fraction: anchors sampled for the losses (256 at 0.5).
        pre_nms_topk: (train, test) top-scoring anchors kept per level and image before NMS.
        post_nms_topk: (train, test) proposals kept per image after NMS.
        nms_threshold: IoU of the NMS across proposals (per level, as detectron2).
        smooth_l1_beta: box loss; 0 is L1 (detectron2's default).
    """

    def __init__(self, *, head: RPNHead, anchor_generator: AnchorGenerator, matcher: Matcher,
                 box_coder: BoxCoder, batch_size_per_image: int, positive_fraction: float,
                 pre_nms_topk: Tuple[int, int], post_nms_topk: Tuple[int, int], nms_threshold: float,
                 smooth_l1_beta: float):
        super().__init__()
        self.head = head
        self.anchor_generator = anchor_generator
        self.matcher = matcher
        self.box_coder = box_coder
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_topk = {True: pre_nms_topk[0], False: pre_nms_topk[1]}
        self.post_nms_topk = {True: post_nms_topk[0], False: post_nms_topk[1]}
        self.nms_threshold = nms_threshold
        self.smooth_l1_beta = smooth_l1_beta

    def forward(self, features: Sequence[torch.Tensor], image_sizes: Sequence[Tuple[int, int]],
                targets: Optional[Sequence[Dict[str, torch.Tensor]]] = None
                ) -> Tuple[List[torch.Tensor], Dict[str, torch.Tensor]]:
        """``features``: L tensors (N, C, Hi, Wi); ``image_sizes``: N (height, width) before padding;
        ``targets``: N dicts with "boxes" (G, 4) and "iscrowd" (G,), needed in training.

        Returns proposals, N tensors (P, 4) (x1, y1, x2, y2, detached, by decreasing objectness), and the
        losses ``{"loss_rpn_cls", "loss_rpn_box"}`` in training (else an empty dict).
        """
        anchors = self.anchor_generator([f.shape[-2:] for f in features])
        objectness, deltas = flatten_level_outputs(*self.head(features))
        proposals = self.propose(anchors, objectness, deltas, image_sizes)
        losses = {}
        if self.training:
            losses = self.losses(torch.cat(anchors), torch.cat(objectness, dim=1), torch.cat(deltas, dim=1),
                                 targets)
        return proposals, losses

    @torch.no_grad()
    def propose(self, anchors: List[torch.Tensor], objectness: List[torch.Tensor], deltas: List[torch.Tensor],
                image_sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
        """Top-k anchors per level, decoded, clipped, NMS per level, top-k per image."""
        num_images = objectness[0].shape[0]
        pre_nms_topk = self.pre_nms_topk[self.training]
        boxes, scores, levels = [], [], []
        batch = torch.arange(num_images, device=objectness[0].device)[:, None]
        for level, (level_anchors, level_objectness, level_deltas) in enumerate(zip(anchors, objectness, deltas)):
            k = min(pre_nms_topk, level_objectness.shape[1])
            top_scores, top = level_objectness.topk(k, dim=1)                         # (N, k)
            decoded = self.box_coder.decode(level_deltas[batch, top].reshape(-1, 4),
                                            level_anchors[top.reshape(-1)])
            boxes.append(decoded.view(num_images, k, 4))
            scores.append(top_scores)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=top.device))
        boxes, scores, levels = torch.cat(boxes, dim=1), torch.cat(scores, dim=1), torch.cat(levels)
        proposals = []
        for image_boxes, image_scores, image_size in zip(boxes, scores, image_sizes):
            # Non-finite predictions are dropped, not raised: their loss is non-finite too, and the
            # DistributedOptimizer's guard then skips the step on every rank (raising here on one rank
            # would leave the others waiting in the next collective).
            finite = torch.isfinite(image_boxes).all(dim=1) & torch.isfinite(image_scores)
            image_boxes = clip_boxes(image_boxes, image_size)
            usable = finite & nonempty(image_boxes)
            # Unusable boxes are not selected out (that would read the device): they go to NMS as
            # copies of the image's best usable box, in its level, scored -inf, so that it suppresses
            # them (IoU 1) and NMS keeps the usable boxes it kept without them. An image without any
            # usable box gets zero boxes, which the RoI heads ignore and never turn into detections.
            best = torch.where(usable, image_scores, -torch.inf).argmax(dim=0, keepdim=True)          # (1,)
            stand_in = image_boxes[best].masked_fill(~usable[best, None], 0.0)                        # (1, 4)
            nms_boxes = torch.where(usable[:, None], image_boxes, stand_in)
            nms_scores = torch.where(usable, image_scores, -torch.inf)
            nms_levels = torch.where(usable, levels, levels[best])
            kept = batched_nms(nms_boxes, nms_scores, nms_levels, self.nms_threshold)
            kept = kept[:self.post_nms_topk[self.training]]
            proposals.append(torch.where(usable[kept, None], nms_boxes[kept], 0.0))
        return proposals

    def losses(self, anchors: torch.Tensor, objectness: torch.Tensor, deltas: torch.Tensor,
               targets: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Objectness BCE over the sampled anchors and box loss over the positives, both summed and divided
        by ``batch_size_per_image * N`` (detectron2). anchors (M, 4), objectness (N, M), deltas (N, M, 4).

        Each image's sample is S fixed slots (``sample_labels``); slots that hold no sampled anchor, and
        for the box loss those that hold no positive, are masked out of the sums."""
        sampled_logits, sampled_labels, sampled, positive_deltas, positive_targets = [], [], [], [], []
        for image_objectness, image_deltas, target in zip(objectness, deltas, targets):
            gt_boxes = target["boxes"]
            matched, labels = self.matcher(gt_boxes, target["iscrowd"], anchors)
            sample = sample_labels(labels, batch_size=self.batch_size_per_image,
                                   positive_fraction=self.positive_fraction)
            sampled_logits.append(image_objectness[sample.indices].masked_fill(~sample.valid, 0.0))
            sampled_labels.append((labels[sample.indices] == FOREGROUND).to(image_objectness.dtype))
            sampled.append(sample.valid)
            positive = sample.positive[:, None]                                                # (S, 1)
            positive_deltas.append(image_deltas[sample.indices].masked_fill(~positive, 0.0))
            if gt_boxes.shape[0]:
                matched_boxes = gt_boxes[matched[sample.indices]]
                box_targets = self.box_coder.encode(anchors[sample.indices], matched_boxes).masked_fill(~positive, 0.0)
            else:  # no box to match: no positive
                box_targets = torch.zeros_like(anchors[sample.indices])
            positive_targets.append(box_targets)
        normaliser = self.batch_size_per_image * objectness.shape[0]
        loss_cls = F.binary_cross_entropy_with_logits(torch.cat(sampled_logits), torch.cat(sampled_labels),
                                                      weight=torch.cat(sampled).to(objectness.dtype),
                                                      reduction="sum") / normaliser
        loss_box = F.smooth_l1_loss(torch.cat(positive_deltas), torch.cat(positive_targets),
                                    beta=self.smooth_l1_beta, reduction="sum") / normaliser
        return {"loss_rpn_cls": loss_cls, "loss_rpn_box": loss_box}
