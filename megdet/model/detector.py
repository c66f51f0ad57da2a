"""Faster R-CNN with FPN on ResNet (Ren et al. 2015; Lin et al. 2017), and the one builder that turns a
preset name plus overrides into a model.

    model = build_detector("resnet50_fpn", num_classes=80, norm="cgbn", group_size=4,
                           backbone_weights="torchvision:resnet50")   # or a file path
    losses = model(images, targets)            # train mode: {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    detections = model.eval()(images, original_sizes=sizes)   # [{"boxes", "scores", "labels"}, ...]

Shapes: N images, image i is (3, Hi, Wi) float RGB in 0..255, already resized; the batch is padded to
(N, 3, H, W) with H, W multiples of 32. Boxes are (x1, y1, x2, y2) in pixels; labels are 1..K.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from hpc.errors import UserError
from megdet.model.anchors import AnchorGenerator
from megdet.model.box_coder import BoxCoder
from megdet.model.fpn import FPN
from megdet.model.mask_head import MaskHead, paste_masks
from megdet.model.matching import Matcher
from megdet.model.resnet import STAGE_MODULES, STAGE_NAMES, ResNet, load_torchvision_checkpoint
from megdet.model.roi_heads import BoxHead, BoxPredictor, MultiScaleRoIAlign, RoIHeads
from megdet.model.rpn import RPN, RPNHead
from megdet.model.settings import DEFAULT_NORM, DEFAULTS, LEVEL_STRIDES, MODEL_NAMES, NORMS, PRESETS
from megdet.weights import default_freeze_at, frozen_stage_names
from megdet.weights import resolve as resolve_weights

logger = logging.getLogger(__name__)

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# RoIs are pooled from P2-P5; P6 only carries RPN anchors.
ROI_LEVEL_STRIDES = LEVEL_STRIDES[:4]


class FasterRCNN(nn.Module):
    """``forward(images, targets=None, original_sizes=None)``; see the module docstring.

    Args:
        backbone: ``ResNet``; fpn: ``FPN``; rpn: ``RPN``; roi_heads: ``RoIHeads``.
        num_classes: K, labels are 1..K.
        pixel_mean, pixel_std: per RGB channel, in 0..255; images are normalised as (x - mean) / std.
        size_divisibility: the batch is padded to a multiple of this (the coarsest backbone stride);
            images smaller than it are refused.
    """

    def __init__(self, *, backbone: ResNet, fpn: FPN, rpn: RPN, roi_heads: RoIHeads, num_classes: int,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], size_divisibility: int):
        super().__init__()
        self.backbone = backbone
        self.fpn = fpn
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = num_classes
        self.size_divisibility = size_divisibility
        # NHWC batches: activations channels-last, and the weights too if they are (model.to(memory_format=...)).
        self.channels_last = False
        for name, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def forward(self, images: Sequence[torch.Tensor], targets: Optional[Sequence[Dict[str, torch.Tensor]]] = None,
                original_sizes: Optional[Sequence[Tuple[int, int]]] = None):
        self.check_images(images)
        image_sizes = [(int(image.shape[1]), int(image.shape[2])) for image in images]
        if self.training:
            if targets is None:
                raise ValueError("the detector is in train mode but got no targets; pass targets, or call "
                                 "model.eval() for detections")
            self.check_targets(targets, len(images), image_sizes)
            unusable = self.unusable_values(images, targets)
            # labels in 1..K whatever was given, so that a bad one cannot index out of range
            targets = [{**target, "labels": target["labels"].clamp(1, self.num_classes)} for target in targets]
        batch = self.pad_and_normalise(images)
        features = list(self.fpn(self.backbone(batch)).values())
        proposals, rpn_losses = self.rpn(features, image_sizes, targets)
        outputs = self.roi_heads(features[:len(ROI_LEVEL_STRIDES)], proposals, image_sizes, targets)
        if self.training:
            return {name: loss.masked_fill(unusable, math.nan) for name, loss in {**rpn_losses, **outputs}.items()}
        return self.rescale(outputs, image_sizes, image_sizes if original_sizes is None else original_sizes)

    def pad_and_normalise(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """N images (3, Hi, Wi), uint8 or float RGB in 0..255, on the model's device -> float32 (N, 3, H, W),
        normalised, zero-padded (= the mean colour) at the bottom and right to multiples of
        ``size_divisibility``. uint8 batches cross to the GPU at a quarter of the bytes and are
        converted here."""
        divisor = self.size_divisibility
        height = -(-max(image.shape[1] for image in images) // divisor) * divisor
        width = -(-max(image.shape[2] for image in images) // divisor) * divisor
        batch = torch.zeros((len(images), 3, height, width), dtype=torch.float32, device=images[0].device)
        for slot, image in zip(batch, images):
            if image.is_floating_point():  # non-finite pixels (training: NaN losses) must not reach BN statistics
                image = image.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
            slot[:, :image.shape[1], :image.shape[2]] = (image.float() - self.pixel_mean) / self.pixel_std
        if self.channels_last or self.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def check_images(self, images: Sequence[torch.Tensor]) -> None:
        """TypeError or ValueError (the caller broke the model's contract) for anything but a non-empty list
        of (3, H, W) tensors, uint8 or float, of at least ``size_divisibility`` pixels per side, all on the
        model's device. In inference, also for float
        images with non-finite pixels, read in one host synchronisation for the batch; in training their
        values are not read (``unusable_values``)."""
        if isinstance(images, torch.Tensor) or len(images) == 0:
            raise TypeError("images must be a non-empty list of Tensor[3, H, W] (one per image), got "
                            f"{type(images).__name__}")
        device = self.pixel_mean.device
        for index, image in enumerate(images):
            if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
                shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
                raise ValueError(f"image {index} has shape {shape}; each image must be a Tensor[3, H, W] (RGB)")
            if image.dtype != torch.uint8 and not image.is_floating_point():
                raise TypeError(f"image {index} has dtype {image.dtype}; give uint8 or float RGB in 0..255")
            if image.device != device:
                raise ValueError(f"image {index} is on {image.device} but the model is on {device}; move the "
                                 "images to the model's device")
            if min(image.shape[1:]) < self.size_divisibility:
                raise ValueError(f"image {index} is {image.shape[1]}x{image.shape[2]} pixels, smaller than the "
                                 f"network's stride {self.size_divisibility}; resize it to at least "
                                 f"{self.size_divisibility} pixels per side")
        floats = [index for index, image in enumerate(images) if image.is_floating_point()]
        if floats and not self.training:
            finite = torch.stack([torch.isfinite(images[index]).all() for index in floats]).tolist()
            if not all(finite):
                index = floats[finite.index(False)]
                raise ValueError(f"image {index} contains NaN or infinite pixels; check the decoding and transforms")

    def check_targets(self, targets: Sequence[Dict[str, torch.Tensor]], num_images: int,
                      image_sizes: Sequence[Tuple[int, int]] = ()) -> None:
        """TypeError or ValueError unless there is one target per image with boxes (K, 4) float, labels (K,)
        int64 and iscrowd (K,) bool (and, with masks, masks (K, H, W) at the image's size) on the model's device.
        Shapes, dtypes and devices only: the values are the data pipeline's to check
        (``check_target_values``), and reading them here would stall every step."""
        if len(targets) != num_images:
            raise ValueError(f"got {len(targets)} targets for {num_images} images; give one target dict per image")
        for index, target in enumerate(targets):
            missing = {"boxes", "labels", "iscrowd"} - set(target)
            if missing:
                raise ValueError(f"target {index} lacks {sorted(missing)}; each target needs boxes, labels, iscrowd")
            boxes, labels, crowd = target["boxes"], target["labels"], target["iscrowd"]
            count = boxes.shape[:1]
            if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != count or crowd.shape != count:
                raise ValueError(f"target {index}: boxes {tuple(boxes.shape)}, labels {tuple(labels.shape)}, iscrowd "
                                 f"{tuple(crowd.shape)}; need Tensor[K, 4], Tensor[K], Tensor[K]")
            if crowd.dtype != torch.bool or labels.dtype != torch.int64 or not boxes.is_floating_point():
                raise TypeError(f"target {index}: dtypes boxes {boxes.dtype}, labels {labels.dtype}, iscrowd "
                                f"{crowd.dtype}; need float boxes, int64 labels, bool iscrowd")
            if self.roi_heads.mask_on:
                masks = target.get("masks")
                expected = (boxes.shape[0], *image_sizes[index])
                if masks is None or tuple(masks.shape) != expected:
                    shape = "none" if masks is None else tuple(masks.shape)
                    raise ValueError(f"target {index}: masks {shape}; a Mask R-CNN target needs masks "
                                     f"Tensor[K, H, W] = {expected}, one per box at the image's size")
            devices = {boxes.device, labels.device, crowd.device}
            if devices != {self.pixel_mean.device}:
                raise ValueError(f"target {index} is on {', '.join(sorted(map(str, devices)))} but the model is on "
                                 f"{self.pixel_mean.device}; move the targets to the model's device")

    def unusable_values(self, images: Sequence[torch.Tensor],
                        targets: Sequence[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """A bool scalar on the device, True when a float image has a non-finite pixel or a target breaks
        ``check_target_values``; the training losses are then NaN (so the ``DistributedOptimizer``'s
        guard skips the step, as detectron2's trainer stops on a non-finite loss) rather than the
        garbage that such values make. Not read: no host synchronisation."""
        flags = [~torch.isfinite(image).all() for image in images if image.is_floating_point()]
        flags += [problems.any() for target in targets for problems in _target_problems(target, self.num_classes)]
        return torch.stack(flags).any()  # three flags per target at least

    @staticmethod
    def rescale(detections: List[Dict[str, torch.Tensor]], image_sizes: Sequence[Tuple[int, int]],
                original_sizes: Sequence[Tuple[int, int]]) -> List[Dict[str, torch.Tensor]]:
        """Boxes from input-image pixels to original-image pixels (x by W0/W, y by H0/H); with masks, each
        detection's 28x28 mask pasted into the original image at its box: "masks" bool (D, H0, W0)."""
        if len(original_sizes) != len(image_sizes):
            raise ValueError(f"got {len(original_sizes)} original_sizes for {len(image_sizes)} images; give one "
                             "(height, width) per image")
        for detection, (height, width), (original_h, original_w) in zip(detections, image_sizes, original_sizes):
            scale = detection["boxes"].new_tensor([original_w / width, original_h / height] * 2)
            detection["boxes"] = detection["boxes"] * scale
            if "mask_probs" in detection:
                detection["masks"] = paste_masks(detection.pop("mask_probs"), detection["boxes"],
                                                 (original_h, original_w))
        return detections


def _target_problems(target: Dict[str, torch.Tensor], num_classes: int) -> Tuple[torch.Tensor, ...]:
    """(non-finite boxes, boxes with x2 <= x1 or y2 <= y1, labels outside 1..``num_classes``), bool (K,) each."""
    boxes, labels = target["boxes"], target["labels"]
    return (~torch.isfinite(boxes).all(dim=1), (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]),
            (labels < 1) | (labels > num_classes))


def check_target_values(targets: Sequence[Dict[str, torch.Tensor]], num_classes: int) -> None:
    """UserError naming the first target with a non-finite box, a box with x2 <= x1 or y2 <= y1, or a label
    outside 1..``num_classes``. Reads the values: run it where they are on the host (megdet's loader
    does, on each batch it makes); the detector itself only turns such values into NaN losses."""
    for index, target in enumerate(targets):
        not_finite, empty, out_of_range = _target_problems(target, num_classes)
        if not_finite.any():
            raise UserError(f"target {index}: box {int(not_finite.nonzero()[0])} is not finite; fix the annotations")
        if empty.any():
            first = int(empty.nonzero()[0])
            raise UserError(f"target {index}: box {first} {target['boxes'][first].tolist()} has x2 <= x1 or y2 <= y1 "
                            f"({int(empty.sum())} such boxes); drop empty boxes in the data transforms")
        if out_of_range.any():
            raise UserError(f"target {index}: label {int(target['labels'][out_of_range][0])} is outside "
                            f"1..{num_classes}; map category ids to contiguous labels 1..num_classes")


def build_detector(name: str, *, num_classes: int, norm: str = DEFAULT_NORM,
                   group_size: Optional[int] = None, backbone_weights: Optional[str] = None,
                   freeze_at: Optional[int] = None, sublinear_stages: Sequence[str] = (),
                   **settings) -> FasterRCNN:
    """The detector ``name`` (one of ``MODEL_NAMES``) for labels 1..``num_classes``. The user's rules
    for these values are ``megdet.specs``'; here only what would otherwise fail deep inside is refused,
    with ValueError or TypeError.

    Args:
        norm: backbone norm layers, "cgbn" (cross-GPU BN over groups of ``group_size`` consecutive ranks,
            None = all; a collective: call on every rank), "frozen" (fixed statistics and affine) or "bn"
            (per-process, the default). A ``mask_head_norm`` of "cgbn" shares the same groups.
        backbone_weights: a torchvision-layout ResNet ImageNet checkpoint, a file path or a name of
            ``megdet.weights`` ("torchvision:resnet50", from torch hub's cache); None trains from
            scratch, and then the last norm of each residual branch starts at zero where it trains.
        freeze_at: stages with no gradient and frozen norms: 0 none, 1 the stem, 2 stem + res2, ... 5;
            None: 2 with weights (detectron2), 0 without.
        sublinear_stages: backbone stages (of res2..res5) recomputed in backward instead of stored
            (``hpc.recompute.recompute``): one more forward of each, none of their activations kept. A
            frozen stage stores nothing to recompute and is refused.
        settings: any key of ``DEFAULTS`` (e.g. ``fpn_channels=256``, ``rpn_post_nms_topk=(500, 500)``).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODEL_NAMES)}")
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown model settings {sorted(unknown)}; known: {', '.join(DEFAULTS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}; need a positive integer (labels are 1..num_classes)")
    settings = dict(PRESETS[name], **settings)
    if freeze_at is None:
        freeze_at = default_freeze_at(pretrained=backbone_weights is not None)
    backbone = _backbone(settings["depth"], norm, group_size, backbone_weights, freeze_at, sublinear_stages)
    channels = settings["fpn_channels"]
    fpn = FPN(in_channels=[backbone.out_channels[stage] for stage in STAGE_NAMES], out_channels=channels)
    rpn = _rpn(settings, channels)  # the heads in this order: their initial weights are drawn in it
    roi_heads = _roi_heads(settings, channels, num_classes, group_size)
    logger.info("built %s: ResNet-%d, norm %s, freeze_at %d, FPN %d ch, sublinear stages %s", name,
                settings["depth"], norm, freeze_at, channels, tuple(sublinear_stages) or "none")
    return FasterRCNN(backbone=backbone, fpn=fpn, rpn=rpn, roi_heads=roi_heads,
                      num_classes=num_classes, pixel_mean=settings["pixel_mean"], pixel_std=settings["pixel_std"],
                      size_divisibility=settings["size_divisibility"])


def _backbone(depth: int, norm: str, group_size: Optional[int], backbone_weights: Optional[str], freeze_at: int,
              sublinear_stages: Sequence[str]) -> ResNet:
    """ResNet-``depth``: loaded or initialised, its BN converted to ``norm``, frozen up to ``freeze_at``,
    ``sublinear_stages`` recomputed."""
    from hpc.cgbn import convert_model
    from hpc.recompute import recompute

    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
    unknown_stages = set(sublinear_stages) - set(STAGE_NAMES)
    if unknown_stages:
        raise ValueError(f"sublinear_stages {sorted(unknown_stages)} are not backbone stages; use some of "
                         f"{', '.join(STAGE_NAMES)}")
    frozen = frozen_stage_names(freeze_at)
    frozen_recomputed = [stage for stage in sublinear_stages if stage in frozen]
    if frozen_recomputed:
        raise ValueError(f"sublinear_stages {frozen_recomputed} are frozen (freeze_at={freeze_at}): a frozen stage "
                         "keeps no activations, so recomputing it saves nothing; drop them")
    backbone = ResNet(depth=depth)
    if backbone_weights is not None:
        load_torchvision_checkpoint(backbone, resolve_weights(backbone_weights))
    elif norm != "frozen":
        backbone.zero_init_residual([stage for stage in STAGE_NAMES if stage not in frozen])
    if norm != "bn":
        backbone = convert_model(backbone, mode=norm, group_size=group_size if norm == "cgbn" else None)
    backbone.freeze(freeze_at, lambda module: convert_model(module, mode="frozen"))
    recompute(backbone, [STAGE_MODULES[stage] for stage in sublinear_stages])
    return backbone


def _rpn(settings: Dict, channels: int) -> RPN:
    anchor_generator = AnchorGenerator(sizes=settings["anchor_sizes"], aspect_ratios=settings["anchor_aspect_ratios"],
                                       strides=LEVEL_STRIDES)
    rpn_low, rpn_high = settings["rpn_iou_thresholds"]
    return RPN(
        head=RPNHead(in_channels=channels, num_anchors=anchor_generator.num_anchors_per_position),
        anchor_generator=anchor_generator,
        matcher=Matcher(low_threshold=rpn_low, high_threshold=rpn_high, allow_low_quality_matches=True,
                        crowd_ioa_threshold=settings["crowd_ioa_threshold"]),
        box_coder=BoxCoder(RPN_BOX_WEIGHTS),
        batch_size_per_image=settings["rpn_batch_size_per_image"],
        positive_fraction=settings["rpn_positive_fraction"],
        pre_nms_topk=settings["rpn_pre_nms_topk"],
        post_nms_topk=settings["rpn_post_nms_topk"],
        nms_threshold=settings["rpn_nms_threshold"],
        smooth_l1_beta=settings["rpn_smooth_l1_beta"],
    )


def _roi_heads(settings: Dict, channels: int, num_classes: int, group_size: Optional[int]) -> RoIHeads:
    """The box head and predictor, then (``mask_on``) the mask branch, in this order."""
    resolution = settings["pooler_resolution"]
    box_head = BoxHead(in_channels=channels, pooled_size=resolution, hidden=settings["box_head_dim"])
    predictor = BoxPredictor(hidden=settings["box_head_dim"], num_classes=num_classes)
    mask = _mask_branch(settings, channels, num_classes, group_size) if settings["mask_on"] else {}
    return RoIHeads(
        pooler=MultiScaleRoIAlign(output_size=resolution, strides=ROI_LEVEL_STRIDES,
                                  sampling_ratio=settings["pooler_sampling_ratio"], aligned=settings["pooler_aligned"]),
        box_head=box_head,
        predictor=predictor,
        matcher=Matcher(low_threshold=settings["roi_iou_threshold"], high_threshold=settings["roi_iou_threshold"],
                        allow_low_quality_matches=False, crowd_ioa_threshold=settings["crowd_ioa_threshold"]),
        box_coder=BoxCoder(ROI_BOX_WEIGHTS),
        num_classes=num_classes,
        batch_size_per_image=settings["roi_batch_size_per_image"],
        positive_fraction=settings["roi_positive_fraction"],
        smooth_l1_beta=settings["roi_smooth_l1_beta"],
        score_threshold=settings["score_threshold"],
        nms_threshold=settings["nms_threshold"],
        detections_per_image=settings["detections_per_image"],
        **mask,
    )


def _mask_branch(settings: Dict, in_channels: int, num_classes: int, group_size: Optional[int]) -> Dict[str, nn.Module]:
    """Mask R-CNN's pooler and head for ``RoIHeads``: RoIAlign at ``mask_pooler_resolution`` on P2-P5 with
    the box head's level rule, and ``MaskHead``; its norm (``mask_head_norm``) is BN converted to
    cross-GPU BN (over groups of ``group_size`` ranks, as the backbone's), frozen or plain as asked."""
    from hpc.cgbn import convert_model

    head_norm = settings["mask_head_norm"]
    if head_norm is not None and head_norm not in NORMS:
        raise ValueError(f"mask_head_norm={head_norm!r}; use None or one of {', '.join(NORMS)}")
    head = MaskHead(in_channels=in_channels, num_classes=num_classes, channels=settings["mask_head_channels"],
                    num_convs=settings["mask_head_convs"], norm=None if head_norm is None else nn.BatchNorm2d)
    if head_norm in ("cgbn", "frozen"):
        head = convert_model(head, mode=head_norm, group_size=group_size if head_norm == "cgbn" else None)
    pooler = MultiScaleRoIAlign(output_size=settings["mask_pooler_resolution"], strides=ROI_LEVEL_STRIDES,
                                sampling_ratio=settings["pooler_sampling_ratio"], aligned=settings["pooler_aligned"])
    return {"mask_pooler": pooler, "mask_head": head}
