"""Host synchronisations of a training step, counted on the real ``Trainer.step`` (with
``Trainer.agree_before_step``) of the demo presets, box and mask, at a tiny size: one per step (the
divergence guard) and, for Mask R-CNN, one more (the positives that size the mask head); none per
layer, image or level. docs/benchmarks.md has the counts before and after.

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_host_syncs.py -s    # prints them by call site

A ``TorchFunctionMode`` sees every call that makes the host read a tensor: ``.item()``, ``.tolist()``,
``.cpu()``, ``.numpy()``, ``.to("cpu")`` from another device, ``bool()``, ``int()``, ``float()`` and
``index()`` of a tensor (``if t.any():`` included), ``nonzero``, one-argument ``torch.where``,
``torch.equal``, ``unique``, ``masked_select`` and indexing with a bool mask. On a GPU each one waits
for it. On the CPU the same calls are made, so the count is the GPU path's, except where the
pure-PyTorch nms/roi_align run because torchvision's compiled kernels do not (the CPU torch here):
their reads are reported apart, by call site. Compiled kernels read inside C++, which no Python-level
count sees (torchvision's CUDA ``nms`` copies its mask to the host); on a GPU the tests below count
CUDA's own synchronisations with ``torch.cuda.set_sync_debug_mode``.
"""
from __future__ import annotations

import collections
import contextlib
import sys
import warnings
from pathlib import Path
from typing import Counter, Dict, Tuple

import pytest
import torch
from torch.overrides import TorchFunctionMode

from hpc import comm as comm_mod
from megdet import config as config_mod
from megdet.engine.build import build_runtime
from megdet.engine.train import Trainer, to_device
from tests.multirank import REPO

STEPS = 3
TINY = ["data.min_sizes=[64]", "data.max_size=64", "data.images_per_rank=2", "data.num_workers=0",
        "solver.batch_size=2", "model.bn_size=2", "data.val="]
# Where the pure-PyTorch kernels read (the CPU path only; torchvision's compiled kernels run on a GPU).
PURE_PYTORCH_SITES = {("megdet/model/ops.py", "nms_pytorch"), ("megdet/model/ops.py", "batched_nms_pytorch"),
                      ("megdet/model/ops.py", "roi_align_pytorch"),
                      ("megdet/model/roi_heads.py", "MultiScaleRoIAlign._pool_by_level")}
GUARD = ("hpc/distributed.py", "DistributedOptimizer._agree_nonfinite")
MASK_POSITIVES = ("megdet/model/roi_heads.py", "RoIHeads.mask_losses")

Site = Tuple[str, str]


def _reads(func, args) -> str:
    """The kind of host read that calling ``func`` on ``args`` is, or "" for none."""
    tensor_methods = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.cpu: "cpu",
                      torch.Tensor.numpy: "numpy", torch.Tensor.__bool__: "bool", torch.Tensor.__int__: "int",
                      torch.Tensor.__float__: "float", torch.Tensor.__index__: "index",
                      torch.Tensor.nonzero: "nonzero", torch.nonzero: "nonzero", torch.equal: "equal",
                      torch.Tensor.unique: "unique", torch.unique: "unique",
                      torch.unique_consecutive: "unique", torch.Tensor.unique_consecutive: "unique",
                      torch.masked_select: "masked_select", torch.Tensor.masked_select: "masked_select"}
    if func in tensor_methods:
        return tensor_methods[func]
    if func is torch.where and len(args) == 1:
        return "nonzero"
    if func is torch.Tensor.to and args[0].device.type != "cpu" and any(_is_cpu(a) for a in args[1:]):
        return "cpu"
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _has_mask(args[1]):
        return "mask index"
    return ""


def _is_cpu(value) -> bool:
    return (isinstance(value, torch.device) and value.type == "cpu") or value == "cpu"


def _has_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype in (torch.bool, torch.uint8) for p in parts)


def _call_site(frame) -> Site:
    """(path in the repository, qualified function) of the innermost frame from ``frame`` outwards that runs
    the repository's code (torch's and torchvision's own are looked through)."""
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(REPO) and ".venv" not in path.parts:
            return path.relative_to(REPO).as_posix(), frame.f_code.co_qualname
        frame = frame.f_back
    return "?", "?"


def _in_pure_pytorch_kernel(frame) -> bool:
    """Whether ``frame`` runs inside one of ``PURE_PYTORCH_SITES`` (a helper of theirs included)."""
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(REPO) and (path.relative_to(REPO).as_posix(),
                                          frame.f_code.co_qualname) in PURE_PYTORCH_SITES:
            return True
        frame = frame.f_back
    return False


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors by call site while active; ``pure`` holds the sites reached from the
    pure-PyTorch kernels."""

    def __init__(self):
        super().__init__()
        self.sites: Counter[Site] = collections.Counter()
        self.kinds: Dict[Site, set] = collections.defaultdict(set)
        self.pure: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _reads(func, args)
        if kind:
            caller = sys._getframe(1)
            site = _call_site(caller)
            self.sites[site] += 1
            self.kinds[site].add(kind)
            if _in_pure_pytorch_kernel(caller):
                self.pure.add(site)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def shards(shapes_shards):
    """The session's training shards (tests/conftest.py)."""
    return shapes_shards / "train"


def run_steps(config: str, shards: Path, out: Path, device: str, counting) -> None:
    """``STEPS`` iterations (``agree_before_step`` and ``Trainer.step``) on one rank of ``config`` on ``device``,
    each inside the context manager ``counting()`` returns; the loader's work stays outside."""
    cfg = config_mod.load(config, [*TINY, f"data.train={shards}", f"train.output_dir={out}", f"train.device={device}"])
    trainer = Trainer(cfg, comm_mod.init("local"), build_runtime(cfg))
    try:
        batches = iter(trainer.loader())
        for iteration in range(STEPS):
            (images, targets, _, _), _, _, error = next(batches)
            assert error is None, error
            micro_batches = [to_device(images, targets, trainer.device)]
            with counting():
                trainer.agree_before_step(None)
                trainer.step(iteration, micro_batches)
        assert trainer.optimizer.skipped_steps == 0
    finally:
        trainer.stop.restore()


def count_step_reads(config: str, shards: Path, out: Path) -> HostReads:
    """Host reads of ``STEPS`` iterations on one CPU rank of ``config``, by call site."""
    reads = HostReads()
    run_steps(config, shards, out, "cpu", lambda: reads)
    return reads


def report(name: str, reads: HostReads) -> str:
    lines = [f"{name}: host reads per step, by call site ({STEPS} steps)"]
    for site, count in reads.sites.most_common():
        where = "pure-PyTorch kernels (CPU only)" if site in reads.pure else "every device"
        lines.append(f"  {count / STEPS:6.2f}  {site[0]}:{site[1]} ({', '.join(sorted(reads.kinds[site]))}) - {where}")
    return "\n".join(lines)


@pytest.mark.parametrize("config, expected", [
    ("shapes_r18_cpu", {GUARD: 1}),
    ("shapes_mask_r18_cpu", {GUARD: 1, MASK_POSITIVES: 1}),
])
def test_a_training_step_reads_the_device_once_plus_once_for_mask_rcnn(shards, tmp_path, config, expected):
    reads = count_step_reads(config, shards, tmp_path / "run")
    print("\n" + report(config, reads))
    every_device = {site: count / STEPS for site, count in reads.sites.items() if site not in reads.pure}
    assert every_device == expected, report(config, reads)
    assert reads.kinds[GUARD] == {"tolist"}


@contextlib.contextmanager
def cuda_syncs(sites: Counter[Site]):
    """CUDA's own count, by call site: every synchronising CUDA call (a copy to the host, a blocking copy
    to the GPU, a stream wait) warns, at once, from where it is made."""
    def count(message, *_):
        if "synchronizing" in str(message):
            sites[_call_site(sys._getframe(1))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = count
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA's sync debug mode sees the real waits")
@pytest.mark.parametrize("config, expected", [
    ("shapes_r18_cpu", {GUARD: 1}),
    ("shapes_mask_r18_cpu", {GUARD: 1, MASK_POSITIVES: 1}),
])
def test_on_a_gpu_the_step_waits_for_it_at_the_same_places(shards, tmp_path, config, expected):
    """The same steps on the GPU under ``torch.cuda.set_sync_debug_mode``, which also sees what the mode
    above cannot (a blocking copy to the GPU, a compiled kernel's own copy to the host): the reads
    above, and the RPN's NMS, whose compiled kernel returns as many indices as it keeps, so each
    image's NMS waits a fixed number of times inside torchvision."""
    sites: Counter[Site] = collections.Counter()
    run_steps(config, shards, tmp_path / "run", "cuda", lambda: cuda_syncs(sites))
    print(f"\n{config} on {torch.cuda.get_device_name()}: CUDA synchronisations per step, by call site "
          f"({STEPS} steps)\n" + "\n".join(f"  {count / STEPS:6.2f}  {site[0]}:{site[1]}"
                                         for site, count in sites.most_common()))
    per_step = {site: count / STEPS for site, count in sites.items()}
    nms_per_image = per_step.pop(("megdet/model/ops.py", "batched_nms"), 0) / 2  # 2 images per step
    assert per_step == expected, sites
    assert nms_per_image >= 1 and nms_per_image == int(nms_per_image), sites


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))])
def test_the_torch_engine_moves_host_tensors_without_the_gpu(device):
    """The torch engine on one rank of ``device``: under NCCL it starts eagerly on this GPU (``device_id``),
    every group has a gloo twin, and the collectives of CPU tensors (the data flag, pickled objects, the
    lengths of a gather) run on the twin without waiting for the GPU; under gloo the twin is the group."""
    import torch.distributed as dist

    from hpc.comm.local import LocalCommunicator
    from hpc.comm.torchdist import TorchCommunicator
    from hpc.launch import Launch

    device = torch.device(device, 0) if device == "cuda" else torch.device(device)
    comm = TorchCommunicator(Launch("torchrun", 1, 0, 0, 1, None), 60.0, device, via=LocalCommunicator(device))
    try:
        world = comm.world.handle
        group = comm._new_group((0,))  # a BN group's process groups: split from the world's under NCCL
        if device.type == "cuda":
            assert comm.backend == "nccl" and dist.group.WORLD.bound_device_id == device
            assert dist.get_backend(world.host) == dist.get_backend(group.host) == "gloo"
            assert dist.get_backend(group.device) == "nccl"
        else:
            assert comm.backend == "gloo" and world.host is world.device and group.host is group.device
        counting = cuda_syncs if device.type == "cuda" else lambda sites: contextlib.nullcontext()
        sites: Counter[Site] = collections.Counter()
        with counting(sites):
            flag = comm._allreduce_async(torch.tensor([1.0]), "sum", comm.world, "data_failed").wait()
            gathered = comm._allgather(torch.arange(3), comm.world)
            broadcast = comm._broadcast(torch.arange(2), 0, comm.world)
            on_device = comm._allreduce_async(torch.ones(2, device=device), "average", comm.world, None).wait()
        assert not sites, sites
        assert flag.device.type == "cpu" and flag.item() == 1.0
        assert gathered.tolist() == [0, 1, 2] and broadcast.tolist() == [0, 1]
        assert on_device.device == device and on_device.tolist() == [1.0, 1.0]
    finally:
        comm.shutdown()


def test_the_counter_sees_each_kind_of_read():
    """The mode counts what it claims to, so that a zero above means none was made."""
    values = torch.tensor([0.0, 2.0, 0.0])
    reads = HostReads()
    with reads:
        values.sum().item()
        values.tolist()
        values.cpu()
        bool(values.any())
        if values.all():
            pass
        int(values[1])
        float(values[1])
        [1, 2, 3][values[1].long()]
        values.nonzero()
        torch.nonzero(values)
        torch.where(values > 0)
        torch.equal(values, values)
        values.unique()
        values[values > 0]
        values[values > 0] = 1.0
        torch.where(values > 0, values, 0.0)   # no read: shapes only
        values.masked_fill(values > 0, 0.0)    # no read
    assert dict(reads.sites) == {(Path(__file__).relative_to(REPO).as_posix(),
                                  "test_the_counter_sees_each_kind_of_read"): 15}, reads.sites
