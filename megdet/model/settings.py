"""Every setting of the detector and the named models, as plain data: the one place their values are
written. ``megdet.model.detector.build_detector`` builds from them; ``megdet.config`` checks names
against them and passes a preset's overrides by the same keys, without importing torch."""

# The FPN's output levels P2-P6 and their strides in pixels: one anchor size per level.
LEVEL_NAMES = ("p2", "p3", "p4", "p5", "p6")
LEVEL_STRIDES = (4, 8, 16, 32, 64)
# ImageNet statistics of RGB in 0..255 (the torchvision checkpoints were trained with these).
IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)
# Every setting of the model; the presets are detectron2's Faster R-CNN R50-FPN defaults unless noted.
DEFAULTS = dict(
    depth=50,
    fpn_channels=256,
    anchor_sizes=(32, 64, 128, 256, 512),
    anchor_aspect_ratios=(0.5, 1.0, 2.0),
    rpn_iou_thresholds=(0.3, 0.7),
    rpn_batch_size_per_image=256,
    rpn_positive_fraction=0.5,
    rpn_pre_nms_topk=(2000, 1000),    # (train, test), per level and image
    rpn_post_nms_topk=(1000, 1000),   # (train, test), per image
    rpn_nms_threshold=0.7,
    rpn_smooth_l1_beta=0.0,           # 0 = L1
    roi_iou_threshold=0.5,
    roi_batch_size_per_image=512,
    roi_positive_fraction=0.25,
    box_head_dim=1024,
    pooler_resolution=7,
    pooler_sampling_ratio=0,          # adaptive
    pooler_aligned=True,
    roi_smooth_l1_beta=0.0,           # 0 = L1
    score_threshold=0.05,
    nms_threshold=0.5,
    detections_per_image=100,
    crowd_ioa_threshold=0.7,
    mask_on=False,                    # Mask R-CNN's mask branch (He et al. 2017), detectron2's defaults:
    mask_pooler_resolution=14,        # 14x14 RoIAlign on P2-P5 (the box head's level rule)
    mask_head_channels=256,           # four 3x3 convs of 256, a 2x deconv, a 1x1 per class: 28x28
    mask_head_convs=4,
    mask_head_norm=None,              # None (detectron2's), or one of NORMS after each 3x3 conv
    pixel_mean=IMAGENET_PIXEL_MEAN,
    pixel_std=IMAGENET_PIXEL_STD,
    size_divisibility=32,
)
PRESETS = {
    # CPU-sized for demos and tests at small input sizes (shorter side ~256-512 px, few objects):
    # half-width FPN and box head, half the proposals and RoIs.
    "resnet18_fpn": dict(DEFAULTS, depth=18, fpn_channels=128, box_head_dim=512,
                         rpn_pre_nms_topk=(1000, 1000), rpn_post_nms_topk=(500, 500),
                         roi_batch_size_per_image=256),
    "resnet50_fpn": dict(DEFAULTS, depth=50),
    "resnet101_fpn": dict(DEFAULTS, depth=101),
    "mask_rcnn_r50_fpn": dict(DEFAULTS, depth=50, mask_on=True),
}
MODEL_NAMES = tuple(PRESETS)
NORMS = ("cgbn", "frozen", "bn")
DEFAULT_NORM = "bn"  # the backbone's norm unless told: per-process BN (model.norm, build_detector's norm)
