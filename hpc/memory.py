"""Sublinear memory by recomputation (Chen et al. 2016, used by MegDet for BN sizes >= 32): chosen
modules (backbone stages) keep no activations for the backward pass and run their forward again then.

    recompute(model.backbone, ["layer1", "layer2", "layer3"])     # names from a config list
    peak_cpu_bytes(lambda: model(images).sum().backward())       # measure what it saves

Cost: one more forward pass of each chosen module per step. Saving: the activations inside them; only
each module's input is kept. Buffers (BN running statistics) are restored after the recomputation, so
running statistics are updated once per step, as without recomputation; random ops (dropout) replay
the same random numbers. A cross-GPU BN inside a recomputed module repeats its forward allreduce in
the backward pass (on every rank, in the same order).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, List, Sequence

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint


def recompute(model: nn.Module, names: Sequence[str]) -> List[str]:
    """Make each submodule of ``model`` named in ``names`` (as in ``model.named_modules()``, e.g.
    "layer2" or "backbone.layer2") recompute its activations in the backward pass, in training mode.

    Parameters and ``state_dict`` keys are unchanged. Returns the names switched on. Raises
    ValueError naming any unknown module, or one already switched on.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules or name == ""]
    if unknown:
        children = ", ".join(name for name, _ in model.named_children())
        raise ValueError(f"Invalid recompute modules: {unknown} (not submodules of {type(model).__name__}; "
                         f"its children are: {children})")
    again = [name for name in names if isinstance(modules[name].forward, functools.partial)
             and modules[name].forward.func is _recomputed_forward]
    if again:
        raise ValueError(f"Invalid recompute modules: {again} (already recomputed; list each module once)")
    for name in names:
        module = modules[name]
        module.forward = functools.partial(_recomputed_forward, module, module.forward)
    return list(names)


def _recomputed_forward(module: nn.Module, forward, *args, **kwargs):
    if not (module.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _buffers_restored(module)), **kwargs)


@contextlib.contextmanager
def _buffers_restored(module: nn.Module):
    """Run the recomputation, then put every buffer of ``module`` back as it was before it."""
    saved = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:  # also when checkpoint stops the recomputation early, by an exception
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def peak_cpu_bytes(run: Callable[[], object]) -> int:
    """Peak CPU memory allocated by ``run()`` above what was allocated when it started, in bytes:
    the running maximum of the profiler's allocation (+) and free (-) events in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
