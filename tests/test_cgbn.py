"""Cross-GPU batch norm equals nn.BatchNorm2d on the group's concatenated batch, on real processes.

One launch per (launcher, world size) runs every case in ``body_cgbn``: group sizes 1, 2 and the
world, equal / uneven / one-empty batches, a float64 module, the large-mean stability case, autocast bf16, eval mode
with no communication, and the bad inputs that must fail on every rank without a hang.
"""
import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hpc import cgbn
from hpc import comm as comm_mod
from hpc.errors import UserError
from tests.multirank import ENGINE_OF, expect_ok, run_ranks, skip_unless_launcher

CHANNELS, HEIGHT, WIDTH = 3, 3, 5
MOMENTUM = 0.3
RTOL, ATOL = 1e-5, 1e-6  # fp32 equivalence: relative, and absolute for values near zero


def _batch_layouts(world):
    """Images per rank: equal, uneven, and rank 0 empty."""
    return {"equal": [2] * world,
            "uneven": [1 + r % 3 for r in range(world)],
            "one empty": [0] + [1 + r for r in range(1, world)]}


def _group_sizes(world):
    return sorted({g for g in (1, 2, world) if world % g == 0})


def _step_data(images_per_rank, seed):
    """The whole world's batch, the same on every rank: inputs and output gradients per rank."""
    generator = torch.Generator().manual_seed(seed)
    channel_mean = torch.tensor([-2.0, 0.5, 3.0]).view(1, CHANNELS, 1, 1)
    channel_std = torch.tensor([0.5, 1.0, 2.0]).view(1, CHANNELS, 1, 1)
    inputs, grads = [], []
    for n in images_per_rank:
        inputs.append(torch.randn(n, CHANNELS, HEIGHT, WIDTH, generator=generator) * channel_std + channel_mean)
        grads.append(torch.randn(n, CHANNELS, HEIGHT, WIDTH, generator=generator))
    return inputs, grads


def _affine(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(CHANNELS, generator=generator) + 0.5, torch.randn(CHANNELS, generator=generator)


def _close(actual, expected, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check_equivalence(comm, group_size, images_per_rank, what, dtype=torch.float32):
    """Two training steps of CGBN on this rank's images against nn.BatchNorm2d on the group's, both
    modules and inputs in ``dtype``."""
    layer = cgbn.CrossGPUBatchNorm2d(CHANNELS, momentum=MOMENTUM, group_size=group_size).to(dtype)
    reference = nn.BatchNorm2d(CHANNELS, momentum=MOMENTUM).to(dtype)
    weight, bias = _affine(seed=group_size)
    for module in (layer, reference):
        module.weight.data.copy_(weight)
        module.bias.data.copy_(bias)
    group = comm.partition(group_size)
    members = list(group.ranks)
    start = sum(images_per_rank[members[0]:comm.rank])
    mine = slice(start, start + images_per_rank[comm.rank])
    for step in range(2):
        inputs, grads = _step_data(images_per_rank, seed=100 * step + len(images_per_rank))
        inputs, grads = [t.to(dtype) for t in inputs], [t.to(dtype) for t in grads]
        x = inputs[comm.rank].clone().requires_grad_()
        y = layer(x)
        (y * grads[comm.rank]).sum().backward()
        group_x = torch.cat([inputs[r] for r in members]).requires_grad_()
        group_y = reference(group_x)
        (group_y * torch.cat([grads[r] for r in members])).sum().backward()
        _close(y, group_y[mine].detach(), f"{what} step {step} output")
        _close(x.grad, group_x.grad[mine], f"{what} step {step} input grad")
    # Weight and bias gradients are this rank's share: their sum over the group is the reference.
    _close(comm.allreduce(layer.weight.grad, group=group), reference.weight.grad, f"{what} weight grad")
    _close(comm.allreduce(layer.bias.grad, group=group), reference.bias.grad, f"{what} bias grad")
    _close(layer.running_mean, reference.running_mean, f"{what} running mean")
    _close(layer.running_var, reference.running_var, f"{what} running var")
    assert int(layer.num_batches_tracked) == 2


def _check_stability(comm):
    """Mean 1e4, std 0.1 (ranks offset by 0.05 std): the group variance matches float64 on the
    concatenated float32 values, where float32 sums of x and x^2 lose it entirely."""
    generator = torch.Generator().manual_seed(7)
    shape = (4, CHANNELS, 8, 8)
    inputs = [1e4 + 0.1 * torch.randn(shape, generator=generator) + 0.005 * r for r in range(comm.size)]
    grads = [torch.randn(shape, generator=generator) for _ in range(comm.size)]
    layer = cgbn.CrossGPUBatchNorm2d(CHANNELS, momentum=1.0)  # running stats = this batch's statistics
    x = inputs[comm.rank].clone().requires_grad_()
    y = layer(x)
    (y * grads[comm.rank]).sum().backward()

    values = torch.cat(inputs).double()
    true_var = values.var(dim=(0, 2, 3))  # unbiased, as the running variance
    _close(layer.running_var.double(), true_var, "stability running var", rtol=1e-5, atol=0)
    _close(layer.running_mean.double(), values.mean(dim=(0, 2, 3)), "stability running mean", rtol=1e-7, atol=0)
    count = values.numel() // CHANNELS
    naive = torch.cat(inputs)
    naive_var = ((naive * naive).sum(dim=(0, 2, 3)) - naive.sum(dim=(0, 2, 3)) ** 2 / count) / (count - 1)
    assert ((naive_var.double() - true_var).abs() / true_var).max() > 1e-2, "the case must defeat naive sums"

    # The input gradient against float64 autograd of the same computation (weight 1, bias 0).
    exact_x = values.clone().requires_grad_()
    mean = exact_x.mean(dim=(0, 2, 3), keepdim=True)
    var = exact_x.var(dim=(0, 2, 3), correction=0, keepdim=True)
    exact_y = (exact_x - mean) / torch.sqrt(var + layer.eps)
    (exact_y * torch.cat(grads).double()).sum().backward()
    mine = slice(shape[0] * comm.rank, shape[0] * (comm.rank + 1))
    _close(x.grad, exact_x.grad[mine].float(), "stability input grad", rtol=1e-5, atol=1e-4)
    _close(y, exact_y[mine].detach().float(), "stability output", rtol=1e-5, atol=1e-4)


def _check_autocast_bf16(comm):
    """bf16 activations from an autocast conv: output and gradient stay bf16, statistics are the
    float32 statistics of the bf16 values."""
    generator = torch.Generator().manual_seed(11)
    images = [torch.randn(2, CHANNELS, HEIGHT, WIDTH, generator=generator) for _ in range(comm.size)]
    conv = nn.Conv2d(CHANNELS, CHANNELS, 1, bias=False)
    nn.init.eye_(conv.weight.data.view(CHANNELS, CHANNELS))
    layer = cgbn.CrossGPUBatchNorm2d(CHANNELS, momentum=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        activations = conv(images[comm.rank])
        y = layer(activations)
    assert activations.dtype == y.dtype == torch.bfloat16, (activations.dtype, y.dtype)
    y.float().sum().backward()
    assert conv.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    group_values = torch.cat(images).bfloat16().float()
    reference = nn.BatchNorm2d(CHANNELS, momentum=1.0)
    expected = reference(group_values)
    _close(layer.running_mean, reference.running_mean, "bf16 running mean")
    _close(layer.running_var, reference.running_var, "bf16 running var")
    mine = slice(2 * comm.rank, 2 * comm.rank + 2)
    _close(y.float(), expected[mine].detach(), "bf16 output", rtol=1e-2, atol=2e-2)


def _check_eval_communicates_nothing(comm):
    """Eval on rank 0 alone, with batches of different sizes, while the others wait in a barrier:
    any collective inside would never be matched and the launch would time out."""
    layer = cgbn.CrossGPUBatchNorm2d(CHANNELS).eval()
    layer.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
    layer.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    layer.weight.data.copy_(torch.tensor([2.0, 1.0, 0.5]))
    layer.bias.data.copy_(torch.tensor([0.0, 1.0, -1.0]))
    mean, var, weight, bias = (t.view(1, -1, 1, 1) for t in (layer.running_mean, layer.running_var,
                                                              layer.weight.detach(), layer.bias.detach()))
    if comm.rank == 0:
        for images in (1, 3, 0):
            x = torch.randn(images, CHANNELS, HEIGHT, WIDTH)
            _close(layer(x), (x - mean) / torch.sqrt(var + layer.eps) * weight + bias, "eval output")
    comm.barrier()
    assert int(layer.num_batches_tracked) == 0


def _expect_user_error(fn, *fragments):
    with pytest.raises(UserError) as caught:
        fn()
    message = str(caught.value)
    assert all(f in message for f in fragments), message
    return message


def _check_bad_input(comm):
    """Every rank raises the same kind of one-line error, then the layer still works (no desync)."""
    n, r = comm.size, comm.rank
    _expect_user_error(lambda: cgbn.CrossGPUBatchNorm2d(CHANNELS, group_size=n + 1),
                       f"group size {n + 1} does not divide the world size {n}")
    _expect_user_error(lambda: cgbn.convert_model(nn.BatchNorm2d(CHANNELS), mode="cgbn", group_size=n + 1),
                       f"{n + 1} does not divide")
    layer = cgbn.CrossGPUBatchNorm2d(CHANNELS, name="bad-input")
    good = torch.randn(2, CHANNELS, HEIGHT, WIDTH)
    flat = torch.randn(2, CHANNELS)
    message = _expect_user_error(lambda: layer(flat if r == n - 1 else good), "bad-input")
    if r == n - 1:
        assert "expected Tensor[N, 3, H, W], got shape (2, 3)" in message, message
    else:
        assert f"rank(s) [{n - 1}]" in message, message
    _expect_user_error(lambda: layer(torch.randn(2, CHANNELS + 1, HEIGHT, WIDTH)), "got shape (2, 4, 3, 5)")
    _expect_user_error(lambda: layer(torch.zeros(0, CHANNELS, HEIGHT, WIDTH)), "has 0 value(s) per channel")
    layer(good).sum().backward()  # the same layer still matches up on every rank
    assert int(layer.num_batches_tracked) == 1
    lonely = cgbn.CrossGPUBatchNorm2d(CHANNELS, group_size=1)
    _expect_user_error(lambda: lonely(torch.zeros(0, CHANNELS, HEIGHT, WIDTH)), "fewer than 2 values per channel")


def body_cgbn(comm):
    torch.set_num_threads(1)
    checked = []
    for group_size in _group_sizes(comm.size):
        for layout, images_per_rank in _batch_layouts(comm.size).items():
            if group_size == 1 and layout == "one empty":
                continue  # a lone empty rank has no statistics: the error is checked in _check_bad_input
            what = f"world {comm.size}, groups of {group_size}, {layout} {images_per_rank}"
            _check_equivalence(comm, group_size, images_per_rank, what)
            checked.append(what)
    # nn.BatchNorm2d takes float64 modules: so must CGBN (batches of 4, 1 and 0 images on 3 ranks).
    _check_equivalence(comm, comm.size, [4, 1, 0, 2][:comm.size], "float64", dtype=torch.float64)
    checked.append("float64")
    _check_stability(comm)
    _check_autocast_bf16(comm)
    _check_eval_communicates_nothing(comm)
    _check_bad_input(comm)
    return {"engines": (comm.engine, comm_mod.get_cgbn().engine), "checked": checked}


@pytest.mark.multirank
@pytest.mark.parametrize("launcher, nprocs, cgbn_engine", [
    ("horovodrun", 2, None), ("horovodrun", 3, None), ("horovodrun", 4, None), ("horovodrun", 2, "torch"),
    ("torch", 2, None), ("torch", 3, None), ("torch", 4, None), ("mpirun", 2, None)])
def test_cgbn_equals_batchnorm_on_the_group_batch(launcher, nprocs, cgbn_engine):
    """cgbn_engine "torch": Horovod for the rest, torch.distributed for CGBN (MEGDET_CGBN_COMM)."""
    env = {"MEGDET_CGBN_COMM": cgbn_engine} if cgbn_engine else None
    values = expect_ok(run_ranks("tests.test_cgbn:body_cgbn", nprocs, launcher, timeout=240, env=env))
    cases = len(_group_sizes(nprocs)) * len(_batch_layouts(nprocs)) - 1 + 1  # no lone empty rank; + float64
    assert all(v == values[0] for v in values) and len(values[0]["checked"]) == cases, values
    engine = ENGINE_OF[launcher]
    assert values[0]["engines"] == (engine, cgbn_engine or engine)


def test_world_of_one_is_plain_batchnorm():
    comm = comm_mod.LocalCommunicator()
    assert cgbn.bn_group(comm, None) is comm.world
    layer, reference = cgbn.CrossGPUBatchNorm2d(CHANNELS), nn.BatchNorm2d(CHANNELS)
    x = torch.randn(4, CHANNELS, HEIGHT, WIDTH)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outputs = [module(xi) for module, xi in zip((layer, reference), xs)]
    for out in outputs:
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(xs[0].grad, xs[1].grad)
    assert torch.equal(layer.weight.grad, reference.weight.grad)
    assert torch.equal(layer.running_var, reference.running_var)


# Every aten op the group arithmetic may run: plain elementwise operations, reductions, views and
# copies, each with CPU and CUDA kernels of the same contract. No batch-norm kernel: their CPU and CUDA
# contracts differ (native_batch_norm_backward's CUDA kernel asserts on what its CPU kernel accepts,
# the SyncBN primitives have no CPU kernels), so a CPU test could not vouch for the GPU.
PLAIN_OPS = {"_to_copy", "add", "add_", "addcmul_", "clamp_min", "clone", "copy_", "detach", "div", "expand",
             "fill_", "mean", "mul", "mul_", "neg", "nonzero", "ones_like", "promote_types", "rsqrt", "select",
             "split_with_sizes", "sub", "sub_", "sum", "view", "zeros", "empty_like", "zeros_like"}


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _group_step(x, grad, dtype=torch.float32, mean=0.0):
    """One training step of the group arithmetic on a group of one (what every member of a real group
    runs; the allreduces return their input) and of float64 nn.BatchNorm2d on the same values, on
    x's device; the layer's parameters in ``dtype``."""
    comm = comm_mod.LocalCommunicator(x.device)
    layer = cgbn.CrossGPUBatchNorm2d(CHANNELS, momentum=MOMENTUM).to(x.device, dtype)
    reference = nn.BatchNorm2d(CHANNELS, momentum=MOMENTUM).to(x.device, torch.float64)
    weight, bias = _affine(seed=5)
    for module in (layer, reference):
        module.weight.data.copy_(weight)
        module.bias.data.copy_(bias)
        module.running_mean.fill_(mean)
    ours = x.clone().requires_grad_()
    with _RecordOps() as recorded:
        y = cgbn._GroupBatchNorm.apply(ours, layer.weight, layer.bias, layer.running_mean, layer.running_var,
                                       MOMENTUM, layer.eps, comm, comm.world, "one", None)
        y.backward(grad)
    exact = x.double().requires_grad_()
    expected = reference(exact)
    expected.backward(grad.double())
    return (y, ours.grad, layer), (expected.detach(), exact.grad, reference), recorded.ops


@pytest.mark.parametrize("dtype, memory_format", [
    (torch.float64, torch.contiguous_format), (torch.float32, torch.contiguous_format),
    (torch.float32, torch.channels_last), (torch.bfloat16, torch.channels_last), (torch.float16, torch.contiguous_format)])
def test_group_arithmetic_is_batchnorm_with_plain_ops_only(dtype, memory_format):
    """The arithmetic every group member runs, in each input dtype and layout, against float64
    nn.BatchNorm2d on the same values; it runs only ops of PLAIN_OPS, so the GPU runs what this checks."""
    generator = torch.Generator().manual_seed(21)
    shape = (3, CHANNELS, 6, 7)
    x = (torch.randn(shape, generator=generator) * 2 + 1).to(dtype).contiguous(memory_format=memory_format)
    grad = torch.randn(shape, generator=generator).to(dtype)
    module_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    (y, x_grad, layer), (expected_y, expected_grad, reference), ops = _group_step(x, grad, module_dtype)
    assert ops <= PLAIN_OPS, f"ops outside PLAIN_OPS: {sorted(ops - PLAIN_OPS)}"
    assert y.dtype == x_grad.dtype == dtype and y.is_contiguous(memory_format=memory_format)
    # statistics and parameter gradients: float32 sums of the exact input values (float64 for float64)
    tight = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else {}
    for ours, theirs, what in ((layer.running_mean, reference.running_mean, "running mean"),
                               (layer.running_var, reference.running_var, "running var"),
                               (layer.weight.grad, reference.weight.grad, "weight grad"),
                               (layer.bias.grad, reference.bias.grad, "bias grad")):
        _close(ours.double(), theirs, what, **tight)
    # output and input gradient: computed in float32 (float64), rounded once to the input's dtype
    rounding = {torch.bfloat16: dict(rtol=8e-3, atol=1e-2), torch.float16: dict(rtol=1e-3, atol=2e-3)}.get(dtype, tight)
    _close(y.double(), expected_y, "output", **rounding)
    _close(x_grad.double(), expected_grad, "input grad", **rounding)


def test_group_arithmetic_keeps_the_variance_at_a_mean_of_1e5_std():
    """float32 values of mean 1e4 and std 0.1 on one rank: the float32 sums of x and x^2 would lose the
    variance; the centred statistics keep it, and the output and gradient, to float32 rounding of x - mean."""
    generator = torch.Generator().manual_seed(8)
    x = 1e4 + 0.1 * torch.randn(4, CHANNELS, 8, 8, generator=generator)
    grad = torch.randn(x.shape, generator=generator)
    (y, x_grad, layer), (expected_y, expected_grad, reference), _ = _group_step(x, grad, mean=1e4)
    _close(layer.running_var.double(), reference.running_var, "running var", rtol=1e-5, atol=0)
    _close(y.double(), expected_y, "output", rtol=1e-5, atol=1e-4)
    _close(x_grad.double(), expected_grad, "input grad", rtol=1e-5, atol=1e-4)


def _model_with_trained_batch_norms():
    """The same small conv + BN model on every call, its BN layers as if trained (eval mode)."""
    torch.manual_seed(3)
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Conv2d(CHANNELS, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, eps=1e-3, momentum=0.05)))
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.weight.data.copy_(torch.rand(4, generator=generator) + 0.5)
            layer.bias.data.copy_(torch.randn(4, generator=generator))
            layer.running_mean.copy_(torch.randn(4, generator=generator))
            layer.running_var.copy_(torch.rand(4, generator=generator) + 0.5)
            layer.num_batches_tracked.fill_(7)
    return model.eval()


def test_convert_model_keeps_weights_and_buffers_in_every_mode():
    x = torch.randn(2, CHANNELS, 6, 6)
    model = _model_with_trained_batch_norms()
    expected = model(x)
    state = model.state_dict()

    frozen = cgbn.convert_model(model, mode="frozen")
    assert [type(m) for m in (frozen[1], frozen[3][1])] == [cgbn.FrozenBatchNorm2d] * 2
    assert frozen[3][1].eps == 1e-3 and not any(p.requires_grad for p in frozen[1].parameters())
    _close(frozen(x), expected, "frozen output")

    loaded = cgbn.convert_model(_model_with_trained_batch_norms(), mode="frozen")
    for layer in loaded.modules():
        if isinstance(layer, cgbn.FrozenBatchNorm2d):
            layer.running_var.fill_(123.0)
    loaded.load_state_dict(state)  # a BatchNorm2d state dict, num_batches_tracked included
    _close(loaded(x), expected, "frozen from a BatchNorm2d state dict")

    crossed = cgbn.convert_model(frozen, mode="cgbn")
    assert isinstance(crossed[3][1], cgbn.CrossGPUBatchNorm2d) and crossed[3][1].name == "cgbn.3.1"
    assert crossed[3][1].momentum == 0.1 and crossed[3][1].weight.requires_grad
    _close(crossed.eval()(x), expected, "cgbn eval output")

    plain = cgbn.convert_model(cgbn.convert_model(_model_with_trained_batch_norms(), mode="cgbn"), mode="bn")
    assert type(plain[3][1]) is nn.BatchNorm2d and plain[3][1].momentum == 0.05 and not plain.training
    assert int(plain[3][1].num_batches_tracked) == 7
    _close(plain(x), expected, "bn round trip output")
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())

    single = cgbn.convert_model(nn.BatchNorm2d(4), mode="frozen")
    assert isinstance(single, cgbn.FrozenBatchNorm2d)
    assert cgbn.convert_model(single, mode="frozen") is single, "a layer of the asked kind stays itself"
    assert cgbn.convert_model(plain, mode="bn")[3][1] is plain[3][1]


def test_convert_model_and_frozen_reject_bad_input_with_the_fix():
    with pytest.raises(ValueError, match="Invalid mode: 'sync'; use one of cgbn, frozen, bn"):
        cgbn.convert_model(nn.BatchNorm2d(4), mode="sync")
    with pytest.raises(ValueError, match="applies to mode 'cgbn' only, not 'frozen'"):
        cgbn.convert_model(nn.BatchNorm2d(4), mode="frozen", group_size=2)
    with pytest.raises(ValueError, match=r"Invalid layer 0: .* affine=False"):
        cgbn.convert_model(nn.Sequential(nn.BatchNorm2d(4, affine=False)), mode="frozen")
    with pytest.raises(ValueError, match=r"expected Tensor\[N, 4, H, W\], got shape \(2, 4\)"):
        cgbn.FrozenBatchNorm2d(4)(torch.randn(2, 4))
    with pytest.raises(UserError, match="dtype torch.int64"):
        cgbn.CrossGPUBatchNorm2d(4)(torch.ones(2, 4, 3, 3, dtype=torch.int64))


def test_frozen_batch_norm_keeps_bf16_under_autocast_and_passes_gradients():
    layer = cgbn.convert_model(_model_with_trained_batch_norms(), mode="frozen")
    x = torch.randn(2, CHANNELS, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


TINY_BENCH = ["--blocks=1", "--channels=4", "--images=2", "--size=8", "--steps=2", "--warmup=1"]


@pytest.mark.multirank
def test_benchmark_runs_once_at_a_tiny_size_on_both_engines(run_megdet, tmp_path):
    """``megdet bench cgbn --ranks 2`` starts horovodrun and torchrun itself; one merged table."""
    skip_unless_launcher("horovodrun")
    done = run_megdet(["bench", "cgbn", "--ranks=2", f"--out={tmp_path}", *TINY_BENCH], timeout=300, threads=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "cgbn.json").read_text())["rows"]
    assert [(r["engine"], r["variant"]) for r in rows] == [
        (engine, variant) for engine in ("horovod", "torch") for variant in ("local BN", "CGBN", "SyncBatchNorm")]
    for row in rows:
        if row["variant"] == "local BN":
            assert row["ratio_to_local_bn"] == 1.0
        elif row["variant"] == "CGBN":
            assert row["ms_per_step"] > 0 and row["exact"] and row["max_error"] <= 1e-4, row
        else:
            assert row["note"].startswith("not run:") or row["ms_per_step"] > 0
    assert "| torch | 2 | cpu | CGBN |" in (tmp_path / "cgbn.md").read_text()


def test_benchmark_needs_two_ranks_and_known_engines(run_megdet):
    for argv, message in ((["--ranks=1"], "Invalid --ranks: 1"), (["--engines=nccl"], "Invalid --engines: 'nccl'")):
        done = run_megdet(["bench", "cgbn", *argv], timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
