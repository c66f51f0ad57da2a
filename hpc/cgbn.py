"""Cross-GPU batch normalization (MegDet), frozen batch norm, and converting a model between them.

    comm = hpc.comm.init()
    model = convert_model(model, mode="cgbn", group_size=16)   # BN size 32 at 2 images per rank; collective
    model = convert_model(model, mode="frozen")                         # fixed affine, the detection baseline

Shapes: N images on this rank, C channels, H x W feature map. A BN group is ``group_size`` consecutive
ranks whose images share batch statistics (MegDet's "BN size" = group_size * images per rank).

Statistics (training, group of G ranks): mean and biased variance per channel over every pixel of
every image of the group, i.e. exactly what ``nn.BatchNorm2d`` computes on the group's batches
concatenated along N. They equal the global statistics when the group is the whole world. The
running mean and the running (unbiased) variance are updated from the group statistics and so are
identical on every rank of a group. Gradients: the input gradient is the exact gradient of the
group computation; weight and bias gradients are this rank's share (sum over the group = gradient
of the concatenated batch), so the usual data-parallel gradient reduction completes them.

Communication per layer and training step: one allreduce in the forward pass (per-channel count,
sum and sum of squares, float64) and one in the backward pass (sum dy, sum dy * xhat, float32).
Eval mode and groups of one rank communicate nothing. See docs/cgbn.md.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from hpc import comm as comm_mod
from hpc.errors import UserError

CONVERT_MODES = ("cgbn", "frozen", "bn")
MIN_VALUES_PER_CHANNEL = 2  # an unbiased variance needs two values, as in nn.BatchNorm2d
DEFAULT_MOMENTUM = 0.1  # nn.BatchNorm2d's


def bn_group(comm: comm_mod.Communicator, group_size: Optional[int]) -> comm_mod.Group:
    """This rank's BN group of ``group_size`` consecutive ranks (None: the world); ``comm.partition``
    refuses a size that does not divide the world. Collective: every rank calls it in the same order.
    (Which groups a recipe allows, e.g. MegDet's "inside one machine", is the recipe's rule:
    ``megdet.specs.BNGroups``.)"""
    return comm.partition(group_size)


def _input_error(x: torch.Tensor, num_features: int, layer: str) -> Optional[str]:
    if x.dim() != 4 or x.shape[1] != num_features:
        return (f"Invalid input to {layer}: expected Tensor[N, {num_features}, H, W], got shape "
                f"{tuple(x.shape)}; batch norm 2d needs 4-D input with {num_features} channels")
    if not x.is_floating_point():
        return f"Invalid input to {layer}: dtype {x.dtype}; batch norm needs a floating point tensor"
    return None


def _channel_view(v: torch.Tensor) -> torch.Tensor:
    """Tensor[C] -> Tensor[1, C, 1, 1], to broadcast over Tensor[N, C, H, W]."""
    return v.view(1, -1, 1, 1)


def _centred(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x - shift per channel as a new Tensor[N, C, H, W] in the shift's dtype (the compute dtype) and
    x's memory format. bf16/fp16 x is converted as it is read (type promotion), not copied first."""
    return x - _channel_view(shift)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the statistics and the normalisation are computed in: float32 for bf16/fp16
    activations (autocast) and float32 modules, float64 for a float64 module or input."""
    return torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)


def _check_group(flags: torch.Tensor, count: torch.Tensor, local_count: int, error: Optional[str],
                 group: comm_mod.Group, name: str, read_packet: bool) -> None:
    """Raise the same UserError on every member when a member flagged an invalid input or the group has
    fewer than MIN_VALUES_PER_CHANNEL values per channel; called after the forward allreduce.

    read_packet: the collective already made the host wait for the packet (Horovod, gloo, the CPU), so
    reading it costs nothing. Otherwise (NCCL) reading it would stall the host's queue of GPU work
    at every layer: then a member raises for its own input only (its peers fail after the
    communicator's timeout), and the count is read only when this rank's own values cannot show
    that the group has enough.
    """
    if error is not None:
        raise UserError(error)
    if read_packet:
        failed = [group.ranks[i] for i in flags.nonzero().flatten().tolist()]
        if failed:
            raise UserError(f"Invalid input to {name} on rank(s) {failed} of BN group {list(group.ranks)}: "
                            "see their error")
    if local_count >= MIN_VALUES_PER_CHANNEL:
        return
    total = int(count.item())
    if total < MIN_VALUES_PER_CHANNEL:
        raise UserError(f"Invalid batch for {name}: BN group {list(group.ranks)} has {total} value(s) per "
                        f"channel in training; batch norm needs at least {MIN_VALUES_PER_CHANNEL}: "
                        "give the group more images or pixels, or use eval mode")


class _GroupBatchNorm(torch.autograd.Function):
    """Batch norm with statistics over a BN group: one allreduce forward, one backward, and no host
    synchronisation in the steady state (the group's count stays on the device).

    Forward packet (float64): [failed flag per member (G), count, sum x (C), sum x^2 (C)]. Each rank
    centres its values on a shift s (its first pixel per channel, so the centred values are of the
    order of the standard deviation), takes their mean and then their variance around it in the
    compute dtype (float32, or float64 for a float64 module), and only then expands them to raw
    moments in float64; see docs/cgbn.md for the error bound. Both passes form x - mean from the
    centred values and the small difference of two means, so the output and the gradient stay exact
    when |mean| >> std.
    Backward packet (compute dtype): [sum dy (C), sum dy * xhat (C)].

    Only plain elementwise operations and reductions, whose CPU and CUDA kernels compute the same
    thing (no batch-norm kernels: their CPU and CUDA contracts differ). bf16/fp16 activations are read
    by type promotion, never copied to float32 first: each pass makes one full-size buffer in the
    compute dtype, x - s, and works in place on it (it becomes the output, or the input gradient),
    plus a transient product for a reduction (the squares, dy * (x - mean)).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, comm, group, name, error):
        channels, members = weight.numel(), group.size
        compute = _compute_dtype(x, weight)
        packet = torch.zeros(members + 1 + 2 * channels, dtype=torch.float64, device=x.device)
        flags, count, sums, squares = packet.split([members, 1, channels, channels])
        local_count = 0 if error is not None else x.numel() // channels
        shift = torch.zeros(channels, dtype=compute, device=x.device)
        if error is not None:
            flags[group.rank] = 1
        elif local_count:
            shift = x[0, :, 0, 0].to(compute)
            centred = _centred(x, shift)
            centred_mean = centred.mean(dim=(0, 2, 3))
            centred.sub_(_channel_view(centred_mean))  # x - local mean, up to the rounding of centred_mean
            local_var = (centred * centred).mean(dim=(0, 2, 3))
            local_mean = shift.double() + centred_mean.double()
            count.fill_(local_count)
            sums.copy_(local_mean * local_count)
            squares.copy_((local_var.double() + local_mean * local_mean) * local_count)
        comm.allreduce_async(packet, op="sum", group=group, name=f"{name}.forward").wait()
        _check_group(flags, count, local_count, error, group, name, read_packet=comm.host_waits(packet))

        mean64 = sums / count
        var64 = (squares / count - mean64 * mean64).clamp_min(0)
        running_mean.mul_(1 - momentum).add_(mean64.to(running_mean.dtype), alpha=momentum)
        unbiased = var64 * (count / (count - 1))
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)

        invstd = torch.rsqrt(var64 + eps).to(compute)
        mean_offset = (mean64 - shift.double()).to(compute)  # mean - s: of the order of the std
        ctx.save_for_backward(x, weight, shift, mean_offset, invstd, count.to(compute))
        ctx.comm, ctx.group, ctx.name = comm, group, name
        if not local_count:
            return torch.empty_like(x)
        # y = (x - local mean - (mean - local mean)) * w * invstd + b, in place on the centred values
        scale = weight.to(compute) * invstd
        offset = bias.to(compute) - (mean64 - local_mean).to(compute) * scale
        return centred.mul_(_channel_view(scale)).add_(_channel_view(offset)).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight, shift, mean_offset, invstd, total = ctx.saved_tensors
        channels, compute = weight.numel(), invstd.dtype
        packet = torch.zeros(2 * channels, dtype=compute, device=x.device)
        local_sum_dy, local_sum_dy_xhat = packet.split([channels, channels])
        if x.numel():
            x_minus_mean = _centred(x, shift).sub_(_channel_view(mean_offset))
            torch.sum(grad_output, dim=(0, 2, 3), dtype=compute, out=local_sum_dy)
            torch.sum(x_minus_mean * grad_output, dim=(0, 2, 3), out=local_sum_dy_xhat)
            local_sum_dy_xhat.mul_(invstd)
        local_sums = packet.clone()  # this rank's share: the weight and bias gradients
        sum_dy, sum_dy_xhat = ctx.comm.allreduce_async(
            packet, op="sum", group=ctx.group, name=f"{ctx.name}.backward").wait().split([channels, channels])

        grad_input = None
        if ctx.needs_input_grad[0]:
            # dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), means over the group,
            #    = dy_scale * dy + centred_scale * (x - mean) + constant.
            dy_scale = weight.to(compute) * invstd
            centred_scale = -dy_scale * invstd * sum_dy_xhat / total
            constant = -dy_scale * sum_dy / total
            if x.numel():
                grad_input = x_minus_mean.mul_(_channel_view(centred_scale)).add_(_channel_view(constant))
                grad_input = grad_input.addcmul_(grad_output, _channel_view(dy_scale)).to(x.dtype)
            else:
                grad_input = torch.zeros_like(x)
        local_sum_dy, local_sum_dy_xhat = local_sums.to(weight.dtype).split([channels, channels])
        return (grad_input, local_sum_dy_xhat, local_sum_dy) + (None,) * 8


class CrossGPUBatchNorm2d(_BatchNorm):
    """MegDet's cross-GPU batch norm over a BN group of ``group_size`` consecutive ranks.

    Input and output: Tensor[N, C, H, W] (N may differ between ranks and may be 0) of any floating
    dtype that nn.BatchNorm2d takes; statistics in float32 (float64 for a float64 module or input),
    and autocast bf16/fp16 inputs come out in their own dtype.
    group_size: ranks sharing statistics (None: the whole world); the group is created here, so
    construct layers in the same order on every rank. name: stable name of this layer's collectives
    (Horovod caches their negotiation by name); ``convert_model`` uses the module path.

    Hang guard: an invalid input (not 4-D, wrong channel count, not floating point) on any rank is
    flagged inside the forward allreduce that every member joins anyway; where that collective makes
    the host wait (Horovod, gloo, CPU tensors) every member raises the same UserError at no extra
    cost. Under NCCL, which leaves the host free to queue GPU work ahead, the flags are not read (that
    would synchronise the host at every layer): the rank with the bad input raises, and like anything
    else that stops a member from reaching this layer's allreduce (an exception elsewhere, a rank in
    eval mode while the others train, a rank that does not backpropagate through the layer) its
    peers fail after the communicator's timeout (MEGDET_COMM_TIMEOUT) instead of hanging.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = DEFAULT_MOMENTUM,
                 group_size: Optional[int] = None, name: Optional[str] = None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)
        group = bn_group(comm_mod.get_cgbn(), group_size)
        self.group_ranks = group.ranks  # the Group itself holds engine handles that cannot be copied
        self.name = name or f"cgbn{num_features}"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_ranks={list(self.group_ranks)}, name={self.name!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        error = _input_error(x, self.num_features, self.name)
        comm = comm_mod.get_cgbn()
        group = comm.new_group(self.group_ranks)  # created at construction; a lookup here
        if not self.training or group.size == 1:
            if error is not None:
                raise UserError(error)
            if self.training and x.numel() // self.num_features < MIN_VALUES_PER_CHANNEL:
                raise UserError(f"Invalid batch for {self.name}: shape {tuple(x.shape)} has fewer than "
                                f"{MIN_VALUES_PER_CHANNEL} values per channel in training; give it more "
                                "images or pixels, or use eval mode")
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, momentum=0.0, eps=self.eps)
        momentum = self.momentum if self.momentum is not None else 1.0 / (int(self.num_batches_tracked) + 1)
        if group.size == 1:
            out = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                               training=True, momentum=momentum, eps=self.eps)
        else:
            out = _GroupBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                        momentum, self.eps, comm, group, self.name, error)
        self.num_batches_tracked.add_(1)
        return out


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine: y = (x - running_mean) / sqrt(running_var + eps)
    * weight + bias, per channel, on Tensor[N, C, H, W]. All four are buffers (nothing trains); it
    loads a ``BatchNorm2d`` state dict (``num_batches_tracked`` is dropped)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        error = _input_error(x, self.num_features, type(self).__name__)
        if error is not None:
            raise ValueError(error)
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(_channel_view(shift).to(x.dtype), x, _channel_view(scale).to(x.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


BATCH_NORMS_2D = (nn.BatchNorm2d, CrossGPUBatchNorm2d, FrozenBatchNorm2d)


def convert_model(model: nn.Module, mode: str = "cgbn", group_size: Optional[int] = None) -> nn.Module:
    """Replace every 2-d batch norm in ``model`` (``nn.BatchNorm2d``, ``CrossGPUBatchNorm2d``,
    ``FrozenBatchNorm2d``) by the kind ``mode`` names, keeping weights, biases, running statistics,
    eps, momentum, device and dtype. In place: returns ``model`` (the new layer if ``model`` itself
    is one); layers already of that kind (and group size) stay as they are.

    mode "cgbn": CrossGPUBatchNorm2d over groups of ``group_size`` ranks of ``hpc.comm.get_cgbn()``
    (collective: call it on every rank), each named after its module path. "frozen":
    FrozenBatchNorm2d. "bn": nn.BatchNorm2d (for example to evaluate on one process).
    """
    if mode not in CONVERT_MODES:
        raise ValueError(f"Invalid mode: {mode!r}; use one of {', '.join(CONVERT_MODES)}")
    if mode != "cgbn" and group_size is not None:
        raise ValueError(f"Invalid arguments: group_size={group_size} applies to mode 'cgbn' only, not {mode!r}; "
                        "drop it")
    group_size = bn_group(comm_mod.get_cgbn(), group_size).size if mode == "cgbn" else None
    return _convert(model, mode, group_size, path="")


def _convert(module: nn.Module, mode: str, group_size: Optional[int], path: str) -> nn.Module:
    if isinstance(module, BATCH_NORMS_2D):
        if _is_kind(module, mode, group_size):
            return module
        return _converted_layer(module, mode, group_size, path or "bn")
    for child_name, child in module.named_children():
        converted = _convert(child, mode, group_size, f"{path}.{child_name}" if path else child_name)
        if converted is not child:
            setattr(module, child_name, converted)
    return module


def _is_kind(layer: nn.Module, mode: str, group_size: Optional[int]) -> bool:
    if mode == "cgbn":
        return isinstance(layer, CrossGPUBatchNorm2d) and len(layer.group_ranks) == group_size
    return isinstance(layer, FrozenBatchNorm2d if mode == "frozen" else nn.BatchNorm2d)


def _converted_layer(layer: nn.Module, mode: str, group_size: Optional[int], path: str) -> nn.Module:
    if not isinstance(layer, FrozenBatchNorm2d) and not (layer.affine and layer.track_running_stats):
        raise ValueError(f"Invalid layer {path}: {layer} has affine={layer.affine}, track_running_stats="
                        f"{layer.track_running_stats}; convert_model needs affine=True and "
                        "track_running_stats=True")
    if mode == "frozen":
        new = FrozenBatchNorm2d(layer.num_features, eps=layer.eps)
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            setattr(new, buffer, getattr(layer, buffer).detach().clone())
        return new
    momentum = getattr(layer, "momentum", DEFAULT_MOMENTUM)
    if mode == "cgbn":
        new = CrossGPUBatchNorm2d(layer.num_features, eps=layer.eps, momentum=momentum,
                                  group_size=group_size, name=f"cgbn.{path}")
    else:
        new = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=momentum)
    trainable = isinstance(layer, FrozenBatchNorm2d)
    for param in ("weight", "bias"):
        source = getattr(layer, param)
        setattr(new, param, nn.Parameter(source.detach().clone(),
                                         requires_grad=trainable or source.requires_grad))
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        if hasattr(layer, buffer):
            setattr(new, buffer, getattr(layer, buffer).detach().clone())
    new.train(layer.training)
    return new.to(layer.running_mean.device)
