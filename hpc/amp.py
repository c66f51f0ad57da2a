"""Mixed precision: which autocast dtype a device runs, and the dynamic loss scale that fp16 needs.

    dtype = hpc.amp.resolve("auto", device)          # bf16 on Ampere/Hopper, fp16 on older GPUs, None on CPU
    with hpc.amp.autocast(device, dtype):
        loss = model(images, targets)
    scaler = LossScaler() if dtype == torch.float16 else None   # DistributedOptimizer(..., loss_scaler=scaler)

Modes: ``none`` (float32), ``bf16``, ``fp16``, ``auto``. bf16 keeps float32's exponent range, so it
trains without loss scaling; fp16 does not: gradients below 2**-24 flush to zero, so the loss is
multiplied by a scale S before backward and the gradients divided by S after the allreduce. S halves
whenever some rank's gradients overflow (that step is skipped on every rank) and doubles after
``growth_interval`` clean steps (Micikevicius et al. 2018, "Mixed Precision Training").
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import torch

from hpc.errors import UserError
from hpc.options import AMP_MODES
# torch.cuda.amp.GradScaler's defaults: 2**16, x2 after 2000 clean steps, x0.5 on overflow.
DEFAULT_INIT_SCALE = 2.0 ** 16
DEFAULT_GROWTH_INTERVAL = 2000
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
# At a scale of 1 the fp16 backward overflows with the true gradients: that is a divergence, not a
# range problem that a smaller scale could fix.
MIN_SCALE = 1.0


def resolve(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``mode`` on ``device`` (None: float32). ``auto``: bf16 on a GPU with
    bf16 arithmetic of its own (Ampere and newer), else fp16 on a GPU, else float32 on the CPU. UserError for an unknown mode or fp16
    on a device that cannot run it (the CPU: no fp16 arithmetic here, and loss scaling is a GPU
    recipe)."""
    if mode not in AMP_MODES:
        raise UserError(f"train.amp={mode!r} is not one of {', '.join(AMP_MODES)}: choose one of them")
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if _native_bf16(device) else torch.float16
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError(f"train.amp=fp16 needs a CUDA GPU, and this rank computes on {device}: set "
                        "train.amp=bf16 (or none) on the CPU")
    if dtype == torch.bfloat16 and device.type == "cuda" and not _native_bf16(device):
        name = torch.cuda.get_device_name(device)
        raise UserError(f"train.amp=bf16 but {name} has no bf16 arithmetic of its own (before Ampere, bf16 is "
                        "emulated, slower than fp16): set train.amp=fp16 (or auto)")
    return dtype


def _native_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` has bf16 arithmetic of its own (NVIDIA Ampere, compute capability 8.0,
    and newer; ROCm). Older GPUs only emulate it through float32, which torch's default
    ``is_bf16_supported()`` counts as support."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """The autocast context of ``dtype`` for ``device``'s type (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def describe(dtype: Optional[torch.dtype]) -> str:
    """The banner's words for an autocast dtype."""
    return {None: "none (float32)", torch.bfloat16: "bf16 autocast",
            torch.float16: "fp16 autocast with dynamic loss scaling"}[dtype]


class LossScaler:
    """Dynamic loss scale S for fp16 training, the same on every rank.

    ``scale_loss(loss)`` returns loss * S for backward; after the gradient allreduce the optimizer
    calls ``unscale_(grads)`` then ``update(overflow)`` with the overflow flag every rank agreed on,
    so the scales of all ranks move together. ``state_dict`` goes into the checkpoint: a resumed run
    continues with the same S and the same count of clean steps.
    """

    def __init__(self, init_scale: float = DEFAULT_INIT_SCALE, growth_interval: int = DEFAULT_GROWTH_INTERVAL):
        if not init_scale >= MIN_SCALE:
            raise ValueError(f"Invalid init_scale: {init_scale} (must be >= {MIN_SCALE})")
        if growth_interval < 1:
            raise ValueError(f"Invalid growth_interval: {growth_interval} (must be >= 1)")
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.clean_steps = 0  # steps without overflow since the last change of scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, grads: List[torch.Tensor]) -> None:
        """Divide the (averaged) gradients by S in place."""
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    @property
    def at_minimum(self) -> bool:
        return self.scale <= MIN_SCALE

    def update(self, overflow: bool) -> None:
        """After a step: halve S on overflow (not below MIN_SCALE), double it after growth_interval
        clean steps."""
        if overflow:
            self.scale = max(MIN_SCALE, self.scale * BACKOFF_FACTOR)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= GROWTH_FACTOR
            self.clean_steps = 0

    def state_dict(self) -> Dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "growth_interval": self.growth_interval}

    def load_state_dict(self, state: Dict) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
        self.growth_interval = int(state["growth_interval"])
