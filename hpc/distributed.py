"""Data-parallel training: gradients averaged across ranks, gradient accumulation, and a divergence guard.

    horovodrun --gloo -np 8 -H localhost:8 python train.py       # Horovod, tensor fusion
    MEGDET_COMM=torch torchrun --nproc-per-node 8 train.py       # torch.distributed, bucketed allreduce

    comm = hpc.comm.init()
    optimizer = DistributedOptimizer(PMDLAMB(param_groups(model, weight_decay=5e-4), lr=lr), model,
                                     batch_size=images_per_step, backward_passes_per_step=2)
    for iteration in range(schedule.max_iter):
        for group in optimizer.optimizer.param_groups:
            group["lr"] = schedule.lr_at(iteration)              # hpc.schedule: a pure function
        for images, targets in micro_batches:                    # backward_passes_per_step of them
            optimizer.backward(model(images, targets))           # loss scaled by 1 / passes
        optimizer.step()                                         # False when the step was skipped
        optimizer.zero_grad()

Engines (``hpc.comm``): horovod wraps the optimizer in Horovod's ``DistributedOptimizer`` (gradient
allreduces named by parameter, fused by Horovod's tensor fusion); torch reduces gradients in buckets
of about ``bucket_mb`` MiB with ``comm.allreduce_async``, launched from gradient hooks during the
backward pass in the same bucket order on every rank; local does no communication. Every engine
averages the gradients, so a step over N ranks x B images equals one over N*B images on one rank.

At construction the parameters, buffers and optimizer state of rank 0 are broadcast to every rank.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from hpc import comm as comm_mod
from hpc.amp import LossScaler
from hpc.errors import UserError
from hpc.options import COMPRESSIONS

# Five skipped steps in a row: a transient overflow skips one or two; a diverged run skips every one.
DEFAULT_MAX_CONSECUTIVE_SKIPS = 5
# DDP's default bucket size.
DEFAULT_BUCKET_MB = 25
MIB = 1 << 20


class DivergenceError(UserError):
    """The loss or the gradients stayed non-finite for too many steps in a row."""


def broadcast_model_and_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                                  comm: comm_mod.Communicator, root: int = 0) -> None:
    """Overwrite every rank's parameters, buffers (BN running statistics) and optimizer state
    (moments, step counters, hyper-parameters) with global rank ``root``'s. Collective."""
    if comm.size == 1:
        return
    tensors = [p.data for p in model.parameters()] + list(model.buffers())
    for same_kind in _by_dtype_and_device(tensors):
        flat = comm.broadcast(_flatten_dense_tensors(same_kind), root=root)
        for tensor, value in zip(same_kind, _unflatten_dense_tensors(flat, same_kind)):
            tensor.copy_(value)
    # On the CPU for the trip: a pickled CUDA tensor unpickles on the sender's GPU index, on every rank.
    state = comm.broadcast_object(on_cpu(optimizer.state_dict()) if comm.rank == root else None, root=root)
    if comm.rank != root:
        optimizer.load_state_dict(state)  # moves each state tensor to its parameter's device


def on_cpu(value):
    """``value`` (nested dicts, lists and tuples) with every tensor copied to the CPU."""
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def _by_dtype_and_device(tensors: List[Tensor]) -> List[List[Tensor]]:
    """``tensors`` split into lists of one dtype and device each, order kept within each list."""
    kinds: Dict[tuple, List[Tensor]] = {}
    for tensor in tensors:
        kinds.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    return list(kinds.values())


class _BucketedAllreduce:
    """Averages gradients in buckets over the torch engine while the backward pass runs.

    Buckets hold about ``bucket_bytes`` of gradients of one dtype, filled in reverse parameter order
    (the order backward produces them). A bucket is launched when all its gradients are ready and
    every earlier bucket has been launched, so all ranks issue the same collectives in the same order.
    """

    def __init__(self, comm: comm_mod.Communicator, params: List[nn.Parameter], bucket_bytes: int, fp16: bool):
        self.comm, self.fp16 = comm, fp16
        self.buckets: List[List[nn.Parameter]] = []
        for same_kind in _by_dtype_and_device(list(reversed(params))):
            bucket, size = [], 0
            for param in same_kind:
                if bucket and size + param.numel() * param.element_size() > bucket_bytes:
                    self.buckets.append(bucket)
                    bucket, size = [], 0
                bucket.append(param)
                size += param.numel() * param.element_size()
            self.buckets.append(bucket)
        self._bucket_of = {param: index for index, bucket in enumerate(self.buckets) for param in bucket}
        self.armed = False  # set during the last backward pass of a step
        self._reset()
        for param in params:
            param.register_post_accumulate_grad_hook(self._on_gradient)

    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._next = 0
        self._flights: List[tuple] = []

    def _on_gradient(self, param: nn.Parameter) -> None:
        if not self.armed:
            return
        self._ready[self._bucket_of[param]] += 1
        while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
            self._launch(self._next)

    def _launch(self, index: int) -> None:
        grads = [p.grad for p in self.buckets[index]]
        flat = _flatten_dense_tensors(grads)
        if self.fp16:
            flat = flat.to(torch.float16)
        handle = self.comm.allreduce_async(flat, op="average", name=f"grad_bucket.{index}")
        self._flights.append((handle, grads))
        self._next = index + 1

    def synchronize(self) -> None:
        """Launch the buckets not launched yet (a parameter without a gradient contributes zeros, as
        it may have one on another rank), wait for all, and write the averages into ``.grad``."""
        for index in range(self._next, len(self.buckets)):
            for param in self.buckets[index]:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            self._launch(index)
        for handle, grads in self._flights:
            averaged = handle.wait()
            for grad, value in zip(grads, _unflatten_dense_tensors(averaged, grads)):
                grad.copy_(value)
        self._reset()


class DistributedOptimizer:
    """Wraps ``optimizer`` for data-parallel training of ``model``; see the module docstring.

    batch_size: images per optimizer step over all ranks and passes (for the divergence message).
    backward_passes_per_step: k micro-batches accumulated per step; ``backward`` divides the loss by k,
    so the step sees the gradient of the mean loss over all k micro-batches of all ranks.
    compression: "fp16" sends gradients as float16 (half the bytes) and restores their dtype after.
    max_consecutive_skips: K. A step whose loss (on any rank) or averaged gradient is non-finite is
    skipped on every rank (the ranks agree through one two-element allreduce, the step's only host
    synchronisation) and counted in ``skipped_steps``; K skipped steps in a row raise
    ``DivergenceError`` on every rank.
    loss_scaler: fp16's dynamic loss scale (``hpc.amp.LossScaler``). ``backward`` multiplies the loss
    by it; after the allreduce the gradients are divided by it. A step whose loss is finite on every
    rank but whose gradients overflow (on any rank: the average carries the inf to every rank) is an
    overflow, not a divergence: it is skipped on every rank, counted in ``overflow_steps``, and the
    scale halves everywhere. Only once the scale is at its minimum do overflows count towards K.
    iteration: the index of the next step (set it when resuming, for the messages).

    ``optimizer`` is the one that steps (on Horovod, Horovod's wrapper around the one passed in,
    sharing its param groups and state): attach LR schedulers to it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, *, batch_size: int,
                 comm: Optional[comm_mod.Communicator] = None, backward_passes_per_step: int = 1,
                 compression: str = "none", max_consecutive_skips: int = DEFAULT_MAX_CONSECUTIVE_SKIPS,
                 bucket_mb: float = DEFAULT_BUCKET_MB, loss_scaler: Optional[LossScaler] = None):
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (images per step over all ranks, >= 1)")
        if backward_passes_per_step < 1:
            raise ValueError(f"Invalid backward_passes_per_step: {backward_passes_per_step} (must be >= 1)")
        if compression not in COMPRESSIONS:
            raise ValueError(f"Invalid compression: {compression!r} (use one of {', '.join(COMPRESSIONS)})")
        if max_consecutive_skips < 1:
            raise ValueError(f"Invalid max_consecutive_skips: {max_consecutive_skips} (must be >= 1)")
        if bucket_mb <= 0:
            raise ValueError(f"Invalid bucket_mb: {bucket_mb} (must be > 0)")
        self.comm = comm if comm is not None else comm_mod.get()
        self.batch_size, self.backward_passes_per_step = batch_size, backward_passes_per_step
        self.max_consecutive_skips = max_consecutive_skips
        self.loss_scaler = loss_scaler
        self.iteration = self.skipped_steps = self.consecutive_skips = self.overflow_steps = 0
        self._passes = 0
        self._synchronized = False  # this step's gradients are averaged already
        self._loss_nonfinite: Optional[Tensor] = None  # on the loss's device: no synchronisation per pass

        broadcast_model_and_optimizer(model, optimizer, self.comm)
        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError(f"Invalid model: {type(model).__name__} has no trainable parameters")
        self._horovod = self.comm.engine == "horovod" and self.comm.size > 1
        self._buckets = None
        if self._horovod:
            hvd = self.comm.hvd
            wrapped = hvd.DistributedOptimizer(
                optimizer, named_parameters=list(model.named_parameters()),
                compression=hvd.Compression.fp16 if compression == "fp16" else hvd.Compression.none,
                backward_passes_per_step=backward_passes_per_step, op=hvd.Average)
            wrapped.state = optimizer.state  # Horovod builds a new optimizer on the same param groups
            self.optimizer = wrapped
        else:
            self.optimizer = optimizer
            if self.comm.size > 1:
                self._buckets = _BucketedAllreduce(self.comm, self._params, int(bucket_mb * MIB),
                                                   fp16=compression == "fp16")

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss / backward_passes_per_step`` (the mean over this micro-batch; times the
        loss scale under fp16), noting on the loss's device whether it is finite. Call it exactly
        backward_passes_per_step times per ``step()``."""
        if self._passes == self.backward_passes_per_step:
            raise UserError(f"backward() was called {self._passes + 1} times before step(), but "
                            f"backward_passes_per_step is {self.backward_passes_per_step}: call step() after "
                            f"every {self.backward_passes_per_step} micro-batches or raise backward_passes_per_step")
        nonfinite = ~torch.isfinite(loss.detach()).all()
        self._loss_nonfinite = nonfinite if self._loss_nonfinite is None else self._loss_nonfinite | nonfinite
        self._passes += 1
        if self._buckets is not None:
            self._buckets.armed = self._passes == self.backward_passes_per_step
        if self.loss_scaler is not None:
            loss = self.loss_scaler.scale_loss(loss)
        (loss / self.backward_passes_per_step).backward()

    def _check_passes(self, caller: str) -> None:
        if self._passes != self.backward_passes_per_step:
            raise UserError(f"{caller}() after {self._passes} backward() calls, but backward_passes_per_step is "
                            f"{self.backward_passes_per_step}: call backward() once per micro-batch")

    def synchronize(self) -> None:
        """Wait for the gradient allreduces that the last backward pass launched (launching any it did
        not), leaving the averaged gradients in ``.grad``. ``step()`` calls it unless it was called since
        the last ``backward()``; call it yourself only to time the communication apart."""
        self._check_passes("synchronize")
        if self._synchronized:
            return
        if self._horovod:
            self.optimizer.synchronize()
        elif self._buckets is not None:
            self._buckets.synchronize()
        self._synchronized = True

    def step(self) -> bool:
        """Average the gradients (``synchronize``), then step unless some rank's loss or the averaged
        gradient is not finite. Returns whether the parameters were updated; raises ``DivergenceError``
        on every rank after ``max_consecutive_skips`` skipped steps in a row."""
        self._check_passes("step")
        self.synchronize()
        loss_nonfinite, grads_nonfinite = self._agree_nonfinite()
        finite = not (loss_nonfinite or grads_nonfinite)
        scaler = self.loss_scaler
        overflow = scaler is not None and grads_nonfinite and not loss_nonfinite
        if finite:
            if scaler is not None:
                scaler.unscale_([p.grad for p in self._params if p.grad is not None])
            if self._horovod:
                with self.optimizer.skip_synchronize():
                    self.optimizer.step()
            else:
                self.optimizer.step()
            self.consecutive_skips = 0
        else:
            self.skipped_steps += 1
            if overflow:
                self.overflow_steps += 1
            if not overflow or scaler.at_minimum:
                self.consecutive_skips += 1
        if scaler is not None and not loss_nonfinite:
            scaler.update(overflow=overflow)
        iteration = self.iteration
        self.iteration += 1
        self._passes = 0
        self._synchronized = False
        self._loss_nonfinite = None
        if self.consecutive_skips >= self.max_consecutive_skips:
            lr = max(group["lr"] for group in self.optimizer.param_groups)
            fp16 = "" if scaler is None else f" (fp16 loss scale {scaler.scale:g})"
            raise DivergenceError(
                f"training diverged: the loss or gradients were not finite{fp16} for {self.consecutive_skips} steps "
                f"in a row, the last at iteration {iteration} (learning rate {lr:g}, batch size {self.batch_size}): "
                "lower the learning rate or lengthen the warm-up (the linear scaling rule fails from batch 64 "
                "without BN, MegDet Table 2, and at 512 even with SyncBN, LargeDet Table 1), or train with PMD-LAMB")
        return finite

    def _agree_nonfinite(self) -> Tuple[bool, bool]:
        """(some rank's loss was not finite, the averaged gradients are not finite), the same on every
        rank: both flags are made on the device and reduced together, then read once."""
        grads = [p.grad for p in self._params if p.grad is not None]
        loss_nonfinite = self._loss_nonfinite.to(self._params[0].device)
        # The max-abs norm is NaN or inf exactly when some element is, and cannot overflow.
        grads_nonfinite = ~torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all() if grads \
            else torch.zeros_like(loss_nonfinite)
        flags = self.comm.allreduce(torch.stack((loss_nonfinite, grads_nonfinite)).float(), op="sum",
                                    name="divergence_guard")
        loss_flag, grads_flag = (flags > 0).tolist()
        return loss_flag, grads_flag

    def zero_grad(self) -> None:
        """Set every gradient to None (Horovod's wrapper takes no arguments)."""
        self.optimizer.zero_grad()

    def state_dict(self) -> Dict:
        """The optimizer's state, the guard's counters and the loss scale."""
        return {"optimizer": self.optimizer.state_dict(), "iteration": self.iteration,
                "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "overflow_steps": self.overflow_steps,
                "loss_scaler": None if self.loss_scaler is None else self.loss_scaler.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        """Restore ``state_dict()``; a loss scale is restored when both the state and this optimizer
        have one (a run resumed under another amp mode starts its scale afresh)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration, self.skipped_steps = state["iteration"], state["skipped_steps"]
        self.consecutive_skips = state["consecutive_skips"]
        self.overflow_steps = state.get("overflow_steps", 0)
        if self.loss_scaler is not None and state.get("loss_scaler") is not None:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
