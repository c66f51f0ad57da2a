"""Linear scaling rule, warm-up, step decay and MegDet's policies."""
import pytest

from hpc.schedule import POLICIES, Schedule, decay_factors, linear_scaling_rule



def test_linear_scaling_rule():
    assert linear_scaling_rule(16) == pytest.approx(0.02)
    assert linear_scaling_rule(256) == pytest.approx(0.32)
    assert linear_scaling_rule(512, base_lr=0.1, base_batch=256) == pytest.approx(0.2)


def test_warmup_rises_linearly_to_the_peak():
    schedule = Schedule(lr=0.32, max_iter=5000, warmup_iters=400, warmup_factor=0.25)
    assert schedule.lr_at(0) == pytest.approx(0.25 * 0.32)
    assert schedule.lr_at(200) == pytest.approx((0.25 + 0.75 * 0.5) * 0.32)
    assert schedule.lr_at(400) == pytest.approx(0.32) and schedule.lr_at(4999) == pytest.approx(0.32)
    ramp = [schedule.lr_at(i) for i in range(401)]
    increments = [b - a for a, b in zip(ramp, ramp[1:])]
    assert all(d == pytest.approx(0.75 * 0.32 / 400) for d in increments)


def test_step_decay_multiplies_at_each_step():
    schedule = Schedule(lr=1.0, max_iter=100, steps=(30, 60, 90), decay_factors=(0.1, 0.1, 0.5))
    assert [schedule.lr_at(i) for i in (0, 29, 30, 59, 60, 89, 90, 99)] == \
        pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.005, 0.005])
    assert Schedule(lr=1.0, max_iter=10, steps=(5,)).lr_at(5) == pytest.approx(0.1)  # default factor


def test_megdet_policies_decay_factors():
    assert decay_factors("normal", 2) == (0.1, 0.1) == POLICIES["normal"].decay_factors
    assert decay_factors("normal", 1) == (0.1,), "normal decays by 0.1 at however many steps"
    assert decay_factors("long", 3) == (0.1, 0.1, 0.5)
    assert (POLICIES["normal"].epochs, POLICIES["long"].epochs) == (11, 18)
    schedule = Schedule(lr=0.02, max_iter=18_000, steps=(11_000, 14_000, 17_000), decay_factors=decay_factors("long", 3))
    assert schedule.lr_at(17_999) == pytest.approx(0.02 * 0.1 * 0.1 * 0.5)
    with pytest.raises(ValueError, match="the long policy decays 3 times, not 2"):
        decay_factors("long", 2)
    with pytest.raises(ValueError, match="Invalid policy: 'short'"):
        decay_factors("short", 2)


@pytest.mark.parametrize("arguments, message", [
    (dict(lr=0.0, max_iter=10), "Invalid learning rate: 0.0"),
    (dict(lr=-0.02, max_iter=10), "Invalid learning rate: -0.02"),
    (dict(lr=0.02, max_iter=0), "Invalid max_iter: 0"),
    (dict(lr=0.02, max_iter=100, warmup_iters=101), "Invalid warmup_iters: 101"),
    (dict(lr=0.02, max_iter=100, warmup_iters=10, warmup_factor=0.0), "Invalid warmup_factor: 0.0"),
    (dict(lr=0.02, max_iter=100, steps=(80, 60)), r"Invalid steps: \[80, 60\] \(must be strictly increasing\)"),
    (dict(lr=0.02, max_iter=100, steps=(60, 60)), r"Invalid steps: \[60, 60\]"),
    (dict(lr=0.02, max_iter=100, steps=(60, 100)), r"Invalid steps: \[60, 100\] \(must lie in"),
    (dict(lr=0.02, max_iter=100, steps=(60,), decay_factors=(0.1, 0.1)), "Invalid decay_factors"),
    (dict(lr=0.02, max_iter=100, steps=(60,), decay_factors=(-0.1,)), "Invalid decay_factors"),
])
def test_bad_schedules_fail_at_construction(arguments, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**arguments)


def test_bad_batches_and_iterations():
    with pytest.raises(ValueError, match="Invalid batch size: 0"):
        linear_scaling_rule(0)
    with pytest.raises(ValueError, match="Invalid iteration: -1"):
        Schedule(lr=0.1, max_iter=10).lr_at(-1)
