"""``megdet bench model``: forward + backward seconds per image of the detector, with and without
sublinear memory (recomputed backbone stages), in each autocast mode, beside torchvision's Faster
R-CNN when its compiled ops run on the device.

    megdet bench model                                             # CPU: resnet18/50_fpn at 512 and 800 px
    megdet bench model --device cuda --models resnet50_fpn --sizes 800 --amp none,bf16,fp16 --channels-last

Every row is one training step (losses of a random synthetic batch, then backward) timed after a
warm-up step; the warm-up step also gives the peak memory (CPU: allocations seen by the profiler;
GPU: ``torch.cuda.max_memory_allocated``), printed beside what the peak-memory model of
``megdet.memory_model`` predicts for it (``model_MiB``, ``model_vs_measured``). Images are ``size`` x
``size * 1333/800`` pixels (800 x 1333 at 800: the largest image of the COCO recipe). ``precision``
says what the arithmetic was, from the flags at run time: "fp32" on CUDA runs cuDNN convolutions in
TF32 while ``torch.backends.cudnn.allow_tf32`` is set (torch's default).

Settings (``--settings``): "equal" rows build ours with torchvision's settings where ours differ and
torchvision's cannot follow (``EQUAL_TO_TORCHVISION``), and time torchvision's
``fasterrcnn_resnet50_fpn`` beside resnet50_fpn with every setting it takes set from ours
(``torchvision_arguments``); "defaults" rows are ours as the presets build it, with and without
sublinear memory. ``STILL_DIFFERENT`` lists what neither model lets us set. Ratios:
``time_vs_plain`` (sublinear memory against none), ``images_per_s_vs_fp32`` (an autocast mode
against float32, same model, size and settings) and ``ours_vs_torchvision`` (torchvision's step time
over ours: above 1 means ours is faster), each measured in the same run. fp16 rows scale the loss by
2**16 before backward, as training does.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from hpc import amp
from hpc.errors import UserError
from hpc.recompute import peak_cpu_bytes
from megdet.bench import report
from megdet import memory_model
from megdet.model import MODEL_NAMES, build_detector
from megdet.model.detector import ROI_BOX_WEIGHTS
from megdet.model.settings import PRESETS

BOXES_PER_IMAGE = 8
NUM_CLASSES = 80
SUBLINEAR_STAGES = ("res2", "res3")   # the largest stages when every layer trains (freeze_at 0, below)
LONG_SIDE_RATIO = 1333 / 800           # 800 x 1333 at size 800: the COCO recipe's largest image
MIB = 2 ** 20
SETTINGS = ("equal", "defaults")
# The "equal" rows: ours set as torchvision's model is where it cannot be set as ours (its pooler is
# the original RoIAlign, without the half-pixel shift, so ours takes its 2 x 2 samples per bin too; its
# box losses are smooth L1 with beta 1/9 in code); torchvision takes ours for the rest
# (``torchvision_arguments``: 1000 proposals per image after NMS in training, against its 2000).
EQUAL_TO_TORCHVISION = dict(pooler_sampling_ratio=2, pooler_aligned=False, rpn_smooth_l1_beta=1 / 9,
                            roi_smooth_l1_beta=1 / 9)
# What remains different in the "equal" rows (neither model takes a setting for it).
STILL_DIFFERENT = (
    "torchvision resizes each image once more (bilinear, at scale 1: the size stays), ours takes it as it is",
    "torchvision's RPN drops proposals under 1e-3 px a side, ours the empty ones",
    "RoI level rule: the same formula, eps 1e-6 in torchvision's, 1e-8 in ours",
    "torchvision's box predictor also regresses the background class (K+1 outputs x 4, ours K x 4)",
    "loss normalisers: torchvision's RPN divides by the sampled anchors, ours by 256 per image",
    "initialisation (no cost): ours zeroes the last BN scale of each residual branch, torchvision's are 1",
    "both check the targets on the host each step; ours also that pixels are finite and labels in range",
)


def add_arguments(parser) -> None:
    parser.add_argument("--models", default="resnet18_fpn,resnet50_fpn",
                        help=f"comma-separated, of {', '.join(MODEL_NAMES)} (default: %(default)s)")
    parser.add_argument("--sizes", default="512,800", help="shorter image sides in pixels (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per row (default: %(default)s)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated, of equal (torchvision's where they differ, timed beside it) and "
                             "defaults (the presets', with and without sublinear memory) (default: %(default)s)")
    parser.add_argument("--norm", default="bn", choices=("bn", "frozen"),
                        help="backbone norm (one process: cgbn would equal bn) (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--amp", default="none",
                        help="autocast modes, comma-separated, of none, bf16, fp16 (default: %(default)s)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and batch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def image_shape(size: int) -> Tuple[int, int]:
    """(height, width) of the benchmark's images for the shorter side ``size``."""
    return size, int(round(size * LONG_SIDE_RATIO))


def synthetic_batch(batch: int, size: int, device: torch.device, generator: torch.Generator):
    """Random RGB images (3, size, size*1333/800) in 0..255 and targets of random boxes and labels."""
    height, width = image_shape(size)
    images, targets = [], []
    for _ in range(batch):
        images.append((torch.rand(3, height, width, generator=generator) * 255).to(device))
        corner = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
        sides = (0.05 + torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * 0.25) * torch.tensor([width, height])
        targets.append({"boxes": torch.cat((corner, corner + sides), dim=1).to(device),
                        "labels": torch.randint(1, NUM_CLASSES + 1, (BOXES_PER_IMAGE,), generator=generator).to(device),
                        "iscrowd": torch.zeros(BOXES_PER_IMAGE, dtype=torch.bool, device=device)})
    return images, targets


def time_steps(step: Callable[[], None], repeats: int, device: torch.device) -> Tuple[float, int]:
    """(median seconds of ``repeats`` timed steps, peak bytes of the warm-up step)."""
    def synchronised():
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        synchronised()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_cpu_bytes(synchronised)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        synchronised()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def precision(mode: str, device: torch.device) -> str:
    """What a row of autocast ``mode`` computes in, from the flags at run time: on CUDA, "fp32" convolutions
    run in TF32 while ``torch.backends.cudnn.allow_tf32`` is set (torch's default) and float32 matmuls as
    ``torch.get_float32_matmul_precision()`` allows."""
    if mode != "none":
        return f"{mode} autocast" + (", loss scaled" if mode == "fp16" else "")
    matmuls = {"highest": "fp32", "high": "TF32", "medium": "bf16"}[torch.get_float32_matmul_precision()]
    if device.type != "cuda":
        return "fp32" if matmuls == "fp32" else f"fp32 ({matmuls} matmuls)"
    convolutions = "TF32" if torch.backends.cudnn.allow_tf32 else "fp32"
    return f"fp32 ({convolutions} convolutions, {matmuls} matmuls)"


def torchvision_unavailable(device: torch.device) -> Optional[str]:
    """Why torchvision's fasterrcnn_resnet50_fpn cannot be timed beside ours on ``device``, or None."""
    from megdet.model import ops

    if ops.backend(device.type) != "torchvision":
        return ops.describe_backend(device.type)
    return None


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        raise UserError(f"--models {unknown} unknown; use some of {', '.join(MODEL_NAMES)}")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError as error:
        raise UserError(f"--sizes {args.sizes!r} is not a comma-separated list of integers") from error
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device!r}: use cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA device; run on a GPU machine or use --device cpu")
    if args.batch < 1 or args.repeats < 1:
        raise UserError(f"--batch {args.batch} and --repeats {args.repeats} must be at least 1")
    device = torch.device(args.device)
    modes = [m for m in args.amp.split(",") if m]
    bad = [m for m in modes if m not in ("none", "bf16", "fp16")]
    if not modes or bad:
        raise UserError(f"--amp {args.amp!r}: give modes of none, bf16, fp16, comma-separated")
    settings = [s for s in args.settings.split(",") if s]
    if not settings or set(settings) - set(SETTINGS):
        raise UserError(f"--settings {args.settings!r}: give some of {', '.join(SETTINGS)}, comma-separated")
    dtypes = {mode: amp.resolve(mode, device) for mode in modes}
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    skip_reason = torchvision_unavailable(device)
    if args.norm != "bn":
        skip_reason = f"--norm {args.norm}: torchvision's model without weights trains BatchNorm, ours with --norm bn"
    if skip_reason and "equal" in settings:
        print(f"torchvision fasterrcnn_resnet50_fpn side by side: skipped ({skip_reason})", flush=True)
    # (settings, recomputed stages) of each model's rows, per size and autocast mode
    variants = [(setting, ()) for setting in settings]
    if "defaults" in settings:
        variants.append(("defaults", SUBLINEAR_STAGES))

    rows: List[Dict] = []
    for size in sizes:
        images, targets = synthetic_batch(args.batch, size, device, generator)
        for name in models:
            fp32_seconds: Dict[str, float] = {}
            for mode, dtype in dtypes.items():
                plain_seconds: Dict[str, float] = {}
                for setting, sublinear in variants:
                    overrides = EQUAL_TO_TORCHVISION if setting == "equal" else {}
                    torch.manual_seed(0)
                    # everything trains, as torchvision's model without pretrained weights
                    model = build_detector(name, num_classes=NUM_CLASSES, norm=args.norm, freeze_at=0,
                                           sublinear_stages=sublinear, **overrides)
                    model = model.to(device=device, memory_format=memory_format).train()
                    step = training_step(model, images, targets, device, dtype)
                    seconds, peak = time_steps(step, args.repeats, device)
                    if not sublinear:
                        plain_seconds[setting] = seconds
                        if mode == "none":
                            fp32_seconds[setting] = seconds
                    row = {"model": name, "size": size, "settings": setting, "amp": mode,
                           "precision": precision(mode, device), "sublinear": ",".join(sublinear) or "-",
                           "s_per_image": seconds / args.batch, "images_per_s": args.batch / seconds,
                           "peak_MiB": peak / MIB, "time_vs_plain": seconds / plain_seconds[setting],
                           "images_per_s_vs_fp32": (fp32_seconds[setting] / seconds
                                                    if setting in fp32_seconds and not sublinear else None)}
                    if memory_model.has_figures(name):
                        estimate = memory_model.training_peak(
                            model=name, norm=args.norm, pretrained=False, images=args.batch, optimizer=None,
                            mask_on=PRESETS[name]["mask_on"],
                            recomputed=sublinear, amp=mode, min_size=size, max_size=image_shape(size)[1])
                        row["model_MiB"] = estimate.cpu_mib if device.type == "cpu" else estimate.allocated_mib
                        row["model_vs_measured"] = row["model_MiB"] / row["peak_MiB"]
                    if name == "resnet50_fpn" and setting == "equal" and skip_reason is None:
                        theirs, their_peak = time_torchvision(
                            images, targets, dict(PRESETS[name], **EQUAL_TO_TORCHVISION), size, args.repeats,
                            device, dtype, memory_format)
                        row.update(torchvision_images_per_s=args.batch / theirs, torchvision_peak_MiB=their_peak / MIB,
                                   ours_vs_torchvision=theirs / seconds)
                    rows.append(row)
                    print(report.markdown_table([row], list(row)).splitlines()[-1], flush=True)
                    del model

    columns = ["model", "size", "settings", "amp", "precision", "sublinear", "s_per_image", "images_per_s",
               "peak_MiB", "model_MiB", "model_vs_measured", "time_vs_plain", "images_per_s_vs_fp32",
               "torchvision_images_per_s", "torchvision_peak_MiB", "ours_vs_torchvision"]
    images_at = {size: "x".join(map(str, image_shape(size))) for size in sizes}
    inputs = {"models": models, "sizes": sizes, "images": images_at,
              "batch": args.batch, "repeats": args.repeats, "norm": args.norm, "device": args.device, "amp": modes,
              "settings": settings, "equal_to_torchvision": EQUAL_TO_TORCHVISION, "still_different": STILL_DIFFERENT,
              "channels_last": args.channels_last, "sublinear_stages": SUBLINEAR_STAGES,
              "torchvision": skip_reason or "compared"}
    print(report.write(args.out, "model", rows, columns, inputs))
    return 0


def training_step(model, images, targets, device: torch.device, dtype) -> Callable[[], None]:
    """One step of ``model``: zero the gradients, forward under ``dtype``'s autocast, backward (the loss
    scaled for fp16, as ``hpc.amp.LossScaler`` does in training)."""
    scale = amp.DEFAULT_INIT_SCALE if dtype == torch.float16 else 1.0

    def step():
        model.zero_grad(set_to_none=True)
        with amp.autocast(device, dtype):
            losses = model(images, targets)
        (sum(losses.values()) * scale).backward()
    return step


def torchvision_arguments(settings: Dict, size: int) -> Dict:
    """Keyword arguments of torchvision's ``fasterrcnn_resnet50_fpn`` that set it as our ``settings`` (a
    resnet50_fpn preset with ``EQUAL_TO_TORCHVISION``), for images of ``image_shape(size)`` that its
    resize keeps as they are. Builds torchvision's anchor generator and pooler."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign as TorchvisionRoIAlign

    # torchvision fixes these in code; equal only if ours are set so
    assert settings["fpn_channels"] == 256 and settings["box_head_dim"] == 1024, settings
    assert not settings["pooler_aligned"] and settings["rpn_smooth_l1_beta"] == settings["roi_smooth_l1_beta"] == 1 / 9
    height, width = image_shape(size)
    rpn_low, rpn_high = settings["rpn_iou_thresholds"]
    levels = len(settings["anchor_sizes"])
    return dict(
        min_size=height, max_size=width, size_divisible=settings["size_divisibility"],
        image_mean=[value / 255 for value in settings["pixel_mean"]],  # its images are in 0..1
        image_std=[value / 255 for value in settings["pixel_std"]],
        rpn_anchor_generator=AnchorGenerator(sizes=tuple((side,) for side in settings["anchor_sizes"]),
                                             aspect_ratios=(tuple(settings["anchor_aspect_ratios"]),) * levels),
        rpn_pre_nms_top_n_train=settings["rpn_pre_nms_topk"][0], rpn_pre_nms_top_n_test=settings["rpn_pre_nms_topk"][1],
        rpn_post_nms_top_n_train=settings["rpn_post_nms_topk"][0],
        rpn_post_nms_top_n_test=settings["rpn_post_nms_topk"][1],
        rpn_nms_thresh=settings["rpn_nms_threshold"], rpn_fg_iou_thresh=rpn_high, rpn_bg_iou_thresh=rpn_low,
        rpn_batch_size_per_image=settings["rpn_batch_size_per_image"],
        rpn_positive_fraction=settings["rpn_positive_fraction"],
        box_roi_pool=TorchvisionRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=settings["pooler_resolution"],
                                         sampling_ratio=settings["pooler_sampling_ratio"]),
        box_fg_iou_thresh=settings["roi_iou_threshold"], box_bg_iou_thresh=settings["roi_iou_threshold"],
        box_batch_size_per_image=settings["roi_batch_size_per_image"],
        box_positive_fraction=settings["roi_positive_fraction"], bbox_reg_weights=ROI_BOX_WEIGHTS,
        box_score_thresh=settings["score_threshold"], box_nms_thresh=settings["nms_threshold"],
        box_detections_per_img=settings["detections_per_image"])


def time_torchvision(images, targets, settings: Dict, size: int, repeats: int, device: torch.device, dtype,
                     memory_format) -> Tuple[float, int]:
    """(median seconds, peak bytes) of a training step of torchvision's fasterrcnn_resnet50_fpn, set as
    ``settings`` (``torchvision_arguments``), on the same batch; every layer trains, with BatchNorm
    (torchvision's choice without pretrained weights), as ours with norm bn and freeze_at 0."""
    import torchvision

    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1,
        **torchvision_arguments(settings, size))
    model = model.to(device=device, memory_format=memory_format).train()
    scaled = [image / 255 for image in images]  # torchvision normalises 0..1 images itself
    return time_steps(training_step(model, scaled, targets, device, dtype), repeats, device)
