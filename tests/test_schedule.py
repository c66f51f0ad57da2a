"""Linear scaling rule, warm-up, step decay, MegDet policies, rescaling to another batch, and the
torch LR scheduler view with resume."""
import pytest
import torch

from hpc.schedule import POLICIES, Schedule, ScheduledLR, epoch_policy, linear_scaling_rule

DETECTRON_16 = dict(lr=0.02, max_iter=90_000, steps=(60_000, 80_000), warmup_iters=1000, warmup_factor=0.001)


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


def test_rescaling_the_16_image_schedule_to_256_images():
    schedule = Schedule(**DETECTRON_16).rescaled(from_batch=16, to_batch=256)
    assert schedule.lr == pytest.approx(0.32)
    assert (schedule.max_iter, schedule.steps, schedule.warmup_iters) == (5625, (3750, 5000), round(1000 / 16))
    assert schedule.warmup_factor == 0.001 and schedule.decay_factors == (0.1, 0.1)
    # The same images seen before each decay: iteration x batch is preserved.
    assert [s * 256 for s in schedule.steps] == [s * 16 for s in DETECTRON_16["steps"]]


def test_megdet_policies_in_epochs():
    images = 16 * 1000  # 1000 iterations per epoch at batch 16
    normal = epoch_policy("normal", batch_size=16, images_per_epoch=images)
    assert (normal.max_iter, normal.steps, normal.decay_factors) == (11_000, (8000, 10_000), (0.1, 0.1))
    long = epoch_policy("long", batch_size=16, images_per_epoch=images)
    assert (long.max_iter, long.steps) == (18_000, (11_000, 14_000, 17_000))
    assert long.lr_at(17_999) == pytest.approx(0.02 * 0.1 * 0.1 * 0.5)
    # A policy is fixed in epochs: at batch 256 it equals the batch-16 one rescaled.
    for name in POLICIES:
        direct = epoch_policy(name, batch_size=256, images_per_epoch=images, warmup_iters=10)
        rescaled = epoch_policy(name, batch_size=16, images_per_epoch=images, warmup_iters=160).rescaled(16, 256)
        assert direct == rescaled


def test_scheduler_follows_the_pure_function_and_resumes():
    schedule = Schedule(lr=0.4, max_iter=50, steps=(20, 35), warmup_iters=10, warmup_factor=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=123.0)  # overwritten: the schedule is the only source
    scheduler = ScheduledLR(optimizer, schedule)
    seen = []
    for _ in range(30):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([schedule.lr_at(i) for i in range(30)])

    saved = scheduler.state_dict()
    resumed_optimizer = torch.optim.SGD([param], lr=123.0)
    resumed = ScheduledLR(resumed_optimizer, schedule)
    resumed.load_state_dict(saved)
    by_index = ScheduledLR(torch.optim.SGD([param], lr=1.0), schedule, last_iteration=29)
    assert "schedule" not in saved and saved["last_epoch"] == 30
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(schedule.lr_at(30))
    assert by_index.get_last_lr() == pytest.approx([schedule.lr_at(30)])
    resumed_optimizer.step()
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(schedule.lr_at(31))


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


def test_bad_batches_and_policies():
    with pytest.raises(ValueError, match="Invalid batch size: 0"):
        linear_scaling_rule(0)
    with pytest.raises(ValueError, match="Invalid batch size: 2000000 .*collapse"):
        Schedule(**DETECTRON_16).rescaled(from_batch=16, to_batch=2_000_000)
    with pytest.raises(ValueError, match="Invalid policy: 'short'"):
        epoch_policy("short", batch_size=16, images_per_epoch=1000)
    with pytest.raises(ValueError, match="Invalid iteration: -1"):
        Schedule(lr=0.1, max_iter=10).lr_at(-1)
