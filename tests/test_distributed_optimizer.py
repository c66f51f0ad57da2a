"""DistributedOptimizer on real processes: world-size invariance with cross-GPU BN (2 ranks x B images
== 1 rank x 2B), gradient accumulation, fp16 compression, broadcast from rank 0, the divergence
guard when only one rank sees a non-finite value, and fp16 loss scaling when only one rank overflows."""
import copy

import pytest
import torch
from torch import nn

from hpc import comm as comm_mod
from hpc.amp import LossScaler
from hpc.distributed import DistributedOptimizer, DivergenceError
from hpc.errors import UserError
from hpc.optim import PMDLAMB, param_groups
from tests.multirank import expect_ok, run_ranks

STEPS = 10
GLOBAL_BATCH = 8  # images per step over all ranks
TINY_BUCKET_MB = 0.0005  # 512 bytes: several buckets on the torch engine


def small_net(seed, batch_norm):
    """conv-BN-ReLU x 2, pooled, linear: Tensor[N, 3, 8, 8] -> Tensor[N, 4]. Convolutions before BN
    have no bias (as in ResNet): its gradient would be rounding noise, which a layer-wise ratio
    (phi = ||x|| / ||u||) blows up to a full step in a noise direction."""
    torch.manual_seed(seed)
    norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=not batch_norm), norm(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1, stride=2, bias=not batch_norm), norm(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def batch(step):
    """The global batch of ``step``: images Tensor[GLOBAL_BATCH, 3, 8, 8], targets Tensor[GLOBAL_BATCH, 4]."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator), torch.randn(GLOBAL_BATCH, 4, generator=generator)


CONFIGS = {
    # name: (batch norm, optimizer factory, fp16 compression)
    "sgd_cgbn": (True, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4), False),
    "pmd_lamb_cgbn": (True, lambda m: PMDLAMB(param_groups(m, weight_decay=5e-4), lr=2.0, T=4), False),
    "sgd_accumulated": (False, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), False),
    "sgd_fp16": (False, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), True),
}


def body_train(comm, passes):
    """Train every config STEPS steps on this rank's slice of each global batch; ``passes[name]``
    micro-batches per step. Rank r starts from seed r, so equality needs the broadcast from rank 0."""
    from hpc.cgbn import convert_model

    torch.set_num_threads(1)
    results = {}
    for name, (batch_norm, make_optimizer, fp16) in CONFIGS.items():
        model = small_net(seed=comm.rank, batch_norm=batch_norm)
        if batch_norm:
            model = convert_model(model, mode="cgbn")  # one BN group: the whole world
        optimizer = DistributedOptimizer(make_optimizer(model), model, batch_size=GLOBAL_BATCH,
                                         backward_passes_per_step=passes[name],
                                         compression="fp16" if fp16 else "none", bucket_mb=TINY_BUCKET_MB)
        per_rank = GLOBAL_BATCH // comm.size
        for step in range(STEPS):
            images, targets = batch(step)
            mine = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
            for images_part, targets_part in zip(images[mine].chunk(passes[name]), targets[mine].chunk(passes[name])):
                optimizer.backward(nn.functional.mse_loss(model(images_part), targets_part))
            assert optimizer.step()
            optimizer.zero_grad()
        results[name] = {key: value.detach().clone() for key, value in model.state_dict().items()}
    return results


@pytest.fixture(scope="module")
def one_rank():
    """The reference: one real process with the whole batch, one pass per step."""
    return expect_ok(run_ranks("tests.test_distributed_optimizer:body_train", 1, "torch", timeout=300,
                               passes={name: 1 for name in CONFIGS}))[0]


@pytest.mark.multirank
@pytest.mark.parametrize("launcher", ["horovodrun", "torch"])
def test_two_ranks_equal_one_rank_with_the_whole_batch(launcher, one_rank):
    passes = {name: 2 if name == "sgd_accumulated" else 1 for name in CONFIGS}
    rank0, rank1 = expect_ok(run_ranks("tests.test_distributed_optimizer:body_train", 2, launcher, timeout=300,
                                       passes=passes))
    start = small_net(seed=0, batch_norm=True).state_dict()
    for name in CONFIGS:
        for key, reference in one_rank[name].items():
            assert torch.equal(rank0[name][key], rank1[name][key]), f"{name}.{key} differs between ranks"
            tolerance = 2e-3 if name == "sgd_fp16" else 1e-5  # float16 gradients: ~1e-3 relative
            torch.testing.assert_close(rank0[name][key], reference, rtol=tolerance, atol=tolerance,
                                       msg=lambda m: f"{name}.{key}: {m}")
        assert (rank0[name]["0.weight"] - start["0.weight"]).abs().max() > 1e-3, f"{name} did not train"


def body_guard(comm, nan_loss_at, nan_grad_at, max_consecutive_skips):
    """Only rank 1 sees the non-finite values: a NaN loss whose gradients are finite at ``nan_loss_at``,
    an infinite gradient with a finite loss at ``nan_grad_at``. Returns what each step did."""
    torch.set_num_threads(1)
    model = nn.Linear(3, 2)
    optimizer = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, batch_size=8,
                                     max_consecutive_skips=max_consecutive_skips)
    stepped, skipped, moved = [], [], []
    for iteration in range(20):
        before = model.weight.detach().clone()
        loss = model(torch.ones(4, 3) * (comm.rank + 1)).square().mean()
        hook = None
        if comm.rank == 1 and iteration in nan_loss_at:
            loss = loss + torch.tensor(float("nan"))  # no gradient path: the gradients stay finite
        if comm.rank == 1 and iteration in nan_grad_at:
            hook = model.weight.register_hook(lambda grad: grad * float("inf"))
        optimizer.backward(loss)
        if hook is not None:
            hook.remove()
        try:
            stepped.append(optimizer.step())
        except DivergenceError as error:
            return {"stepped": stepped, "skipped": skipped, "moved": moved, "error": str(error),
                    "weight": model.weight.detach().clone()}
        optimizer.zero_grad()
        skipped.append(optimizer.skipped_steps)
        moved.append(not torch.equal(before, model.weight.detach()))
    return {"stepped": stepped, "skipped": skipped, "moved": moved, "error": None}


@pytest.mark.multirank
@pytest.mark.parametrize("launcher", ["horovodrun", "torch"])
def test_divergence_guard_skips_on_every_rank_and_aborts_together(launcher):
    results = expect_ok(run_ranks("tests.test_distributed_optimizer:body_guard", 2, launcher, timeout=300,
                                  nan_loss_at=[1, 5, 6, 7], nan_grad_at=[3], max_consecutive_skips=3))
    expected_stepped = [True, False, True, False, True, False, False]
    for result in results:
        assert result["stepped"] == expected_stepped
        assert result["skipped"] == [0, 1, 1, 2, 2, 3, 4]
        assert result["moved"] == expected_stepped  # a skipped step leaves the parameters alone
        assert "iteration 7" in result["error"] and "3 steps in a row" in result["error"]
        assert "learning rate 0.1" in result["error"] and "batch size 8" in result["error"]
    assert results[0]["error"] == results[1]["error"]
    assert torch.equal(results[0]["weight"], results[1]["weight"])


def _scaled_run(comm, model, optimizer, start, stop, overflow_at):
    """Steps start..stop-1 of a loss-scaled run; rank 1's loss is multiplied by 1e36 at ``overflow_at``
    (finite, but times the scale it overflows float32, so only rank 1's gradients are infinite)."""
    record = []
    for iteration in range(start, stop):
        generator = torch.Generator().manual_seed(1000 * comm.rank + iteration)
        inputs, wanted = torch.randn(4, 3, generator=generator), torch.randn(4, 2, generator=generator)
        loss = nn.functional.mse_loss(model(inputs), wanted)
        if comm.rank == 1 and iteration == overflow_at:
            loss = loss * 1e36
        optimizer.backward(loss)
        stepped = optimizer.step()
        optimizer.zero_grad()
        record.append((iteration, stepped, optimizer.loss_scaler.scale))
    return record


def body_loss_scale(comm, steps, overflow_at, resume_at):
    """A loss-scaled SGD run of ``steps`` steps, and the same run resumed at ``resume_at`` from a copy of
    the model and optimizer state taken there."""
    torch.set_num_threads(1)

    def build():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        optimizer = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                         batch_size=8, loss_scaler=LossScaler(init_scale=2.0 ** 10, growth_interval=3))
        return model, optimizer

    model, optimizer = build()
    record = _scaled_run(comm, model, optimizer, 0, resume_at, overflow_at)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    record += _scaled_run(comm, model, optimizer, resume_at, steps, overflow_at)
    resumed_model, resumed = build()
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["optimizer"])
    resumed_record = _scaled_run(comm, resumed_model, resumed, resume_at, steps, overflow_at)
    return {"record": record, "resumed_record": resumed_record, "weight": model.weight.detach().clone(),
            "resumed_weight": resumed_model.weight.detach().clone(), "overflow_steps": optimizer.overflow_steps,
            "skipped_steps": optimizer.skipped_steps}


@pytest.mark.multirank
@pytest.mark.parametrize("launcher", ["horovodrun", "torch"])
def test_fp16_overflow_on_one_rank_skips_everywhere_halves_every_scale_and_resumes_exactly(launcher):
    results = expect_ok(run_ranks("tests.test_distributed_optimizer:body_loss_scale", 2, launcher, timeout=300,
                                  steps=10, overflow_at=2, resume_at=4))
    for result in results:
        record = result["record"]
        assert [stepped for _, stepped, _ in record] == [True, True, False] + [True] * 7
        # 1024, 1024, halved by the overflow, then doubled after every 3 clean steps
        assert [scale for _, _, scale in record] == [1024, 1024, 512, 512, 512, 1024, 1024, 1024, 2048, 2048]
        assert result["overflow_steps"] == result["skipped_steps"] == 1
        assert result["resumed_record"] == record[4:]
        torch.testing.assert_close(result["resumed_weight"], result["weight"], rtol=1e-6, atol=1e-6)
    assert results[0]["record"] == results[1]["record"]
    assert torch.equal(results[0]["weight"], results[1]["weight"])


def test_fp16_guard_tells_an_overflow_from_a_divergence():
    """Gradients that overflow at every step with a finite loss halve the scale down to 1 without
    counting as divergence; only at a scale of 1 do they. A NaN loss is a divergence at once."""
    local = comm_mod.LocalCommunicator()

    def run(loss_factor, gradient_factor):
        model = nn.Linear(3, 2)
        optimizer = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, batch_size=4, comm=local,
                                         max_consecutive_skips=3, loss_scaler=LossScaler(init_scale=2.0 ** 4))
        model.weight.register_hook(lambda grad: grad * gradient_factor)
        scales = []
        with pytest.raises(DivergenceError) as caught:
            for _ in range(20):
                optimizer.backward(model(torch.ones(2, 3)).square().mean() * loss_factor)
                optimizer.step()
                optimizer.zero_grad()
                scales.append(optimizer.loss_scaler.scale)
        return scales, str(caught.value), optimizer

    scales, message, optimizer = run(1.0, float("inf"))
    assert scales == [8, 4, 2, 1, 1, 1], "four overflows bring the scale to 1; the next three count"
    assert optimizer.overflow_steps == 7 and "fp16 loss scale 1" in message and "3 steps in a row" in message
    scales, message, optimizer = run(float("nan"), 1.0)
    assert scales == [16, 16] and optimizer.overflow_steps == 0 and "3 steps in a row" in message


def test_accumulation_on_one_process_equals_the_whole_batch():
    """4 micro-batches of 2 with the loss scaled by 1/4 == one batch of 8, PMD-LAMB, float64."""
    local = comm_mod.LocalCommunicator()
    finals = []
    for passes in (1, 4):
        model = small_net(seed=0, batch_norm=False).double()
        optimizer = DistributedOptimizer(PMDLAMB(model.parameters(), lr=1.0), model, batch_size=GLOBAL_BATCH,
                                         comm=local, backward_passes_per_step=passes)
        for step in range(STEPS):
            images, targets = batch(step)
            for images_part, targets_part in zip(images.double().chunk(passes), targets.double().chunk(passes)):
                optimizer.backward(nn.functional.mse_loss(model(images_part), targets_part))
            optimizer.step()
            optimizer.zero_grad()
        finals.append(model.state_dict())
    for key in finals[0]:
        torch.testing.assert_close(finals[1][key], finals[0][key], rtol=1e-10, atol=1e-10)


def test_misuse_and_bad_arguments_are_one_line_errors():
    local = comm_mod.LocalCommunicator()
    model = nn.Linear(2, 1)
    optimizer = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, batch_size=4,
                                     comm=local, backward_passes_per_step=2)

    def loss():
        return model(torch.ones(2, 2)).sum()

    optimizer.backward(loss())
    with pytest.raises(UserError, match="step\\(\\) after 1 backward\\(\\) calls, but backward_passes_per_step is 2"):
        optimizer.step()
    optimizer.backward(loss())
    with pytest.raises(UserError, match="backward\\(\\) was called 3 times before step\\(\\)"):
        optimizer.backward(loss())
    assert optimizer.step()
    for arguments, message in [(dict(backward_passes_per_step=0), "Invalid backward_passes_per_step: 0"),
                               (dict(compression="int8"), "Invalid compression: 'int8'"),
                               (dict(max_consecutive_skips=0), "Invalid max_consecutive_skips: 0"),
                               (dict(batch_size=0), "Invalid batch_size: 0")]:
        with pytest.raises(ValueError, match=message):
            DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, comm=local,
                                 **{"batch_size": 4, **arguments})
