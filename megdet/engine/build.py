"""The builders that read a ``Config``: the rank's runtime (device, mixed precision), the model, the
optimizer, the schedule, the run folder. Training and evaluation both build through here; every
component they build takes explicit arguments and never sees the config.

    runtime = build_runtime(cfg)                # before any CUDA or NCCL work: picks this rank's GPU
    comm = init_rank(runtime.device)
    model = build_model(cfg).to(runtime.device)
    with runtime.autocast():
        losses = model(images, targets)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from hpc import amp, device as device_mod, launch
from hpc import comm as comm_mod
from hpc.errors import UserError
from hpc.optim import LAMB, LARS, PMDLAMB, param_groups
from hpc.schedule import Schedule
from megdet import config as config_mod
from megdet.model import build_detector
from megdet.specs import LAYER_ADAPTATION
from megdet.weights import default_freeze_at



@dataclass(frozen=True)
class Runtime:
    """Where and how this rank computes: ``device`` (its GPU or the CPU) and ``amp`` (the autocast
    dtype, None for float32)."""

    device: torch.device
    amp: Optional[torch.dtype]

    def autocast(self):
        return amp.autocast(self.device, self.amp)

    @property
    def loss_scaling(self) -> bool:
        """fp16 needs a dynamic loss scale (``hpc.amp.LossScaler``); bf16 and float32 do not."""
        return self.amp == torch.float16


def build_runtime(cfg: config_mod.Config) -> Runtime:
    """This rank's device (``train.device``, made current) and autocast dtype (``train.amp``).
    Call it before starting the communicator: the torch engine runs NCCL on that device. A device
    that cannot be had is an error on every rank (``hpc.comm.raise_on_every_rank``)."""
    try:
        device = device_mod.select(cfg.train.device)
        return Runtime(device, amp.resolve(cfg.train.amp, device))
    except UserError as error:
        comm_mod.raise_on_every_rank(error)


def init_rank(device: torch.device = torch.device("cpu")) -> comm_mod.Communicator:
    """Start the communicator on ``device`` and share the host's cores out between its ranks."""
    comm = comm_mod.init(device=device)
    threads = launch.threads_per_rank(comm.local_size)
    if threads is not None:
        torch.set_num_threads(threads)
    return comm


def loader_workers(cfg: config_mod.Config, comm: comm_mod.Communicator) -> int:
    """Data-loading processes per rank: ``data.num_workers``, or (null) one per CPU the launcher gives
    the rank, less one for the training process."""
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    return launch.loader_workers(comm.local_size)


def build_model(cfg: config_mod.Config, *, inference: bool = False) -> torch.nn.Module:
    """The detector of ``cfg.model``, on the CPU (a collective under cross-GPU BN: call it on every rank).

    inference: for evaluation only. Batch norm in eval mode uses the running statistics, so cross-GPU
    BN (backbone and mask head) becomes plain BN (same parameters and buffers) and any number of ranks
    can evaluate; the ImageNet weights are not loaded (the checkpoint overwrites them), but the stages
    they freeze are frozen alike, so the checkpoint's keys match.
    """
    spec = cfg.model
    model = build_detector(spec.name, num_classes=spec.num_classes, norm=_layer_norm(spec.norm, inference),
                           group_size=None if inference else cfg.bn_groups.group_size,
                           backbone_weights=None if inference else spec.backbone_weights,
                           freeze_at=default_freeze_at(spec.backbone_weights is not None),
                           sublinear_stages=tuple(spec.sublinear_stages), **model_settings(cfg, inference))
    # Activations only: channels-last weights would give channels-last gradients, which Horovod refuses.
    model.channels_last = cfg.train.channels_last
    return model


def model_settings(cfg: config_mod.Config, inference: bool = False) -> Dict:
    """The detector settings that ``cfg.model`` and ``cfg.eval`` give, each config key passed to the
    detector's keyword (``megdet.model.settings.DEFAULTS``) by name here, lists as tuples; a null key is
    left out and keeps the named model's value. A cross-GPU BN mask head is plain BN for ``inference``."""
    model, evaluation = cfg.model, cfg.eval
    given = dict(anchor_sizes=_tuple(model.anchor_sizes), fpn_channels=model.fpn_channels,
                 rpn_pre_nms_topk=_tuple(model.rpn_pre_nms_topk), rpn_post_nms_topk=_tuple(model.rpn_post_nms_topk),
                 roi_batch_size_per_image=model.roi_batch_size_per_image,
                 roi_positive_fraction=model.roi_positive_fraction, box_head_dim=model.box_head_dim,
                 mask_on=model.mask_on, mask_head_channels=model.mask_head_channels,
                 mask_head_convs=model.mask_head_convs, mask_head_norm=_layer_norm(model.head_norm, inference),
                 score_threshold=evaluation.score_threshold, nms_threshold=evaluation.nms_threshold,
                 detections_per_image=evaluation.detections_per_image)
    return {key: value for key, value in given.items() if value is not None}


def _tuple(values: Optional[List]) -> Optional[Tuple]:
    return None if values is None else tuple(values)


def _layer_norm(norm: Optional[str], inference: bool) -> Optional[str]:
    """The norm a layer is built with: cross-GPU BN is plain BN for inference (eval mode reads only the
    running statistics)."""
    return "bn" if inference and norm == "cgbn" else norm


def build_optimizer(cfg: config_mod.Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``cfg.solver.optimizer`` over ``model``'s parameters, no weight decay on norm and bias parameters."""
    solver = cfg.solver
    groups = param_groups(model, weight_decay=solver.weight_decay)
    for group in groups:
        group["layer_adaptation"] = group["name"] in LAYER_ADAPTATION[solver.layer_adaptation]
    if solver.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=solver.lr, momentum=solver.momentum)
    if solver.optimizer == "pmd_lamb":
        return PMDLAMB(groups, lr=solver.lr, alpha=solver.pmd_alpha, T=solver.pmd_cycle, betas=tuple(solver.betas),
                       weight_decay=solver.weight_decay, eps=solver.eps, compiled=solver.pmd_kernel == "compiled")
    if solver.optimizer == "lamb":
        return LAMB(groups, lr=solver.lr, betas=tuple(solver.betas), weight_decay=solver.weight_decay, eps=solver.eps)
    return LARS(groups, lr=solver.lr, momentum=solver.momentum, weight_decay=solver.weight_decay)


def build_schedule(cfg: config_mod.Config) -> Schedule:
    solver = cfg.solver
    return Schedule(lr=solver.lr, max_iter=solver.max_iter, steps=tuple(solver.steps),
                    decay_factors=tuple(solver.decay_factors), warmup_iters=solver.warmup_iters,
                    warmup_factor=solver.warmup_factor)


def run_dir(cfg: config_mod.Config) -> Path:
    return Path(cfg.train.output_dir or Path("runs") / cfg.name)
