"""``megdet bench model``: forward + backward seconds per image of the detector, with and without
sublinear memory (recomputed backbone stages), in each autocast mode, beside torchvision's Faster
R-CNN when its compiled ops run on the device.

    megdet bench model                                             # CPU: resnet18/50_fpn at 512 and 800 px
    megdet bench model --device cuda --models resnet50_fpn --sizes 800 --amp none,bf16,fp16 --channels-last

Every row is one training step (losses of a random synthetic batch, then backward) timed after a
warm-up step; the warm-up step also gives the peak memory (CPU: allocations seen by the profiler;
GPU: ``torch.cuda.max_memory_allocated``), printed beside what the peak-memory model of
``megdet.memory`` predicts for it (``model_MiB``, ``model_vs_measured``). Images are ``size`` x
``size * 4/3`` pixels. Ratios:
``time_vs_plain`` (sublinear memory against none), ``images_per_s_vs_fp32`` (an autocast mode
against float32, same model and size) and ``ours_vs_torchvision`` (torchvision's step time over
ours: above 1 means ours is faster), each measured in the same run. fp16 rows scale the loss by
2**16 before backward, as training does.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from hpc import amp
from hpc.errors import UserError
from hpc.memory import peak_cpu_bytes
from megdet.bench import report
from megdet import memory
from megdet.model import MODEL_NAMES, build_detector

BOXES_PER_IMAGE = 8
NUM_CLASSES = 80
SUBLINEAR_STAGES = ("res2", "res3")   # the largest stages when every layer trains (freeze_at 0, below)
LONG_SIDE_RATIO = 4 / 3                # COCO-like landscape images
MIB = 2 ** 20


def add_arguments(parser) -> None:
    parser.add_argument("--models", default="resnet18_fpn,resnet50_fpn",
                        help=f"comma-separated, of {', '.join(MODEL_NAMES)} (default: %(default)s)")
    parser.add_argument("--sizes", default="512,800", help="shorter image sides in pixels (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per row (default: %(default)s)")
    parser.add_argument("--norm", default="bn", choices=("bn", "frozen"),
                        help="backbone norm (one process: cgbn would equal bn) (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--amp", default="none",
                        help="autocast modes, comma-separated, of none, bf16, fp16 (default: %(default)s)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and batch")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def synthetic_batch(batch: int, size: int, device: torch.device, generator: torch.Generator):
    """Random RGB images (3, size, size*4/3) in 0..255 and targets of random boxes and labels."""
    height, width = size, int(round(size * LONG_SIDE_RATIO))
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
    dtypes = {mode: amp.resolve(mode, device) for mode in modes}
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    skip_reason = torchvision_unavailable(device)
    if skip_reason:
        print(f"torchvision fasterrcnn_resnet50_fpn side by side: skipped ({skip_reason})", flush=True)

    rows: List[Dict] = []
    for size in sizes:
        images, targets = synthetic_batch(args.batch, size, device, generator)
        for name in models:
            fp32_seconds = None
            for mode, dtype in dtypes.items():
                plain_seconds = None
                for sublinear in (False, True):
                    torch.manual_seed(0)
                    # everything trains, as torchvision's model without pretrained weights
                    model = build_detector(name, num_classes=NUM_CLASSES, norm=args.norm, freeze_at=0,
                                           sublinear_stages=SUBLINEAR_STAGES if sublinear else ())
                    model = model.to(device=device, memory_format=memory_format).train()
                    step = training_step(model, images, targets, device, dtype)
                    seconds, peak = time_steps(step, args.repeats, device)
                    plain_seconds = plain_seconds or seconds
                    if mode == "none" and not sublinear:
                        fp32_seconds = seconds
                    row = {"model": name, "size": size, "amp": mode,
                           "sublinear": ",".join(SUBLINEAR_STAGES) if sublinear else "-",
                           "s_per_image": seconds / args.batch, "images_per_s": args.batch / seconds,
                           "peak_MiB": peak / MIB, "time_vs_plain": seconds / plain_seconds,
                           "images_per_s_vs_fp32": fp32_seconds / seconds if fp32_seconds and not sublinear else None}
                    if name in memory.MEASURED:
                        estimate = memory.training_peak(
                            model=name, norm=args.norm, pretrained=False, images=args.batch, optimizer=None,
                            recomputed=SUBLINEAR_STAGES if sublinear else (), amp=mode, min_size=size,
                            max_size=int(round(size * LONG_SIDE_RATIO)))
                        row["model_MiB"] = estimate.cpu_mib if device.type == "cpu" else estimate.allocated_mib
                        row["model_vs_measured"] = row["model_MiB"] / row["peak_MiB"]
                    if name == "resnet50_fpn" and not sublinear and skip_reason is None:
                        theirs, their_peak = time_torchvision(images, targets, size, args.repeats, device, dtype,
                                                              memory_format)
                        row.update(torchvision_images_per_s=args.batch / theirs, torchvision_peak_MiB=their_peak / MIB,
                                   ours_vs_torchvision=theirs / seconds)
                    rows.append(row)
                    print(report.markdown_table([row], list(row)).splitlines()[-1], flush=True)
                    del model

    columns = ["model", "size", "amp", "sublinear", "s_per_image", "images_per_s", "peak_MiB", "model_MiB",
               "model_vs_measured", "time_vs_plain",
               "images_per_s_vs_fp32", "torchvision_images_per_s", "torchvision_peak_MiB", "ours_vs_torchvision"]
    inputs = {"models": models, "sizes": sizes, "batch": args.batch, "repeats": args.repeats, "norm": args.norm,
              "device": args.device, "amp": modes, "channels_last": args.channels_last,
              "sublinear_stages": SUBLINEAR_STAGES, "torchvision": skip_reason or "compared"}
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


def time_torchvision(images, targets, size: int, repeats: int, device: torch.device, dtype,
                     memory_format) -> Tuple[float, int]:
    """(median seconds, peak bytes) of a training step of torchvision's fasterrcnn_resnet50_fpn on the
    same batch (its own resize keeps the size: min_size = size, max_size = the long side)."""
    import torchvision

    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1, min_size=size,
        max_size=int(round(size * LONG_SIDE_RATIO)), trainable_backbone_layers=5)
    model = model.to(device=device, memory_format=memory_format).train()
    scaled = [image / 255 for image in images]  # torchvision normalises 0..1 images itself
    return time_steps(training_step(model, scaled, targets, device, dtype), repeats, device)
