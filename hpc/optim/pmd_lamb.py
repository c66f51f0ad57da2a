"""PMD-LAMB: Periodical Moments Decay LAMB (LargeDet, Algorithm 1).

    optimizer = PMDLAMB(param_groups(model, weight_decay=5e-4), lr=linear_scaling_rule(batch_size=512))

Per parameter tensor x with gradient g, at step t (counting from 1), cycle length T:
    xi  = cos(pi/2 * (t % T) / T)                      moments decay from 1 to ~0 in every cycle
    m_t = xi * b1 * m_{t-1} + (1 - b1) * g
    v_t = xi * b2 * v_{t-1} + (1 - b2) * g^2
    r_t = m_t / sqrt(v_t + eps)                        no bias correction (the paper has none)
    u_t = r_t + wd * x
    x  -= lr * alpha * phi * u_t,   phi = ||x|| / ||u_t||, and phi = 1 when either norm is 0

``T=None`` or ``T=math.inf`` is an infinite cycle (xi = 1 always): plain LAMB *without* bias correction,
the paper's "T = inf" column of Table 3. ``hpc.optim.LAMB`` is the bias-corrected form.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import shutil
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from hpc.errors import UserError
from hpc.optim.lamb import (GroupwiseOptimizer, check_adam_hyperparameters, check_hyperparameter, gather_moments,
                            layerwise_step)

# LargeDet Table 3: alpha = 0.012 and T = 200 are the best of the ablation (batch 256).
DEFAULT_ALPHA = 0.012
DEFAULT_CYCLE = 200
# MegDet's linear scaling rule at batch 16 (0.02 per 16 images); the optimizer is normally built with
# the learning rate of ``hpc.schedule.linear_scaling_rule`` for the real batch.
DEFAULT_LR = 0.02
# With ``compiled=True``, CPU tensors of at least this many elements take the compiled kernel: below it,
# what a call of compiled code costs on CPU is more than the fused passes save (docs/benchmarks.md,
# `megdet bench optim`, cache blocks).
COMPILED_MIN_NUMEL = 1 << 16


def moments_decay(step: int, cycle: Optional[Union[int, float]]) -> float:
    """xi = cos(pi/2 * (t % T) / T); 1 for T = None or T = math.inf (no decay)."""
    if cycle is None or cycle == math.inf:
        return 1.0
    return math.cos(math.pi / 2 * (step % cycle) / cycle)


def pmd_lamb_kernel(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                    *, xi: float, lr: float, alpha: float, beta1: float, beta2: float, eps: float,
                    weight_decay: float, workspace: Tensor, layer_adaptation: bool = True,
                    block_numel: Optional[int] = None) -> None:
    """One PMD-LAMB step over tensors of one device and dtype (multi-tensor ``torch._foreach_*`` ops), a
    cache block of ``block_numel`` elements at a time (``hpc.optim.lamb.cache_blocks``; None: the whole
    list per op); u_t is computed in ``workspace`` (flat, ``hpc.optim.lamb.workspace_numel`` elements)."""

    def direction(x: List[Tensor], g: List[Tensor], m: List[Tensor], v: List[Tensor], u: List[Tensor]) -> None:
        # m_t = xi * b1 * m_{t-1} + (1 - b1) * g
        torch._foreach_mul_(m, xi * beta1)
        torch._foreach_add_(m, g, alpha=1 - beta1)
        # v_t = xi * b2 * v_{t-1} + (1 - b2) * g^2
        torch._foreach_mul_(v, xi * beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        # r_t = m_t / sqrt(v_t + eps), as m_t * rsqrt(v_t + eps): on CPU rsqrt and a product cost half of
        # what sqrt and a quotient do
        torch._foreach_copy_(u, v)
        torch._foreach_add_(u, eps)
        torch._foreach_rsqrt_(u)
        torch._foreach_mul_(u, m)
        # u_t = r_t + wd * x
        torch._foreach_add_(u, x, alpha=weight_decay)

    # x_{t+1} = x_t - lr * alpha * phi * u_t
    layerwise_step([params, grads, exp_avgs, exp_avg_sqs], direction, step_size=lr * alpha, workspace=workspace,
                   layer_adaptation=layer_adaptation, block_numel=block_numel)


def pmd_lamb_tensor_step(x: Tensor, g: Tensor, m: Tensor, v: Tensor, xi_beta1: Tensor, one_minus_beta1: Tensor,
                         xi_beta2: Tensor, one_minus_beta2: Tensor, eps: Tensor, weight_decay: Tensor,
                         step_size: Tensor, layer_adaptation: bool) -> None:
    """Lines 6-9 of Algorithm 1 for one flat tensor, in place, written for ``torch.compile``: the kernel
    Inductor generates reads x, g, m, v once to write m, v and reduce ||x||^2, ||u||^2, then updates x in
    a second loop (the multi-tensor kernel makes ~12 passes). The hyper-parameters are 0-dim tensors of
    x's dtype, so new values (xi and eta change every step) reuse the compiled code."""
    # m_t, v_t
    m_t = xi_beta1 * m + one_minus_beta1 * g
    v_t = xi_beta2 * v + one_minus_beta2 * g * g
    # u_t = m_t / sqrt(v_t + eps) + wd * x
    u = m_t * torch.rsqrt(v_t + eps) + weight_decay * x
    m.copy_(m_t)
    v.copy_(v_t)
    if not layer_adaptation:
        x.sub_(step_size * u)
        return
    # phi = ||x|| / ||u||, 1 where either norm is 0
    x_squared, u_squared = (x * x).sum(), (u * u).sum()
    phi = torch.where((x_squared > 0) & (u_squared > 0), torch.sqrt(x_squared / u_squared), 1.0)
    x.sub_(step_size * phi * u)


def check_compiled_kernel(device: torch.device, key: str = "compiled=True", fix: str = "compiled=False") -> None:
    """Raise a one-line UserError when the compiled kernel cannot run on ``device``: it is written for
    CPU tensors, and Inductor builds it with the C++ compiler ``$CXX`` (else g++, clang++ or c++).
    ``key``, ``fix``: how the caller's user chose the kernel, and how to choose the multi-tensor one."""
    if device.type != "cpu":
        raise UserError(f"{key} runs on CPU only and this rank trains on {device}: set {fix} (the multi-tensor "
                        f"kernel, one launch per op over all tensors on {device.type})")
    compilers = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    if not any(shutil.which(compiler) for compiler in compilers):
        raise UserError(f"{key} needs a C++ compiler for torch.compile, and {' / '.join(compilers)} is not on "
                        f"PATH: install one (apt-get install g++), or set {fix}")


@functools.lru_cache(maxsize=None)
def compiled_tensor_step() -> Callable[..., None]:
    """``pmd_lamb_tensor_step`` through ``torch.compile`` (Inductor, which builds C++ with the system
    compiler on CPU), made once per process. Sizes are symbolic, so all tensors of a dtype share one
    compilation; it happens at the first call, shorter when Inductor's on-disk cache has it (its time:
    docs/benchmarks.md, the compiled kernel's first call)."""
    return torch.compile(pmd_lamb_tensor_step, dynamic=True, fullgraph=True)


def pmd_lamb_compiled_kernel(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                             exp_avg_sqs: List[Tensor], *, xi: float, lr: float, alpha: float, beta1: float,
                             beta2: float, eps: float, weight_decay: float, layer_adaptation: bool = True) -> None:
    """One PMD-LAMB step, tensor by tensor, through the compiled ``pmd_lamb_tensor_step`` (contiguous CPU
    tensors: each is taken as a flat view)."""
    tensor_step = compiled_tensor_step()
    scalars: Dict[torch.dtype, Tuple[Tensor, ...]] = {}
    for x, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if x.dtype not in scalars:
            values = [xi * beta1, 1 - beta1, xi * beta2, 1 - beta2, eps, weight_decay, lr * alpha]
            scalars[x.dtype] = torch.tensor(values, dtype=x.dtype).unbind()
        tensor_step(x.detach().view(-1), g.view(-1), m.view(-1), v.view(-1), *scalars[x.dtype], layer_adaptation)


class PMDLAMB(GroupwiseOptimizer):
    """PMD-LAMB (LargeDet Algorithm 1); ``T=None`` or ``T=math.inf`` is LAMB without bias correction.

    params: tensors or param groups (``hpc.optim.param_groups``); lr: eta (> 0), the global learning
    rate from the schedule; alpha: the scale factor on the layer-wise ratio (> 0); T: cycle length in
    steps (int >= 1), or None or ``math.inf`` for no decay; betas: (b1, b2) in [0, 1); eps: inside the
    square root (> 0); weight_decay: lambda (>= 0). A param group with ``layer_adaptation=False`` takes
    phi = 1 (``hpc.optim.lamb.layerwise_step``); Algorithm 1 adapts every tensor (the default).

    The step counter t lives in each param group (``group["step"]``, saved by ``state_dict``), so a
    resumed run continues at the same position in the cycle.

    compiled: which kernel runs, chosen here and logged at the first step (``kernel(device)`` says it in
    words). False: the multi-tensor kernel (``pmd_lamb_kernel``), on any device. True, for CPU tensors
    only: each contiguous tensor of >= ``COMPILED_MIN_NUMEL`` elements through ``torch.compile``
    (``pmd_lamb_tensor_step``, compiled at the first step; needs a C++ compiler), the others through the
    multi-tensor kernel. Both compute the same step (tests/test_optim.py). The choice is kept in the
    param groups (so it survives Horovod's re-wrapping of the optimizer), and all groups must agree.
    """

    def __init__(self, params: Iterable, lr: float = DEFAULT_LR, alpha: float = DEFAULT_ALPHA,
                 T: Optional[Union[int, float]] = DEFAULT_CYCLE, betas: Tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 5e-4, eps: float = 1e-6, compiled: bool = False):
        super().__init__(params, dict(lr=lr, alpha=alpha, T=T, betas=tuple(betas), weight_decay=weight_decay,
                                      eps=eps, step=0, layer_adaptation=True, compiled=compiled))

    def add_param_group(self, param_group: Dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_adam_hyperparameters(group)
        check_hyperparameter("alpha", group["alpha"], group["alpha"] > 0, "must be > 0")
        cycle = group["T"]
        whole_cycle = isinstance(cycle, numbers.Integral) and not isinstance(cycle, bool) and cycle >= 1
        check_hyperparameter("T", cycle, cycle is None or cycle == math.inf or whole_cycle,
                             "the cycle length must be an integer >= 1, or None or inf for no moments decay")
        compiled = group["compiled"]
        check_hyperparameter("compiled", compiled, isinstance(compiled, bool), "must be True or False")
        check_hyperparameter("compiled", compiled, compiled == self.param_groups[0]["compiled"],
                             "one kernel for the whole optimizer: give every param group the same value")

    def load_state_dict(self, state_dict: Dict) -> None:
        """The checkpoint's state and hyper-parameters, but this optimizer's kernel: ``compiled`` is how
        this run chose to compute (a CPU checkpoint may resume on a GPU), not part of the trajectory."""
        compiled = self.compiled
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["compiled"] = compiled

    @property
    def compiled(self) -> bool:
        """True when the compiled kernel runs (``compiled=True`` at construction)."""
        return self.param_groups[0]["compiled"]

    def kernel(self, device: torch.device) -> str:
        multi_tensor = super().kernel(device)
        if not self.compiled:
            return multi_tensor
        return (f"torch.compile'd kernel for contiguous tensors of >= {COMPILED_MIN_NUMEL:,} elements, "
                f"{multi_tensor} for the others")

    def step_group(self, group: Dict) -> None:
        group["step"] += 1
        beta1, beta2 = group["betas"]
        hyperparameters = dict(xi=moments_decay(group["step"], group["T"]), lr=group["lr"], alpha=group["alpha"],
                               beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                               layer_adaptation=group["layer_adaptation"])
        tensor_lists = gather_moments(self, group)
        if group["compiled"]:
            tensor_lists = self.step_compiled(tensor_lists, hyperparameters)
        self.run_kernel(pmd_lamb_kernel, tensor_lists, **hyperparameters)

    def step_compiled(self, tensor_lists: Tuple[List[Tensor], ...], hyperparameters: Dict) -> List[List[Tensor]]:
        """Step the tensors the compiled kernel takes; return (params, grads, m, v) of the others."""
        compiled, others = [], []
        for tensors in zip(*tensor_lists):
            device = tensors[0].device
            if device.type != "cpu":
                raise ValueError(f"Invalid compiled: True for {device.type} tensors (the compiled kernel is written "
                                 f"for CPU); use compiled=False: on {device.type} the multi-tensor kernel makes one "
                                 f"launch per op")
            self.announce(device)
            fused = tensors[0].numel() >= COMPILED_MIN_NUMEL and all(t.is_contiguous() for t in tensors)
            (compiled if fused else others).append(tensors)
        if compiled:
            pmd_lamb_compiled_kernel(*[list(tensors) for tensors in zip(*compiled)], **hyperparameters)
        return [list(tensors) for tensors in zip(*others)] if others else [[] for _ in tensor_lists]
