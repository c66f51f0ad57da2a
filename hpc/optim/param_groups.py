"""Param groups with separate weight decay for weights, normalisation parameters and biases."""
from __future__ import annotations

from typing import Dict, List

from torch import nn

# Module types whose parameters are normalisation scales and shifts (BatchNorm, SyncBatchNorm,
# InstanceNorm and subclasses such as the cross-GPU batch norm derive from _NormBase).
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, norm_decay: float = 0.0,
                 bias_decay: float = 0.0) -> List[Dict]:
    """Split ``model``'s trainable parameters into up to three optimizer param groups.

    "weights": every other parameter, decayed by ``weight_decay``; "norm": parameters of
    normalisation layers (``NORM_TYPES``), decayed by ``norm_decay``; "bias": other parameters named
    ``bias``, decayed by ``bias_decay``. Empty groups are left out; each group carries its ``name``.
    Shared parameters appear once, in the group of the first module that owns them.
    """
    groups = {"weights": [], "norm": [], "bias": []}
    seen = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            kind = "norm" if isinstance(module, NORM_TYPES) else "bias" if name == "bias" else "weights"
            groups[kind].append(param)
    decay = {"weights": weight_decay, "norm": norm_decay, "bias": bias_decay}
    return [{"name": kind, "params": params, "weight_decay": decay[kind]} for kind, params in groups.items() if params]
