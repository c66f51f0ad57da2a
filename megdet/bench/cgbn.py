"""``megdet bench cgbn``: training-step time of conv + BN + ReLU blocks with local BN, our cross-GPU
BN and torch's SyncBatchNorm, measured side by side on the same ranks, as ratios to local BN.

    megdet bench cgbn --ranks 2                  # starts 2 ranks per engine itself (horovodrun, torchrun)
    horovodrun --gloo -np 2 -H localhost:2 megdet bench cgbn --out runs/bench/cgbn-horovod
    MEGDET_COMM=torch torchrun --nproc-per-node 2 $(which megdet) bench cgbn --out runs/bench/cgbn-torch
    MEGDET_TORCH_BACKEND=gloo megdet bench cgbn --engines torch --device cuda:0   # 2 ranks sharing one GPU

A step is forward + backward of the whole stack on this rank's images (no optimizer, no gradient
allreduce: the difference between the variants is the batch norm). Each step the variants run in
turn, after a barrier; a step's time is the slowest rank's, and the table gives the median.
torch's SyncBatchNorm needs the torch engine and CUDA (torch refuses CPU input); where it cannot
run, its row says why.

Before timing, the CGBN stack is checked against nn.BatchNorm2d on the group's concatenated batch, on
the same device (``max_error``: the largest absolute difference over the outputs, the input
gradients and the running statistics, over all ranks, with TF32 off; ``exact`` when it is within float32 rounding).
"""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from hpc import cgbn
from hpc import comm as comm_mod
from hpc import device as device_mod
from hpc import launch
from hpc.errors import UserError
from megdet.bench import report, spawn

NAME = "cgbn"
COLUMNS = ("engine", "ranks", "device", "variant", "ms_per_step", "ratio_to_local_bn", "max_error", "exact", "note")
FORWARDED = ("blocks", "channels", "images", "size", "steps", "warmup", "group_size", "threads", "device")
# float32 rounding of a few conv + BN layers at unit scale: a wrong statistic is off by far more.
EXACT_TOLERANCE = 1e-4


def add_arguments(parser) -> None:
    parser.add_argument("--ranks", type=int, default=2,
                        help="when no launcher started us: ranks to start per engine (default: %(default)s)")
    parser.add_argument("--engines", default=",".join(spawn.ENGINES),
                        help="when no launcher started us: engines to run, comma-separated (default: %(default)s)")
    parser.add_argument("--blocks", type=int, default=4, help="conv + BN + ReLU blocks (default: %(default)s)")
    parser.add_argument("--channels", type=int, default=64, help="channels per block (default: %(default)s)")
    parser.add_argument("--images", type=int, default=4, help="images per rank (default: %(default)s)")
    parser.add_argument("--size", type=int, default=56, help="feature map height = width (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=None, help="ranks per BN group (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: CPU cores / ranks on this node)")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda (each rank its own GPU) or cuda:N (every rank on GPU N, e.g. "
                             "with MEGDET_TORCH_BACKEND=gloo on a one-GPU machine) (default: %(default)s)")


def run(args) -> int:
    for name in ("ranks", "blocks", "channels", "images", "size", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"Invalid --{name}: {getattr(args, name)}; need at least 1")
    if (launch.detect().size or 1) > 1:
        return _run_rank(args)
    if args.ranks < 2:
        raise UserError(f"Invalid --ranks: {args.ranks}; cross-GPU batch norm needs at least 2 ranks")
    return _spawn(args)


def _spawn(args) -> int:
    """Start ``args.ranks`` ranks per engine, each writing its own table, then merge the rows."""
    engines = spawn.parse_engines(args.engines)
    forwarded = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in FORWARDED
                 if getattr(args, name) is not None]
    rows: List[Dict] = []
    for engine in engines:
        rows += spawn.run_ranks(NAME, engine, args.ranks, Path(args.out) / engine, forwarded)
    table = report.write(args.out, NAME, rows, COLUMNS, inputs=_inputs(args))
    print(table)
    return 0


def _inputs(args) -> Dict:
    return {name: getattr(args, name) for name in ("ranks", "engines", *FORWARDED)}


def _stack(blocks: int, channels: int) -> nn.Sequential:
    layers: List[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
    return nn.Sequential(*layers)


def _device(text: str) -> torch.device:
    """``--device``: a kind of ``hpc.device`` (this rank's GPU, or the CPU), or one GPU for every rank."""
    if text.startswith("cuda:"):
        chosen = torch.device(text)
        if not torch.cuda.is_available() or chosen.index >= torch.cuda.device_count():
            raise UserError(f"Invalid --device: {text}; this process sees {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(chosen)
        return chosen
    return device_mod.select(text)


@contextlib.contextmanager
def _true_float32():
    """Convolutions and matrix products in float32 arithmetic: on CUDA torch runs float32 convolutions
    in TF32 by default, whose 10-bit mantissa would show in ``max_error`` as if CGBN were wrong."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _max_error(comm: comm_mod.Communicator, stack: nn.Module, args, device: torch.device) -> float:
    """The largest absolute difference between the CGBN ``stack`` on this rank's images and a copy of
    it with nn.BatchNorm2d on the whole group's images (outputs, input gradients, running statistics),
    over all ranks, in true float32 arithmetic. Every rank draws the same group batch from one seed."""
    with _true_float32():
        return _group_error(comm, stack, args, device)


def _group_error(comm: comm_mod.Communicator, stack: nn.Module, args, device: torch.device) -> float:
    group = comm.partition(args.group_size)
    generator = torch.Generator().manual_seed(1)
    group_images = torch.randn(group.size * args.images, args.channels, args.size, args.size,
                               generator=generator).to(device)
    mine = slice(group.rank * args.images, (group.rank + 1) * args.images)
    reference = cgbn.convert_model(copy.deepcopy(stack), mode="bn")
    x, x_all = group_images[mine].clone().requires_grad_(), group_images.clone().requires_grad_()
    y, y_all = stack(x), reference(x_all)
    weights = torch.linspace(-1, 1, y_all[0].numel(), device=device).view_as(y_all[0])
    (y * weights).sum().backward()
    (y_all * weights).sum().backward()
    errors = [(y - y_all[mine]).abs().max(), (x.grad - x_all.grad[mine]).abs().max()]
    for ours, theirs in zip(stack.modules(), reference.modules()):
        if isinstance(ours, cgbn.CrossGPUBatchNorm2d):
            errors += [(ours.running_mean - theirs.running_mean).abs().max(),
                       (ours.running_var - theirs.running_var).abs().max()]
    stack.zero_grad(set_to_none=True)
    worst = torch.stack(errors).float().max().view(1)
    return max(comm.allgather(worst.cpu()).tolist())


def _run_rank(args) -> int:
    device = _device(args.device)
    comm = comm_mod.init(device=device)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // comm.local_size))
    torch.manual_seed(0)
    local = _stack(args.blocks, args.channels).to(device)
    variants = {"local BN": local,
                "CGBN": cgbn.convert_model(copy.deepcopy(local), mode="cgbn", group_size=args.group_size)}
    max_error = _max_error(comm, copy.deepcopy(variants["CGBN"]), args, device)
    notes = {"local BN": "nn.BatchNorm2d, no communication",
             "CGBN": f"hpc.cgbn, groups of {args.group_size or comm.size}, {comm.engine} engine"}
    if comm.engine == "torch" and device.type == "cuda" and comm.backend == "nccl":
        group = comm.partition(args.group_size)
        variants["SyncBatchNorm"] = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(local), group.handle)
        notes["SyncBatchNorm"] = "torch.nn.SyncBatchNorm"
    elif comm.engine != "torch":
        notes["SyncBatchNorm"] = "not run: needs the torch engine"
    elif device.type != "cuda":
        notes["SyncBatchNorm"] = "not run: torch's SyncBatchNorm refuses CPU input (GPU only)"
    else:
        notes["SyncBatchNorm"] = f"not run: torch's SyncBatchNorm gathers with NCCL, this run's backend is {comm.backend}"
    images = torch.randn(args.images, args.channels, args.size, args.size, device=device)

    seconds: Dict[str, List[float]] = {name: [] for name in variants}
    for step in range(args.warmup + args.steps):
        for name, model in variants.items():
            comm.barrier()
            start = time.perf_counter()
            model(images).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                seconds[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    slowest = spawn.slowest_rank(comm, seconds)
    if comm.rank == 0:
        baseline = statistics.median(slowest["local BN"])
        rows = []
        for name in ("local BN", "CGBN", "SyncBatchNorm"):
            row = {"engine": comm_mod.describe(), "ranks": comm.size, "device": str(device), "variant": name,
                   "note": notes[name]}
            if name in slowest:
                median = statistics.median(slowest[name])
                row.update(ms_per_step=median * 1e3, ratio_to_local_bn=median / baseline)
            if name == "CGBN":
                row.update(max_error=max_error, exact=max_error <= EXACT_TOLERANCE)
            rows.append(row)
        print(report.write(args.out, NAME, rows, COLUMNS, inputs=_inputs(args)), flush=True)
    comm.barrier()
    return 0
