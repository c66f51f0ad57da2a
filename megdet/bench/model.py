"""``megdet bench model``: forward + backward seconds per image of the detector, with and without
sublinear memory (recomputed backbone stages), beside torchvision's Faster R-CNN when it runs here.

    megdet bench model                                             # CPU: resnet18/50_fpn at 512 and 800 px
    megdet bench model --device cuda --amp bf16 --channels-last    # GPU, + torchvision side by side

Every row is one training step (losses of a random synthetic batch, then backward) timed after a
warm-up step; the warm-up step also gives the peak memory (CPU: allocations seen by the profiler;
GPU: ``torch.cuda.max_memory_allocated``). Images are ``size`` x ``size * 4/3`` pixels.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from hpc.errors import UserError
from hpc.memory import peak_cpu_bytes
from megdet.bench import report
from megdet.model import MODEL_NAMES, build_detector

BOXES_PER_IMAGE = 8
NUM_CLASSES = 80
SUBLINEAR_STAGES = ("res2", "res3")   # the MegDet presets' choice
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
    parser.add_argument("--amp", default="none", choices=("none", "bf16"), help="autocast (default: %(default)s)")
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


def torchvision_unavailable() -> Optional[str]:
    """Why torchvision's fasterrcnn_resnet50_fpn cannot be timed beside ours here, or None."""
    from megdet.model import ops

    try:
        import torchvision  # noqa: F401
    except ImportError as error:
        return f"torchvision does not import ({error})"
    if ops.backend() != "torchvision":
        return "torchvision imports but its compiled ops do not run against this torch build"
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
    if args.amp == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    skip_reason = torchvision_unavailable()
    if skip_reason:
        print(f"torchvision fasterrcnn_resnet50_fpn side by side: skipped ({skip_reason})", flush=True)

    rows: List[Dict] = []
    for size in sizes:
        images, targets = synthetic_batch(args.batch, size, device, generator)
        for name in models:
            plain_seconds = None
            for sublinear in (False, True):
                torch.manual_seed(0)
                # everything trains, as torchvision's model without pretrained weights
                model = build_detector(name, num_classes=NUM_CLASSES, norm=args.norm, freeze_at=0,
                                       sublinear_stages=SUBLINEAR_STAGES if sublinear else ())
                model = model.to(device=device, memory_format=memory_format).train()

                def step():
                    model.zero_grad(set_to_none=True)
                    with autocast():
                        losses = model(images, targets)
                    sum(losses.values()).backward()

                seconds, peak = time_steps(step, args.repeats, device)
                plain_seconds = plain_seconds or seconds
                row = {"model": name, "size": size, "sublinear": ",".join(SUBLINEAR_STAGES) if sublinear else "-",
                       "s_per_image": seconds / args.batch, "peak_MiB": peak / MIB,
                       "time_vs_plain": seconds / plain_seconds}
                if name == "resnet50_fpn" and not sublinear and skip_reason is None:
                    theirs = time_torchvision(images, targets, size, args.repeats, device, autocast, memory_format)
                    row["torchvision_s_per_image"] = theirs / args.batch
                    row["ours_vs_torchvision"] = seconds / theirs
                rows.append(row)
                print(report.markdown_table([row], list(row)).splitlines()[-1], flush=True)
                del model

    columns = ["model", "size", "sublinear", "s_per_image", "peak_MiB", "time_vs_plain",
               "torchvision_s_per_image", "ours_vs_torchvision"]
    inputs = {"models": models, "sizes": sizes, "batch": args.batch, "repeats": args.repeats, "norm": args.norm,
              "device": args.device, "amp": args.amp, "channels_last": args.channels_last,
              "sublinear_stages": SUBLINEAR_STAGES, "torchvision": skip_reason or "compared"}
    print(report.write(args.out, "model", rows, columns, inputs))
    return 0


def time_torchvision(images, targets, size: int, repeats: int, device: torch.device, autocast,
                     memory_format) -> float:
    """Median seconds of a training step of torchvision's fasterrcnn_resnet50_fpn on the same batch
    (its own resize keeps the size: min_size = size, max_size = the long side)."""
    import torchvision

    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1, min_size=size,
        max_size=int(round(size * LONG_SIDE_RATIO)), trainable_backbone_layers=5)
    model = model.to(device=device, memory_format=memory_format).train()
    scaled = [image / 255 for image in images]  # torchvision normalises 0..1 images itself

    def step():
        model.zero_grad(set_to_none=True)
        with autocast():
            losses = model(scaled, targets)
        sum(losses.values()).backward()

    seconds, _ = time_steps(step, repeats, device)
    return seconds
