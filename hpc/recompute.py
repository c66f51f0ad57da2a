"""Sublinear memory by recomputation (Chen et al. 2016, used by MegDet for BN sizes >= 32): chosen
modules (backbone stages) keep no activations for the backward pass and run their forward again then.

    recompute(model.backbone, ["layer1", "layer2", "layer3"])     # names from a config list
    peak_cpu_bytes(lambda: model(images).sum().backward())       # measure what it saves
    saved_tensor_bytes(lambda: model(images), {"res2": [model.backbone.layer1]})  # what each part keeps

Cost: one more forward pass of each chosen module per step. Saving: the activations inside them; only
each module's input is kept. Buffers (BN running statistics) are restored after the recomputation, so
running statistics are updated once per step, as without recomputation; random ops (dropout) replay
the same random numbers. A cross-GPU BN inside a recomputed module repeats its forward allreduce in
the backward pass (on every rank, in the same order).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, List, Sequence

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


def saved_tensor_bytes(run: Callable[[], object], parts: Dict[str, Sequence[nn.Module]],
                       exclude: Sequence[torch.Tensor] = ()) -> Dict[str, int]:
    """Bytes of the tensors autograd saves for the backward pass while ``run()`` builds its graph, by
    part: each storage counts once, for the innermost part (a name of ``parts``, whose modules are
    running) that saved it first; "other" for the rest. Storages of ``exclude`` (parameters, buffers)
    are not counted: they exist anyway."""
    running = ["other"]

    def enter(name: str):
        return lambda module, inputs: running.append(name)  # append returns None: the inputs stay

    def leave(module, inputs, output) -> None:
        running.pop()

    handles = [hook for name, modules in parts.items() for module in modules
               for hook in (module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave))]
    seen = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    sizes: Dict[str, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            sizes[running[-1]] = sizes.get(running[-1], 0) + storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return sizes


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
