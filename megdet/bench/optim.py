"""``megdet bench optim``: the time of one optimizer step over ResNet-50-sized parameters.

    megdet bench optim                       # 25.6M parameters in ResNet-50's 161 tensor shapes
    megdet bench optim --repeats 50          # more rounds: a steadier median on a busy machine

Rows: SGD with momentum (torch's foreach implementation, the baseline), PMD-LAMB with its two kernels
(the multi-tensor ``torch._foreach_*`` kernel, a cache block at a time, the default; and
``compiled=True``, one torch.compile'd kernel per large tensor, which compiles during the warm-up
rounds), PMD-LAMB written naively one parameter at a time, LAMB and LARS. Every optimizer owns a copy
of the same parameters and sees the same gradients; each round times one step of every optimizer in
turn, so machine load affects all rows alike. Ratios are median step times over SGD's, in wall-clock
time and in this process's CPU time (steadier on a machine shared with other jobs: time spent
descheduled does not count).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

from hpc.optim import LAMB, LARS, PMDLAMB
from hpc.optim.pmd_lamb import moments_decay
from megdet.bench import report

# LargeDet's PMD-LAMB target: a step at most this many times SGD's.
TARGET_RATIO = 1.5
# Bottleneck stages of ResNet-50: (width, blocks); each block expands the width by 4.
RESNET50_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))
BOTTLENECK_EXPANSION = 4
STEM_WIDTH = 64
NUM_CLASSES = 1000


def resnet50_shapes(width_divisor: int = 1) -> List[Tuple[int, ...]]:
    """The parameter shapes of torchvision's ResNet-50 (conv, BN weight and bias, fc), in module order,
    with every channel count divided by ``width_divisor`` (1: 25,557,032 parameters in 161 tensors)."""
    def width(channels: int) -> int:
        return max(1, channels // width_divisor)

    def conv_bn(out_channels: int, in_channels: int, kernel: int) -> List[Tuple[int, ...]]:
        return [(out_channels, in_channels, kernel, kernel), (out_channels,), (out_channels,)]

    shapes = conv_bn(width(STEM_WIDTH), 3, 7)
    in_channels = width(STEM_WIDTH)
    for stage_width, blocks in RESNET50_STAGES:
        inner, out = width(stage_width), width(stage_width * BOTTLENECK_EXPANSION)
        for index in range(blocks):
            shapes += conv_bn(inner, in_channels, 1) + conv_bn(inner, inner, 3) + conv_bn(out, inner, 1)
            if index == 0:
                shapes += conv_bn(out, in_channels, 1)  # the downsample shortcut
            in_channels = out
    return shapes + [(NUM_CLASSES, in_channels), (NUM_CLASSES,)]


class NaivePMDLAMB:
    """PMD-LAMB one parameter at a time (the loop a first implementation writes), same math as
    ``hpc.optim.PMDLAMB``: the baseline its multi-tensor kernel is measured against."""

    def __init__(self, params: List[Tensor], lr: float, alpha: float = 0.012, T: int = 200,
                 betas: Tuple[float, float] = (0.9, 0.999), weight_decay: float = 5e-4, eps: float = 1e-6):
        self.params, self.lr, self.alpha, self.cycle = params, lr, alpha, T
        self.beta1, self.beta2 = betas
        self.weight_decay, self.eps = weight_decay, eps
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        xi = moments_decay(self.t, self.cycle)
        for p, (m, v) in zip(self.params, self.moments):
            g = p.grad
            m.mul_(xi * self.beta1).add_(g, alpha=1 - self.beta1)
            v.mul_(xi * self.beta2).addcmul_(g, g, value=1 - self.beta2)
            u = m / (v + self.eps).sqrt()
            u.add_(p, alpha=self.weight_decay)
            p_norm, u_norm = p.norm(), u.norm()
            phi = torch.where((p_norm > 0) & (u_norm > 0), p_norm / u_norm, torch.ones_like(p_norm))
            p.sub_(u * (self.lr * self.alpha * phi))


# name: (build from parameters, what it is: for hpc.optim, followed by the kernel it names)
OPTIMIZERS: Dict[str, Tuple[Callable[[List[Tensor]], object], str]] = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.32, momentum=0.9, weight_decay=1e-4, foreach=True),
            "torch.optim.SGD, momentum 0.9, foreach"),
    "pmd_lamb": (lambda ps: PMDLAMB(ps, lr=0.32), "hpc.optim.PMDLAMB"),
    "pmd_lamb_compiled": (lambda ps: PMDLAMB(ps, lr=0.32, compiled=True), "hpc.optim.PMDLAMB(compiled=True)"),
    "pmd_lamb_naive": (lambda ps: NaivePMDLAMB(ps, lr=0.32), "PMD-LAMB, one parameter at a time"),
    "lamb": (lambda ps: LAMB(ps, lr=1e-3), "hpc.optim.LAMB"),
    "lars": (lambda ps: LARS(ps, lr=0.32), "hpc.optim.LARS"),
}
# The rows the PMD-LAMB target is checked on.
PMD_LAMB_ROWS = ("pmd_lamb", "pmd_lamb_compiled")


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed rounds first; the first step allocates the state (default: %(default)s)")
    parser.add_argument("--width-divisor", type=int, default=1,
                        help="divide every channel count by this: 1 is ResNet-50 (default: %(default)s)")


def run(args) -> int:
    from hpc.errors import UserError

    for name in ("repeats", "width_divisor"):
        if getattr(args, name) < 1:
            raise UserError(f"Invalid --{name.replace('_', '-')}: {getattr(args, name)}; use an integer >= 1")
    if args.warmup < 0:
        raise UserError(f"Invalid --warmup: {args.warmup}; use an integer >= 0")
    shapes = resnet50_shapes(args.width_divisor)
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(shape, generator=generator) * 0.05 for shape in shapes]
    grads = [torch.randn(shape, generator=generator) * 1e-3 for shape in shapes]
    optimizers = {}
    for name, (build, _) in OPTIMIZERS.items():
        params = [torch.nn.Parameter(value.clone()) for value in initial]
        for p, g in zip(params, grads):
            p.grad = g
        optimizers[name] = build(params)

    wall: Dict[str, List[float]] = {name: [] for name in optimizers}
    cpu: Dict[str, List[float]] = {name: [] for name in optimizers}
    for round_index in range(args.warmup + args.repeats):
        for name, optimizer in optimizers.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            optimizer.step()
            if round_index >= args.warmup:
                wall[name].append(time.perf_counter() - start_wall)
                cpu[name].append(time.process_time() - start_cpu)

    def median_ms(samples: List[float]) -> float:
        return 1e3 * statistics.median(samples)

    def implementation(name: str) -> str:
        optimizer = optimizers[name]
        kernel = optimizer.kernel(torch.device("cpu")) if hasattr(optimizer, "kernel") else None
        return f"{OPTIMIZERS[name][1]}: {kernel}" if kernel else OPTIMIZERS[name][1]

    rows = [{"optimizer": name, "implementation": implementation(name), "median_ms": median_ms(wall[name]),
             "min_ms": 1e3 * min(wall[name]), "ratio_to_sgd": median_ms(wall[name]) / median_ms(wall["sgd"]),
             "cpu_ms": median_ms(cpu[name]), "cpu_ratio_to_sgd": median_ms(cpu[name]) / median_ms(cpu["sgd"])}
            for name in optimizers]
    inputs = {"tensors": len(shapes), "parameters": sum(v.numel() for v in initial), "repeats": args.repeats,
              "warmup": args.warmup, "width_divisor": args.width_divisor}
    table = report.write(args.out, "optim", rows, ["optimizer", "implementation", "median_ms", "min_ms",
                                                   "ratio_to_sgd", "cpu_ms", "cpu_ratio_to_sgd"], inputs)
    print(f"one optimizer step over {inputs['parameters']:,} parameters in {inputs['tensors']} tensors "
          f"({torch.get_num_threads()} threads), median of {args.repeats} rounds:")
    print(table)
    verdicts = [f"{row['optimizer']} {'met' if row['ratio_to_sgd'] <= TARGET_RATIO else 'NOT met'} "
                f"({row['ratio_to_sgd']:.2f}x wall, {row['cpu_ratio_to_sgd']:.2f}x CPU time)"
                for row in rows if row["optimizer"] in PMD_LAMB_ROWS]
    print(f"target PMD-LAMB <= {TARGET_RATIO}x SGD: {'; '.join(verdicts)}; results in {args.out}")
    return 0
