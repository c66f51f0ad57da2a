"""Learning-rate schedules for large mini-batches: linear scaling rule, linear gradual warm-up, step decay,
and MegDet's "normal" and "long" policies. Pure Python: the config (which loads without torch) uses it.

    lr = linear_scaling_rule(batch_size=256)                    # 0.32
    schedule = Schedule(lr=lr, max_iter=5625, steps=(3750, 5000), decay_factors=decay_factors("normal", 2),
                        warmup_iters=500, warmup_factor=0.001)
    lr = schedule.lr_at(iteration)                              # a pure function: resume anywhere

Iterations count from 0; ``lr_at(i)`` is the learning rate of the step taken at iteration i. The
trainer sets the rate of every param group from ``lr_at`` before each step.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Dict, Tuple

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
            object.__setattr__(self, "decay_factors", (NORMAL_DECAY,) * len(self.steps))
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


@dataclass(frozen=True)
class EpochPolicy:
    """A schedule in epochs: decay ``decay_factors`` at ``step_epochs``, stop after ``epochs``."""

    step_epochs: Tuple[float, ...]
    decay_factors: Tuple[float, ...]
    epochs: float


# MegDet section 4: "normal" decays x0.1 at epochs 8 and 10 and ends at 11; "long" decays x0.1 at 11
# and 14, x0.5 at 17, and ends at 18.
NORMAL_DECAY = 0.1
POLICIES: Dict[str, EpochPolicy] = {
    "normal": EpochPolicy(step_epochs=(8, 10), decay_factors=(NORMAL_DECAY, NORMAL_DECAY), epochs=11),
    "long": EpochPolicy(step_epochs=(11, 14, 17), decay_factors=(0.1, 0.1, 0.5), epochs=18),
}


def decay_factors(policy: str, num_steps: int) -> Tuple[float, ...]:
    """The factors by which ``policy`` multiplies the learning rate at each of ``num_steps`` steps: 0.1
    at every step for "normal" (MegDet's two, or any other number), MegDet's three for "long"."""
    if policy not in POLICIES:
        raise ValueError(f"Invalid policy: {policy!r} (use one of {', '.join(POLICIES)})")
    factors = POLICIES[policy].decay_factors
    if policy == "normal":
        return (NORMAL_DECAY,) * num_steps
    if num_steps != len(factors):
        raise ValueError(f"Invalid steps: the {policy} policy decays {len(factors)} times, not {num_steps}")
    return factors
