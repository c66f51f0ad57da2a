"""LARS: layer-wise adaptive rate scaling (You et al., "Large Batch Training of Convolutional Networks",
2017) with heavy-ball momentum.

    optimizer = LARS(param_groups(model, weight_decay=1e-4), lr=linear_scaling_rule(batch_size=256))

Per parameter tensor x with gradient g:
    trust = eta * ||x|| / (||g|| + wd * ||x||), and trust = 1 when ||x|| or ||g|| is 0
    b    = mu * b + trust * (g + wd * x)
    x   -= lr * b
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor

from hpc.optim.lamb import GroupwiseOptimizer, cache_blocks, check_hyperparameter, squared_norms

# You et al. 2017 use a trust coefficient eta = 0.001.
DEFAULT_TRUST_COEFFICIENT = 1e-3


def lars_kernel(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *, lr: float,
                momentum: float, trust_coefficient: float, weight_decay: float,
                block_numel: Optional[int] = None) -> None:
    """One LARS step over tensors of one device and dtype (multi-tensor ``torch._foreach_*`` ops), a cache
    block of ``block_numel`` elements at a time (``hpc.optim.lamb.cache_blocks``; None: the whole list per op)."""
    whole_list = block_numel is None
    for block in cache_blocks([params, grads, momentum_buffers], block_numel):
        block_params, block_grads, block_buffers = block.segments
        param_norms = block.tensor_squared_norms(squared_norms(block_params, whole_list)).sqrt_()
        grad_norms = block.tensor_squared_norms(squared_norms(block_grads, whole_list)).sqrt_()
        # trust = eta * ||x|| / (||g|| + wd * ||x||)
        defined = (param_norms > 0) & (grad_norms > 0)
        trust = torch.where(defined, trust_coefficient * param_norms / (grad_norms + weight_decay * param_norms),
                            torch.ones_like(param_norms))
        grad_scales, param_scales = block.per_segment(trust), block.per_segment(trust * weight_decay)
        for chunk in block.chunks():
            x, b = block_params[chunk], block_buffers[chunk]
            # b = mu * b + trust * g + trust * wd * x;  x -= lr * b
            torch._foreach_mul_(b, momentum)
            torch._foreach_addcmul_(b, block_grads[chunk], grad_scales[chunk])
            torch._foreach_addcmul_(b, x, param_scales[chunk])
            torch._foreach_add_(x, b, alpha=-lr)


class LARS(GroupwiseOptimizer):
    """LARS with momentum.

    params: tensors or param groups (``hpc.optim.param_groups``); lr: global learning rate (> 0);
    momentum: mu in [0, 1); trust_coefficient: eta (> 0); weight_decay: wd (>= 0).
    """

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.9,
                 trust_coefficient: float = DEFAULT_TRUST_COEFFICIENT, weight_decay: float = 1e-4):
        super().__init__(params, dict(lr=lr, momentum=momentum, trust_coefficient=trust_coefficient,
                                      weight_decay=weight_decay))

    def add_param_group(self, param_group: Dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_hyperparameter("learning rate", group["lr"], group["lr"] > 0, "must be > 0")
        check_hyperparameter("momentum", group["momentum"], 0 <= group["momentum"] < 1, "must be in [0, 1)")
        check_hyperparameter("trust_coefficient", group["trust_coefficient"], group["trust_coefficient"] > 0,
                             "must be > 0")
        check_hyperparameter("weight_decay", group["weight_decay"], group["weight_decay"] >= 0, "must be >= 0")

    def step_group(self, group: Dict) -> None:
        params, grads, buffers = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LARS does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            buffers.append(state["momentum_buffer"])
        self.run_kernel(lars_kernel, [params, grads, buffers], uses_workspace=False, lr=group["lr"],
                        momentum=group["momentum"], trust_coefficient=group["trust_coefficient"],
                        weight_decay=group["weight_decay"])
