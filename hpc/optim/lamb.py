"""LAMB (You et al., "Large Batch Optimization for Deep Learning", 2019), and the layer-wise pieces
that PMD-LAMB and LARS share with it.

    optimizer = LAMB(param_groups(model, weight_decay=0.01), lr=1e-3)

Per parameter tensor x with gradient g, at step t (counting from 1):
    m_t = b1 * m_{t-1} + (1 - b1) * g
    v_t = b2 * v_{t-1} + (1 - b2) * g^2
    r_t = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)        (bias-corrected Adam direction)
    u_t = r_t + wd * x
    x  -= lr * phi * u_t,   phi = ||x|| / ||u_t||, and phi = 1 when either norm is 0
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor


def layerwise_ratios(numerators: List[Tensor], denominators: List[Tensor]) -> Tensor:
    """Per-tensor ratios numerators[i] / denominators[i] (0-dim norms), as one 1-d tensor; 1 where
    either norm is 0, so a zero-initialised tensor (a bias) still moves and a zero update stays 0."""
    numerator, denominator = torch.stack(numerators), torch.stack(denominators)
    defined = (numerator > 0) & (denominator > 0)
    return torch.where(defined, numerator / denominator, torch.ones_like(numerator))


def check_hyperparameter(name: str, value, valid: bool, rule: str) -> None:
    """Raise ``ValueError("Invalid <name>: <value> (<rule>)")`` unless ``valid``."""
    if not valid:
        raise ValueError(f"Invalid {name}: {value} ({rule})")


def check_adam_hyperparameters(group: Dict) -> None:
    """The checks LAMB and PMD-LAMB share: lr > 0, 0 <= betas < 1, eps > 0, weight_decay >= 0."""
    check_hyperparameter("learning rate", group["lr"], group["lr"] > 0, "must be > 0")
    betas = group["betas"]
    check_hyperparameter("betas", betas, len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas),
                         "need two values in [0, 1)")
    check_hyperparameter("eps", group["eps"], group["eps"] > 0, "must be > 0: sqrt(v + eps) divides")
    check_hyperparameter("weight_decay", group["weight_decay"], group["weight_decay"] >= 0, "must be >= 0")


def gather_moments(optimizer: torch.optim.Optimizer, group: Dict) -> Tuple[List[Tensor], ...]:
    """(params, grads, m, v) of the group's parameters that have a gradient; m and v start at 0."""
    params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
        state = optimizer.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        params.append(p)
        grads.append(p.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
    return params, grads, exp_avgs, exp_avg_sqs


def apply_layerwise_update(params: List[Tensor], updates: List[Tensor], step_size: float,
                           layer_adaptation: bool = True) -> None:
    """x -= step_size * phi * u for every tensor, phi = ||x|| / ||u|| (1 where either is 0).

    layer_adaptation=False: phi = 1 (an Adam step of size ``step_size``), as LAMB's reference code does
    for biases and normalisation parameters, whose norms start at or near 0 and would hardly move.
    """
    if not layer_adaptation:
        torch._foreach_add_(params, updates, alpha=-step_size)
        return
    phi = layerwise_ratios(torch._foreach_norm(params), torch._foreach_norm(updates))
    torch._foreach_addcmul_(params, updates, phi.mul_(-step_size).unbind())


class GroupwiseOptimizer(torch.optim.Optimizer):
    """``step(closure)`` re-evaluates the loss if asked, then ``step_group(group)`` for each param group
    with gradients disabled: the one loop every optimizer here shares."""

    def step_group(self, group: Dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.step_group(group)
        return loss


def lamb_kernel(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                *, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                layer_adaptation: bool = True) -> None:
    """One LAMB step over all tensors at once (multi-tensor ``torch._foreach_*`` ops)."""
    if not params:
        return
    # m_t, v_t
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    # r_t = m_hat / (sqrt(v_hat) + eps), with m_hat = m_t / (1 - b1^t), v_hat = v_t / (1 - b2^t)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denominators = torch._foreach_div(exp_avg_sqs, bias_correction2)
    torch._foreach_sqrt_(denominators)
    torch._foreach_add_(denominators, eps)
    torch._foreach_mul_(denominators, bias_correction1)
    updates = torch._foreach_div(exp_avgs, denominators)
    # u_t = r_t + wd * x
    if weight_decay != 0:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    apply_layerwise_update(params, updates, lr, layer_adaptation)


class LAMB(GroupwiseOptimizer):
    """LAMB with bias correction (the common form), layer-wise trust ratio phi = ||x|| / ||u||.

    params: tensors or param groups (``hpc.optim.param_groups``); lr: learning rate (> 0);
    betas: (b1, b2) in [0, 1); eps: added to sqrt(v_hat) (> 0); weight_decay: wd, decoupled into u.
    A param group with ``layer_adaptation=False`` takes phi = 1 (see ``apply_layerwise_update``).
    The step counter t is kept per param group (``group["step"]``) and saved in ``state_dict``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, step=0,
                                      layer_adaptation=True))

    def add_param_group(self, param_group: Dict) -> None:
        super().add_param_group(param_group)
        check_adam_hyperparameters(self.param_groups[-1])

    def step_group(self, group: Dict) -> None:
        group["step"] += 1
        beta1, beta2 = group["betas"]
        lamb_kernel(*gather_moments(self, group), step=group["step"], lr=group["lr"], beta1=beta1,
                    beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    layer_adaptation=group["layer_adaptation"])


__all__ = ["LAMB", "GroupwiseOptimizer", "lamb_kernel", "layerwise_ratios", "apply_layerwise_update", "gather_moments",
           "check_hyperparameter", "check_adam_hyperparameters"]
