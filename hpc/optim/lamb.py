"""LAMB (You et al., "Large Batch Optimization for Deep Learning", 2019), and the layer-wise pieces
that PMD-LAMB and LARS share with it.

    optimizer = LAMB(param_groups(model, weight_decay=0.01), lr=1e-3)

Per parameter tensor x with gradient g, at step t (counting from 1):
    m_t = b1 * m_{t-1} + (1 - b1) * g
    v_t = b2 * v_{t-1} + (1 - b2) * g^2
    r_t = (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)        (bias-corrected Adam direction)
    u_t = r_t + wd * x
    x  -= lr * phi * u_t,   phi = ||x|| / ||u_t||, and phi = 1 when either norm is 0

The kernels here (LAMB, PMD-LAMB, LARS) run each multi-tensor op over one cache block of tensors at a
time (``cache_blocks``) on CPU, and over the whole list at once elsewhere; ``GroupwiseOptimizer.kernel``
names what runs, and the first step logs it once per optimizer type and device type.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Elements per cache block on CPU. A step makes ~12 passes over x, g, m, v and the workspace u; one block
# of each (float32: 4 MiB, 20 MiB in all) mostly stays in a 32 MiB L3 from one pass to the next, and a
# pass over a block is long against a torch op's dispatch. The sizes measured: docs/benchmarks.md
# (`megdet bench optim`, cache blocks).
CPU_BLOCK_NUMEL = 1 << 20


class CacheBlock(NamedTuple):
    """Consecutive tensors of parallel lists (x, g, state...) that a kernel takes through all its passes
    before moving on. ``segments[k]``: the block's part of the k-th list, either whole tensors or, when
    ``sliced``, the dim-0 slices of one tensor too large for a block (every list sliced alike)."""

    segments: List[List[Tensor]]
    sliced: bool

    def chunks(self) -> List[slice]:
        """The segments to run through all passes together: all of them, or one slice at a time."""
        count = len(self.segments[0])
        return [slice(i, i + 1) for i in range(count)] if self.sliced else [slice(0, count)]

    def tensor_squared_norms(self, segment_squared_norms: List[Tensor]) -> Tensor:
        """1-d tensor of ||t||^2 for each tensor t of the block, from its segments' (0-dim tensors)."""
        squares = torch.stack(segment_squared_norms)
        return squares.sum().reshape(1) if self.sliced else squares

    def per_segment(self, per_tensor: Tensor) -> List[Tensor]:
        """Per-tensor values (1-d) as one 0-dim tensor per segment."""
        return list(per_tensor.expand(len(self.segments[0])).unbind() if self.sliced else per_tensor.unbind())

    def scratch(self, workspace: Tensor) -> List[Tensor]:
        """The front of a flat ``workspace`` cut into contiguous pieces shaped like the segments of the first
        list (``workspace_numel`` elements are enough for every block)."""
        segments = self.segments[0]
        sizes = [segment.numel() for segment in segments]
        pieces = workspace[:sum(sizes)].split(sizes)
        return [piece.view(segment.shape) for piece, segment in zip(pieces, segments)]


def cache_blocks(tensor_lists: Sequence[List[Tensor]], block_numel: Optional[int]) -> Iterator[CacheBlock]:
    """Cut parallel tensor lists (element i of each has the shape of ``tensor_lists[0][i]``) into blocks
    of at most ``block_numel`` elements per list, in order: runs of whole tensors, and each tensor larger
    than that alone, sliced along dim 0 (a slice is one row when a row alone is larger).
    ``block_numel=None``: one block of every tensor."""
    count = len(tensor_lists[0])
    if block_numel is None:
        if count:
            yield CacheBlock([list(tensors) for tensors in tensor_lists], False)
        return
    start, numel = 0, 0
    for index, tensor in enumerate(tensor_lists[0]):
        if tensor.numel() > block_numel and tensor.dim() > 0:
            if start < index:
                yield CacheBlock([list(tensors[start:index]) for tensors in tensor_lists], False)
            rows = max(1, block_numel // (tensor.numel() // tensor.shape[0]))
            yield CacheBlock([list(tensors[index].split(rows)) for tensors in tensor_lists], True)
            start, numel = index + 1, 0
        elif numel + tensor.numel() > block_numel:
            yield CacheBlock([list(tensors[start:index]) for tensors in tensor_lists], False)
            start, numel = index, tensor.numel()
        else:
            numel += tensor.numel()
    if start < count:
        yield CacheBlock([list(tensors[start:]) for tensors in tensor_lists], False)


def workspace_numel(params: List[Tensor], block_numel: Optional[int]) -> int:
    """Elements of the flat workspace that ``cache_blocks(..., block_numel)`` of ``params`` needs: the
    largest block (a sliced tensor whole, since its u waits for its last slice)."""
    total = sum(param.numel() for param in params)
    if block_numel is None:
        return total
    return max([min(block_numel, total)] + [param.numel() for param in params if param.numel() > block_numel])


def squared_norms(tensors: List[Tensor], whole_list: bool) -> List[Tensor]:
    """||t||^2 of each tensor (0-dim tensors). whole_list: one multi-tensor op (``torch._foreach_norm``,
    one launch on an accelerator); else a dot product per tensor, which on CPU (BLAS, in cache) is faster
    than torch.norm (docs/benchmarks.md, squared norms on CPU) and at least as exact."""
    if whole_list:
        norms = torch._foreach_norm(tensors)
        return torch._foreach_mul(norms, norms)
    flats = [tensor.reshape(-1) for tensor in tensors]  # a view of a contiguous tensor, else a copy
    return [torch.dot(flat, flat) for flat in flats]


def describe_kernel(block_numel: Optional[int]) -> str:
    """What the kernels run with this ``block_numel``, in words (for logs and benchmark tables)."""
    if block_numel is None:
        return "multi-tensor kernel, whole list per op"
    return f"multi-tensor kernel, cache blocks of {block_numel:,} elements"


@functools.lru_cache(maxsize=None)
def announce_kernel(optimizer: str, device_type: str, kernel: str) -> None:
    """Log the kernel an optimizer type runs on a device type, once per process."""
    logger.info("hpc.optim: %s on %s: %s", optimizer, device_type, kernel)


def layerwise_ratios(numerator_squares: Tensor, denominator_squares: Tensor) -> Tensor:
    """Per-tensor ratios of norms sqrt(numerator_squares / denominator_squares) (1-d tensors of squared
    norms); 1 where either norm is 0, so a zero-initialised tensor (a bias) still moves and a zero update
    stays 0."""
    defined = (numerator_squares > 0) & (denominator_squares > 0)
    ratios = (numerator_squares / denominator_squares).sqrt_()
    return torch.where(defined, ratios, torch.ones_like(ratios))


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


def layerwise_step(tensor_lists: Sequence[List[Tensor]], direction: Callable[..., None], *, step_size: float,
                   workspace: Tensor, layer_adaptation: bool = True, block_numel: Optional[int] = None) -> None:
    """x -= step_size * phi * u for every tensor x of ``tensor_lists[0]``, phi = ||x|| / ||u|| (1 where
    either is 0), a cache block at a time (``cache_blocks``).

    tensor_lists: [x, g, *state], parallel lists of one device and dtype; direction(x, g, *state, u) takes
    one chunk of a block (lists of segments), updates the state in place and writes u_t into u, pieces of
    ``workspace`` (flat, ``workspace_numel`` elements at least): no temporaries are allocated.
    layer_adaptation=False: phi = 1 (an Adam step of size ``step_size``), as LAMB's reference code does
    for biases and normalisation parameters, whose norms start at or near 0 and would hardly move.
    """
    whole_list = block_numel is None
    for block in cache_blocks(tensor_lists, block_numel):
        updates = block.scratch(workspace)
        param_squares, update_squares = [], []
        for chunk in block.chunks():
            lists = [segments[chunk] for segments in block.segments]
            direction(*lists, updates[chunk])
            if not layer_adaptation:
                torch._foreach_add_(lists[0], updates[chunk], alpha=-step_size)
                continue
            # the norms while the chunk is in cache; u waits for phi, which needs the whole tensor
            param_squares += squared_norms(lists[0], whole_list)
            update_squares += squared_norms(updates[chunk], whole_list)
        if layer_adaptation:
            phi = layerwise_ratios(block.tensor_squared_norms(param_squares),
                                   block.tensor_squared_norms(update_squares))
            torch._foreach_addcmul_(block.segments[0], updates, block.per_segment(phi.mul_(-step_size)))


class GroupwiseOptimizer(torch.optim.Optimizer):
    """``step(closure)`` re-evaluates the loss if asked, then ``step_group(group)`` for each param group
    with gradients disabled: the one loop every optimizer here shares. ``run_kernel`` calls a kernel per
    device and dtype with its cache block size and a workspace kept from step to step (never saved), and
    logs ``kernel(device)`` the first time an optimizer type runs on a device type."""

    def __init__(self, params: Iterable, defaults: Dict):
        self.workspaces: Dict[Tuple[torch.device, torch.dtype], Tensor] = {}
        super().__init__(params, defaults)

    def step_group(self, group: Dict) -> None:
        raise NotImplementedError

    def block_numel(self, device: torch.device) -> Optional[int]:
        """Elements per cache block for the kernels on ``device``: ``CPU_BLOCK_NUMEL`` on CPU, None (each op
        over the whole list: one launch per op) on accelerators."""
        return CPU_BLOCK_NUMEL if device.type == "cpu" else None

    def kernel(self, device: torch.device) -> str:
        """What a step runs on ``device``, in words (the log line, and for banners and benchmark tables)."""
        return describe_kernel(self.block_numel(device))

    def announce(self, device: torch.device) -> None:
        """Log ``kernel(device)`` the first time this optimizer type steps on this device type."""
        announce_kernel(type(self).__name__, device.type, self.kernel(device))

    def workspace(self, device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
        """A flat buffer of at least ``numel`` elements, grown when needed and reused at every step."""
        buffer = self.workspaces.get((device, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self.workspaces[(device, dtype)] = torch.empty(numel, device=device, dtype=dtype)
        return buffer

    def run_kernel(self, kernel: Callable[..., None], tensor_lists: Sequence[List[Tensor]], *,
                   uses_workspace: bool = True, **hyperparameters) -> None:
        """``kernel(*lists, block_numel=..., workspace=..., **hyperparameters)`` on the tensors of each device
        and dtype of ``tensor_lists`` ([x, g, *state], parallel) in turn."""
        indices: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
        for index, param in enumerate(tensor_lists[0]):
            indices.setdefault((param.device, param.dtype), []).append(index)
        for (device, dtype), chosen in indices.items():
            self.announce(device)
            lists = [[tensors[i] for i in chosen] for tensors in tensor_lists]
            block_numel = self.block_numel(device)
            if uses_workspace:
                hyperparameters["workspace"] = self.workspace(device, dtype, workspace_numel(lists[0], block_numel))
            kernel(*lists, block_numel=block_numel, **hyperparameters)

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
                workspace: Tensor, layer_adaptation: bool = True, block_numel: Optional[int] = None) -> None:
    """One LAMB step over tensors of one device and dtype (multi-tensor ``torch._foreach_*`` ops), a cache
    block of ``block_numel`` elements at a time (``cache_blocks``; None: the whole list per op); u_t is
    computed in ``workspace`` (flat, ``workspace_numel`` elements at least)."""
    bias_correction1 = 1 - beta1 ** step
    root_bias_correction2 = math.sqrt(1 - beta2 ** step)

    def direction(x: List[Tensor], g: List[Tensor], m: List[Tensor], v: List[Tensor], u: List[Tensor]) -> None:
        # m_t, v_t
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        # u_t = m_hat / (sqrt(v_hat) + eps) + wd * x, with m_hat = m_t / (1 - b1^t), v_hat = v_t / (1 - b2^t),
        # as sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps * sqrt(1 - b2^t)): two passes fewer
        torch._foreach_copy_(u, v)
        torch._foreach_sqrt_(u)
        torch._foreach_add_(u, eps * root_bias_correction2)
        torch._foreach_reciprocal_(u)
        torch._foreach_mul_(u, m)
        torch._foreach_mul_(u, root_bias_correction2 / bias_correction1)
        torch._foreach_add_(u, x, alpha=weight_decay)

    layerwise_step([params, grads, exp_avgs, exp_avg_sqs], direction, step_size=lr, workspace=workspace,
                   layer_adaptation=layer_adaptation, block_numel=block_numel)


class LAMB(GroupwiseOptimizer):
    """LAMB with bias correction (the common form), layer-wise trust ratio phi = ||x|| / ||u||.

    params: tensors or param groups (``hpc.optim.param_groups``); lr: learning rate (> 0);
    betas: (b1, b2) in [0, 1); eps: added to sqrt(v_hat) (> 0); weight_decay: wd, decoupled into u.
    A param group with ``layer_adaptation=False`` takes phi = 1 (see ``layerwise_step``).
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
        self.run_kernel(lamb_kernel, gather_moments(self, group), step=group["step"], lr=group["lr"],
                        beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                        layer_adaptation=group["layer_adaptation"])


__all__ = ["LAMB", "GroupwiseOptimizer", "CacheBlock", "CPU_BLOCK_NUMEL", "cache_blocks", "describe_kernel",
           "lamb_kernel", "layerwise_ratios", "layerwise_step", "squared_norms", "workspace_numel", "gather_moments",
           "check_hyperparameter", "check_adam_hyperparameters"]
