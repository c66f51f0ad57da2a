"""Learning-rate schedules for large mini-batches: linear scaling rule, linear gradual warm-up, step decay,
MegDet's "normal" and "long" policies, and rescaling of a schedule to another batch size.

    schedule = Schedule(lr=0.02, max_iter=90_000, steps=(60_000, 80_000), warmup_iters=1000)  # batch 16
    schedule = schedule.rescaled(from_batch=16, to_batch=256)  # lr 0.32, 5625 iterations, steps 3750, 5000
    lr = schedule.lr_at(iteration)                              # a pure function: resume anywhere
    scheduler = ScheduledLR(optimizer, schedule)                # or drive a torch optimizer

Iterations count from 0; ``lr_at(i)`` is the learning rate of the step taken at iteration i.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace
from typing import Dict, Tuple

import torch

# MegDet / Goyal et al.: 0.02 for a mini-batch of 16 images, scaled linearly with the batch.
BASE_LR = 0.02
BASE_BATCH = 16
# Detectron2's default: warm-up starts at 0.001 x the learning rate.
DEFAULT_WARMUP_FACTOR = 0.001


def linear_scaling_rule(batch_size: int, base_lr: float = BASE_LR, base_batch: int = BASE_BATCH) -> float:
    """The learning rate for ``batch_size`` images: ``base_lr * batch_size / base_batch`` (MegDet 3.2)."""
    if batch_size < 1 or base_batch < 1:
        raise ValueError(f"Invalid batch size: {batch_size} (base {base_batch}); both must be >= 1")
    if base_lr <= 0:
        raise ValueError(f"Invalid base learning rate: {base_lr} (must be > 0)")
    return base_lr * batch_size / base_batch


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up, then step decay.

    lr: the peak learning rate (> 0). max_iter: iterations of training. steps: iterations at which the
    rate is multiplied by the matching ``decay_factors`` entry (default 0.1 each), strictly increasing,
    inside (0, max_iter). warmup_iters: W, the rate rises linearly from ``warmup_factor * lr`` at
    iteration 0 to ``lr`` at iteration W (0: no warm-up); W <= max_iter.
    """

    lr: float
    max_iter: int
    steps: Tuple[int, ...] = ()
    decay_factors: Tuple[float, ...] = ()
    warmup_iters: int = 0
    warmup_factor: float = DEFAULT_WARMUP_FACTOR

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        if not self.decay_factors:
            object.__setattr__(self, "decay_factors", (0.1,) * len(self.steps))
        object.__setattr__(self, "decay_factors", tuple(float(f) for f in self.decay_factors))
        if not self.lr > 0:
            raise ValueError(f"Invalid learning rate: {self.lr} (must be > 0)")
        if self.max_iter < 1:
            raise ValueError(f"Invalid max_iter: {self.max_iter} (must be >= 1)")
        if not 0 <= self.warmup_iters <= self.max_iter:
            raise ValueError(f"Invalid warmup_iters: {self.warmup_iters} (must be in [0, max_iter={self.max_iter}]: "
                             "the warm-up cannot be longer than training)")
        if not 0 < self.warmup_factor <= 1:
            raise ValueError(f"Invalid warmup_factor: {self.warmup_factor} (must be in (0, 1])")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError(f"Invalid steps: {list(self.steps)} (must be strictly increasing)")
        if self.steps and not (0 < self.steps[0] and self.steps[-1] < self.max_iter):
            raise ValueError(f"Invalid steps: {list(self.steps)} (must lie in (0, max_iter={self.max_iter}))")
        if len(self.decay_factors) != len(self.steps):
            raise ValueError(f"Invalid decay_factors: {list(self.decay_factors)} (need one per step, "
                             f"{len(self.steps)} steps)")
        if not all(0 < f for f in self.decay_factors):
            raise ValueError(f"Invalid decay_factors: {list(self.decay_factors)} (must be > 0)")

    def factor_at(self, iteration: int) -> float:
        """lr_at(iteration) / lr: the warm-up ramp times the decays of the steps already passed."""
        if iteration < 0:
            raise ValueError(f"Invalid iteration: {iteration} (must be >= 0)")
        factor = math.prod(self.decay_factors[:bisect.bisect_right(self.steps, iteration)])
        if iteration < self.warmup_iters:
            progress = iteration / self.warmup_iters
            factor *= self.warmup_factor + (1 - self.warmup_factor) * progress
        return factor

    def lr_at(self, iteration: int) -> float:
        """The learning rate of the step taken at ``iteration`` (0-based)."""
        return self.lr * self.factor_at(iteration)

    def rescaled(self, from_batch: int, to_batch: int) -> "Schedule":
        """The same schedule in epochs for another batch size: the learning rate by the linear scaling
        rule, and max_iter, steps and warm-up by ``from_batch / to_batch`` (rounded to iterations)."""
        lr = linear_scaling_rule(to_batch, base_lr=self.lr, base_batch=from_batch)
        ratio = from_batch / to_batch
        max_iter = round(self.max_iter * ratio)
        steps = tuple(round(s * ratio) for s in self.steps)
        if max_iter < 1 or len(set(steps)) != len(steps) or (steps and steps[0] < 1):
            raise ValueError(f"Invalid batch size: {to_batch} (too large for a {self.max_iter}-iteration schedule "
                             f"at batch {from_batch}: steps {list(steps)} of {max_iter} iterations collapse)")
        return replace(self, lr=lr, max_iter=max_iter, steps=steps, warmup_iters=round(self.warmup_iters * ratio))


@dataclass(frozen=True)
class EpochPolicy:
    """A schedule in epochs: decay ``decay_factors`` at ``step_epochs``, stop after ``epochs``."""

    step_epochs: Tuple[float, ...]
    decay_factors: Tuple[float, ...]
    epochs: float


# MegDet section 4: "normal" decays x0.1 at epochs 8 and 10 and ends at 11; "long" decays x0.1 at 11
# and 14, x0.5 at 17, and ends at 18.
POLICIES: Dict[str, EpochPolicy] = {
    "normal": EpochPolicy(step_epochs=(8, 10), decay_factors=(0.1, 0.1), epochs=11),
    "long": EpochPolicy(step_epochs=(11, 14, 17), decay_factors=(0.1, 0.1, 0.5), epochs=18),
}


def epoch_policy(policy: str, *, batch_size: int, images_per_epoch: int, base_lr: float = BASE_LR,
                 base_batch: int = BASE_BATCH, warmup_iters: int = 0,
                 warmup_factor: float = DEFAULT_WARMUP_FACTOR) -> Schedule:
    """MegDet's ``policy`` ("normal" or "long") as a Schedule for ``batch_size`` images per iteration
    over a data set of ``images_per_epoch`` images, with the linearly scaled learning rate."""
    if policy not in POLICIES:
        raise ValueError(f"Invalid policy: {policy!r} (use one of {', '.join(POLICIES)})")
    if images_per_epoch < 1:
        raise ValueError(f"Invalid images_per_epoch: {images_per_epoch} (must be >= 1)")
    chosen = POLICIES[policy]
    iters_per_epoch = images_per_epoch / batch_size
    return Schedule(lr=linear_scaling_rule(batch_size, base_lr=base_lr, base_batch=base_batch),
                    max_iter=round(chosen.epochs * iters_per_epoch),
                    steps=tuple(round(e * iters_per_epoch) for e in chosen.step_epochs),
                    decay_factors=chosen.decay_factors, warmup_iters=warmup_iters, warmup_factor=warmup_factor)


class ScheduledLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets every param group's learning rate to ``schedule.lr_at(iteration)``.

    Call ``step()`` once after each ``optimizer.step()``. The schedule is the only source of the rate:
    the optimizer's own ``lr`` is overwritten. Resume with ``load_state_dict`` (the iteration is saved),
    or build with ``last_iteration=k - 1`` to continue at iteration k.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule, last_iteration: int = -1):
        self.schedule = schedule
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", schedule.lr)
        super().__init__(optimizer, last_epoch=last_iteration)

    def get_lr(self):
        return [self.schedule.lr_at(self.last_epoch)] * len(self.optimizer.param_groups)

    def state_dict(self) -> Dict:
        """The position (iteration) only; the schedule itself comes from the configuration."""
        state = super().state_dict()
        state.pop("schedule")
        return state

    def load_state_dict(self, state_dict: Dict) -> None:
        """Restore the position and set the optimizer's rate for the next step."""
        super().load_state_dict(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    _get_closed_form_lr = get_lr
