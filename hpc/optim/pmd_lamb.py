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

import math
import numbers
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from hpc.optim.lamb import (GroupwiseOptimizer, check_adam_hyperparameters, check_hyperparameter, gather_moments,
                            layerwise_step)

# LargeDet Table 3: alpha = 0.012 and T = 200 are the best of the ablation (batch 256).
DEFAULT_ALPHA = 0.012
DEFAULT_CYCLE = 200
# MegDet's linear scaling rule at batch 16 (0.02 per 16 images); the optimizer is normally built with
# the learning rate of ``hpc.schedule.linear_scaling_rule`` for the real batch.
DEFAULT_LR = 0.02


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


class PMDLAMB(GroupwiseOptimizer):
    """PMD-LAMB (LargeDet Algorithm 1); ``T=None`` or ``T=math.inf`` is LAMB without bias correction.

    params: tensors or param groups (``hpc.optim.param_groups``); lr: eta (> 0), the global learning
    rate from the schedule; alpha: the scale factor on the layer-wise ratio (> 0); T: cycle length in
    steps (int >= 1), or None or ``math.inf`` for no decay; betas: (b1, b2) in [0, 1); eps: inside the
    square root (> 0); weight_decay: lambda (>= 0). A param group with ``layer_adaptation=False`` takes
    phi = 1 (``hpc.optim.lamb.layerwise_step``); Algorithm 1 adapts every tensor (the default).

    The step counter t lives in each param group (``group["step"]``, saved by ``state_dict``), so a
    resumed run continues at the same position in the cycle.
    """

    def __init__(self, params: Iterable, lr: float = DEFAULT_LR, alpha: float = DEFAULT_ALPHA,
                 T: Optional[Union[int, float]] = DEFAULT_CYCLE, betas: Tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 5e-4, eps: float = 1e-6):
        super().__init__(params, dict(lr=lr, alpha=alpha, T=T, betas=tuple(betas), weight_decay=weight_decay,
                                      eps=eps, step=0, layer_adaptation=True))

    def add_param_group(self, param_group: Dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_adam_hyperparameters(group)
        check_hyperparameter("alpha", group["alpha"], group["alpha"] > 0, "must be > 0")
        cycle = group["T"]
        whole_cycle = isinstance(cycle, numbers.Integral) and not isinstance(cycle, bool) and cycle >= 1
        check_hyperparameter("T", cycle, cycle is None or cycle == math.inf or whole_cycle,
                             "the cycle length must be an integer >= 1, or None or inf for no moments decay")

    def step_group(self, group: Dict) -> None:
        group["step"] += 1
        beta1, beta2 = group["betas"]
        self.run_kernel(pmd_lamb_kernel, gather_moments(self, group), xi=moments_decay(group["step"], group["T"]),
                        lr=group["lr"], alpha=group["alpha"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], layer_adaptation=group["layer_adaptation"])
