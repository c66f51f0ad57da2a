"""What a run is made of, one spec per component family, as plain data without torch: the detector
(``ModelSpec``), its cross-GPU BN groups (``BNGroups``), the data (``DataSpec``), the optimizer and its
schedule (``SolverSpec``), the run (``TrainSpec``), evaluation (``EvalSpec``) and the model identity a
checkpoint carries (``CheckpointIdentity``).

    spec = ModelSpec(name="resnet18_fpn", num_classes=3)
    spec.check()                        # UserError naming the key and the fix, or nothing
    BNGroups(norms=("cgbn",), bn_size=8, images_per_rank=2).group_size    # 4 ranks per group

Each rule a user's values must meet is written once, in its spec's ``check()``; ``megdet.config`` parses
YAML and overrides into these specs and calls the checks; ``megdet.engine.build`` maps them onto the
constructors' keyword arguments, which then only assert their tensor contracts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from hpc.errors import UserError
from hpc.options import AMP_MODES, COMPRESSIONS, DEVICE_KINDS
from hpc.schedule import DEFAULT_WARMUP_FACTOR, POLICIES, decay_factors
from megdet import weights
from megdet.model.settings import DEFAULT_NORM, LEVEL_STRIDES, MODEL_NAMES, NORMS
from megdet.model.settings import PRESETS as MODEL_PRESETS

OPTIMIZERS = ("sgd", "pmd_lamb", "lamb", "lars")
# hpc.optim.PMDLAMB's kernels: one multi-tensor op per line of Algorithm 1 (any device), or torch.compile'd
# per tensor (CPU only, needs a C++ compiler; its cost against SGD's step is in docs/benchmarks.md).
PMD_KERNELS = ("multi_tensor", "compiled")
TARGET_METRICS = ("AP", "AP50", "AP75")  # COCO numbers a train.target_ap may name (box; mask as mask_...)
# solver.layer_adaptation: which param groups (hpc.optim.param_groups) take LAMB's ratio ||x|| / ||u||.
LAYER_ADAPTATION = {"all": ("weights", "norm", "bias"), "weights": ("weights",)}


def choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not one of {', '.join(choices)}: choose one of them")


def positive(key: str, value) -> None:
    if value is None or value <= 0:
        raise UserError(f"{key}={value} must be positive")


@dataclass
class PaperSpec:
    """Which published result the preset reproduces, and what the paper reports for it."""

    row: str = ""                         # e.g. "MegDet Table 3, batch 256, BN size 32"
    gpus: int = 1
    gpus_per_node: int = 1
    expected_time: str = ""               # training time the paper reports, e.g. "12 min"
    box_ap: Optional[float] = None        # COCO box AP@[.5:.95] the paper reports (percent); null: failed
                                          # (or not a COCO row)
    open_images_map50: Optional[float] = None  # Open Images mAP@0.5 the paper reports (percent), its Table 5
    gpu_memory_gb: Optional[float] = None  # memory of one paper GPU (megdet job's --gpu-memory); null: CPU


@dataclass
class ModelSpec:
    """The detector: ``model.*``."""

    name: str = "resnet50_fpn"            # one of megdet.model.settings.MODEL_NAMES
    num_classes: Optional[int] = 80       # foreground classes; labels are 1..num_classes; null: the training
                                          # shards' category count (their manifest), filled in at the start
    norm: str = DEFAULT_NORM              # one of NORMS; cgbn = cross-GPU batch norm over bn_size images;
                                          # frozen (fixed statistics and affine) only on backbone_weights
    bn_size: Optional[int] = None         # images per cross-GPU BN group (cgbn only); None: all ranks
    bn_node_local: bool = False           # refuse a launch where a BN group spans nodes (MegDet Sec. 3.3)
    # ImageNet weights of the backbone: "torchvision:resnet50" (torch hub's cache, megdet.weights)
    # or a file path; None: random init. With weights the stem and res2 are frozen (detectron2 FREEZE_AT
    # 2); without, nothing is, and model.norm=frozen is refused unless allow_frozen_random is true.
    backbone_weights: Optional[str] = None
    allow_frozen_random: bool = False     # model.norm=frozen without weights: keep BN at its initial values
    sublinear_stages: List[str] = field(default_factory=list)  # stages recomputed in backward (memory)
    # The detector's own settings (megdet.engine.build.model_settings passes each to the keyword of
    # megdet.model.settings.DEFAULTS of the same name); None (the default): the named model's value there,
    # the one place those values are written.
    anchor_sizes: Optional[List[int]] = None          # anchor side in pixels on P2..P6
    fpn_channels: Optional[int] = None                # FPN and RPN head width
    rpn_pre_nms_topk: Optional[List[int]] = None      # [train, test] proposals kept per level before NMS
    rpn_post_nms_topk: Optional[List[int]] = None     # [train, test] proposals kept per image after NMS
    roi_batch_size_per_image: Optional[int] = None    # RoIs sampled per image for the box head
    roi_positive_fraction: Optional[float] = None     # at most this share of them foreground
    box_head_dim: Optional[int] = None                # width of the box head's two FC layers
    mask_on: Optional[bool] = None                    # Mask R-CNN's mask branch (model mask_rcnn_r50_fpn: on)
    mask_head_channels: Optional[int] = None          # width of the mask head's 3x3 convs
    mask_head_convs: Optional[int] = None             # how many, before the 2x deconv
    mask_head_norm: Optional[str] = None              # one of NORMS after each of them; null: none

    @property
    def with_masks(self) -> bool:
        """Whether the model has Mask R-CNN's branch: ``mask_on``, else the named model's."""
        return self.mask_on if self.mask_on is not None else MODEL_PRESETS[self.name]["mask_on"]

    @property
    def head_norm(self) -> Optional[str]:
        """The mask head's norm: ``mask_head_norm``, else the named model's (None: no norm)."""
        given = self.mask_head_norm
        return given if given is not None else MODEL_PRESETS[self.name]["mask_head_norm"]

    def check(self) -> None:
        choice("model.name", self.name, MODEL_NAMES)
        choice("model.norm", self.norm, NORMS)
        if self.mask_head_norm is not None:
            choice("model.mask_head_norm", self.mask_head_norm, NORMS)
        if self.anchor_sizes is not None and (len(self.anchor_sizes) != len(LEVEL_STRIDES)
                                              or min(self.anchor_sizes) <= 0):
            raise UserError(f"model.anchor_sizes={self.anchor_sizes} needs {len(LEVEL_STRIDES)} positive sizes, "
                            "one per level P2-P6")
        for key in ("roi_batch_size_per_image", "fpn_channels", "box_head_dim"):
            if getattr(self, key) is not None:
                positive(f"model.{key}", getattr(self, key))
        for key in ("rpn_pre_nms_topk", "rpn_post_nms_topk"):
            value = getattr(self, key)
            if value is not None and (len(value) != 2 or min(value) <= 0):
                raise UserError(f"model.{key}={value} needs 2 positive counts: [train, test]")
        if self.roi_positive_fraction is not None and not 0 < self.roi_positive_fraction <= 1:
            raise UserError(f"model.roi_positive_fraction={self.roi_positive_fraction} must be in (0, 1]")
        if self.num_classes is not None:
            positive("model.num_classes", self.num_classes)
        self._check_backbone()

    def _check_backbone(self) -> None:
        """The weights fit the model, and what the rule of megdet.weights.default_freeze_at freezes is
        frozen on loaded weights only."""
        pretrained = self.backbone_weights is not None
        if pretrained:
            entry = weights.lookup(self.backbone_weights)
            arch = f"resnet{MODEL_PRESETS[self.name]['depth']}"
            if entry is not None and entry.arch != arch:
                raise UserError(f"model.backbone_weights={self.backbone_weights!r} are {entry.arch} weights but "
                                f"model.name={self.name} has a {arch} backbone: use {weights.PREFIX}{arch}")
        elif self.norm == "frozen" and not self.allow_frozen_random:
            raise UserError("model.norm=frozen keeps every BN layer at its initial values (scale 1, shift 0, mean 0, "
                            "variance 1), which only makes sense on loaded weights, and model.backbone_weights is "
                            "null: set model.backbone_weights (e.g. torchvision:resnet50), or model.norm=bn or cgbn "
                            "to train BN from scratch, or model.allow_frozen_random=true to freeze it anyway")
        unknown = [stage for stage in self.sublinear_stages if stage not in weights.STAGES[1:]]
        if unknown:
            raise UserError(f"model.sublinear_stages={self.sublinear_stages} names {unknown}, not backbone stages: "
                            f"use some of {', '.join(weights.STAGES[1:])}")
        frozen = [stage for stage in self.sublinear_stages
                  if stage in weights.frozen_stage_names(weights.default_freeze_at(pretrained))]
        if frozen:
            raise UserError(f"model.sublinear_stages={self.sublinear_stages} lists {frozen}, frozen on the loaded "
                            "weights (the stem and res2, as detectron2's FREEZE_AT 2): a frozen stage keeps no "
                            f"activations, so recomputing it saves nothing; drop {', '.join(frozen)}")


@dataclass(frozen=True)
class BNGroups:
    """Cross-GPU BN's groups. The config counts a group in images (``model.bn_size``, MegDet's "BN
    size"); the layers count it in consecutive ranks (``group_size``). This is the one conversion.

    norms: the model's norms that may be cross-GPU (backbone, mask head); bn_size: images per group,
    None for all ranks; images_per_rank: ``data.images_per_rank``; node_local: ``model.bn_node_local``."""

    norms: Tuple[Optional[str], ...]
    bn_size: Optional[int]
    images_per_rank: int
    node_local: bool = False

    @property
    def cross_gpu(self) -> bool:
        return "cgbn" in self.norms

    @property
    def group_size(self) -> Optional[int]:
        """Ranks per BN group (None: the whole world, or no cross-GPU BN)."""
        if not self.cross_gpu or self.bn_size is None:
            return None
        return self.bn_size // self.images_per_rank

    def check(self) -> None:
        if self.bn_size is None:
            return
        if not self.cross_gpu:
            raise UserError(f"model.bn_size={self.bn_size} applies to model.norm=cgbn only (it is "
                            f"{self.norms[0]!r}): set model.bn_size=null or model.norm=cgbn")
        if self.bn_size <= 0 or self.bn_size % self.images_per_rank:
            raise UserError(f"model.bn_size={self.bn_size} is not a positive multiple of data.images_per_rank="
                            f"{self.images_per_rank}: a BN group holds whole ranks")

    def check_world(self, world_size: int, local_size: int, batch_size: int) -> None:
        """UserError unless the groups divide ``world_size`` ranks and, where ``node_local`` asks, fit in
        nodes of ``local_size`` ranks (launchers place consecutive ranks on a node, and a group is
        consecutive ranks)."""
        group, per_rank = self.group_size, self.images_per_rank
        if group is not None and world_size % group:
            raise UserError(f"model.bn_size={self.bn_size} is {group} ranks of {per_rank} images, which "
                            f"does not divide the world of {world_size} ranks ({local_size} per node): set "
                            f"model.bn_size to {per_rank} times a divisor of {world_size}, or null for all ranks")
        ranks = group or world_size
        if self.cross_gpu and self.node_local and local_size % ranks:
            raise UserError(f"model.bn_node_local asks for BN groups inside one node, but model.bn_size="
                            f"{self.bn_size or batch_size} is {ranks} ranks of {per_rank} images and a node runs "
                            f"{local_size}: launch on nodes of a multiple of {ranks} ranks, or set model.bn_size "
                            f"to {per_rank} times a divisor of {local_size}, or model.bn_node_local=false")


@dataclass
class DataSpec:
    """The data: ``data.*``."""

    train: str = ""                       # folder of training shards (megdet pack)
    val: str = ""                         # folder of validation shards
    images_per_rank: int = 2              # training images per rank per forward pass
    min_sizes: List[int] = field(default_factory=lambda: [800])  # shorter side, one drawn per image
    max_size: int = 1333                  # cap on the longer side
    test_min_size: int = 800
    flip_prob: float = 0.5                # horizontal flip probability in training
    num_workers: Optional[int] = None     # data-loading processes per rank; None: the launcher's CPUs per rank - 1
    # a training image whose bytes fail their CRC-32: false stops the run naming it; true leaves it out of
    # its batch (a warning, and corrupt_records in the metrics)
    skip_corrupt: bool = False

    def check(self) -> None:
        for key in ("images_per_rank", "max_size", "test_min_size"):
            positive(f"data.{key}", getattr(self, key))
        if not self.min_sizes or any(size <= 0 for size in self.min_sizes):
            raise UserError(f"data.min_sizes={self.min_sizes} must be a non-empty list of positive sizes")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise UserError(f"data.flip_prob={self.flip_prob} must be in [0, 1]")
        if self.num_workers is not None and self.num_workers < 0:
            raise UserError(f"data.num_workers={self.num_workers} must be >= 0 (0: load in the training process; "
                            "null: one per CPU the launcher gives the rank, less one)")


@dataclass
class SolverSpec:
    """The optimizer and its schedule: ``solver.*``."""

    optimizer: str = "sgd"                # one of OPTIMIZERS
    batch_size: int = 16                  # images per iteration over all ranks and passes
    backward_passes_per_step: int = 1     # micro-batches of data.images_per_rank accumulated per step
    lr: Optional[float] = None            # None: base_lr * batch_size / base_batch (linear scaling rule)
    base_lr: float = 0.02
    base_batch: int = 16
    max_iter: int = 90000
    steps: List[int] = field(default_factory=lambda: [60000, 80000])  # iterations where the LR decays
    # Passes over the training shards; null: max_iter and steps as given. Set, they follow from the shards'
    # image count N at the start: max_iter = round(epochs * N / batch_size), steps from step_epochs alike.
    epochs: Optional[float] = None
    step_epochs: List[float] = field(default_factory=list)  # with epochs: epochs where the LR decays
    policy: str = "normal"                # key of hpc.schedule.POLICIES: the decay factor at each step
    warmup_iters: int = 0
    warmup_factor: float = DEFAULT_WARMUP_FACTOR  # LR at iteration 0 is warmup_factor * lr, linear up to lr
    momentum: float = 0.9                 # sgd, lars
    weight_decay: float = 0.0001
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # lamb, pmd_lamb: beta_1, beta_2
    eps: float = 1e-6                     # lamb, pmd_lamb
    pmd_alpha: float = 0.012              # PMD-LAMB scale factor alpha
    # PMD-LAMB cycle length T: whole iterations, or inf (YAML .inf, override inf): no moments decay, the
    # LAMB of LargeDet (alpha, no bias correction). Loaded as int, or math.inf.
    pmd_cycle: float = 200
    layer_adaptation: str = "all"         # lamb, pmd_lamb: "all" tensors (Algorithm 1) or "weights" only
    pmd_kernel: str = "multi_tensor"      # pmd_lamb: one of PMD_KERNELS

    @property
    def decay_factors(self) -> List[float]:
        """The LR factor applied at each of ``steps`` (``hpc.schedule.decay_factors``)."""
        return list(decay_factors(self.policy, len(self.steps)))

    def check(self) -> None:
        choice("solver.optimizer", self.optimizer, OPTIMIZERS)
        choice("solver.policy", self.policy, tuple(POLICIES))
        choice("solver.layer_adaptation", self.layer_adaptation, tuple(LAYER_ADAPTATION))
        choice("solver.pmd_kernel", self.pmd_kernel, PMD_KERNELS)
        if self.pmd_kernel != "multi_tensor" and self.optimizer != "pmd_lamb":
            raise UserError(f"solver.pmd_kernel={self.pmd_kernel!r} applies to pmd_lamb, not {self.optimizer}: "
                            "drop it or set solver.pmd_kernel=multi_tensor")
        if self.layer_adaptation != "all" and self.optimizer not in ("lamb", "pmd_lamb"):
            raise UserError(f"solver.layer_adaptation={self.layer_adaptation!r} applies to lamb and pmd_lamb, not "
                            f"{self.optimizer}: drop it or set solver.layer_adaptation=all")
        for key in ("batch_size", "base_lr", "backward_passes_per_step", "base_batch", "max_iter"):
            positive(f"solver.{key}", getattr(self, key))
        if self.lr is not None:
            positive("solver.lr", self.lr)
        if not (self.pmd_cycle == math.inf or self.pmd_cycle >= 1 and float(self.pmd_cycle).is_integer()):
            raise UserError(f"solver.pmd_cycle={self.pmd_cycle:g} must be a whole number of iterations >= 1, or "
                            "inf for no moments decay (the LAMB rows of LargeDet Table 2)")
        self._check_epochs()
        if list(self.steps) != sorted(set(self.steps)) or any(not 0 < s < self.max_iter for s in self.steps):
            raise UserError(f"solver.steps={self.steps} must be increasing iterations between 0 and "
                            f"solver.max_iter={self.max_iter}")
        try:
            decay_factors(self.policy, len(self.steps))  # the schedule's own rule: "long" decays 3 times
        except ValueError:
            decays = len(POLICIES[self.policy].decay_factors)
            raise UserError(f"solver.policy={self.policy!r} decays the LR {decays} times but solver.steps="
                            f"{self.steps} has {len(self.steps)}: give {decays} steps") from None
        if not 0 <= self.warmup_iters <= self.max_iter:
            raise UserError(f"solver.warmup_iters={self.warmup_iters} must be in [0, solver.max_iter="
                            f"{self.max_iter}]")
        if not 0.0 < self.warmup_factor <= 1.0:
            raise UserError(f"solver.warmup_factor={self.warmup_factor} must be in (0, 1]")
        if len(self.betas) != 2 or not all(0.0 < b < 1.0 for b in self.betas):
            raise UserError(f"solver.betas={self.betas} must be two values in (0, 1): [beta_1, beta_2]")

    def _check_epochs(self) -> None:
        if self.epochs is None:
            if self.step_epochs:
                raise UserError(f"solver.step_epochs={self.step_epochs} needs solver.epochs: set solver.epochs, or "
                                "give solver.steps in iterations and solver.step_epochs=[]")
            return
        if self.epochs <= 0:
            raise UserError(f"solver.epochs={self.epochs:g} must be positive (or null to give solver.max_iter)")
        if list(self.step_epochs) != sorted(set(self.step_epochs)) or \
                any(not 0 < e < self.epochs for e in self.step_epochs):
            raise UserError(f"solver.step_epochs={self.step_epochs} must be increasing epochs between 0 and "
                            f"solver.epochs={self.epochs:g}")
        decays = len(POLICIES[self.policy].decay_factors)
        if len(self.step_epochs) != decays:
            raise UserError(f"solver.policy={self.policy!r} decays the LR {decays} times but solver.step_epochs="
                            f"{self.step_epochs} has {len(self.step_epochs)}: give {decays} epochs")

    def iterations_for(self, num_images: int) -> Tuple[int, List[int]]:
        """(max_iter, steps) of ``epochs`` and ``step_epochs`` over ``num_images`` training images, each
        rounded to the nearest iteration; UserError when the set is too small to keep them apart."""
        per_epoch = num_images / self.batch_size
        max_iter, steps = round(self.epochs * per_epoch), [round(e * per_epoch) for e in self.step_epochs]
        if max_iter < 1 or list(steps) != sorted(set(steps)) or any(not 0 < s < max_iter for s in steps):
            raise UserError(f"solver.epochs={self.epochs:g} with solver.step_epochs={self.step_epochs} over {num_images} "
                            f"images at solver.batch_size={self.batch_size} gives max_iter {max_iter} and steps "
                            f"{steps}, which do not decay inside the run: train on more images or more epochs, or "
                            "set solver.epochs=null and give solver.max_iter and solver.steps")
        return max_iter, steps

    def check_world(self, world_size: int, images_per_rank: int) -> None:
        """UserError unless ``batch_size`` splits into ``world_size`` ranks of ``images_per_rank`` images
        per backward pass."""
        batch, per_rank, passes = self.batch_size, images_per_rank, self.backward_passes_per_step
        if batch % world_size:
            raise UserError(f"solver.batch_size={batch} is not divisible by {world_size} ranks: launch a "
                            f"divisor of {batch} ranks (e.g. {batch // per_rank} for data.images_per_rank="
                            f"{per_rank}) or set solver.batch_size to a multiple of {world_size}")
        if batch // world_size != per_rank * passes:
            per_step = f"data.images_per_rank={per_rank}" if passes == 1 else \
                f"data.images_per_rank={per_rank} x solver.backward_passes_per_step={passes}"
            raise UserError(f"solver.batch_size={batch} over {world_size} ranks is {batch // world_size} images "
                            f"per rank but {per_step}: launch {batch // (per_rank * passes)} ranks or set "
                            f"data.images_per_rank={batch // world_size // passes}"
                            + (f" (with {passes} passes)" if passes > 1 else ""))


@dataclass
class TrainSpec:
    """The run: ``train.*``."""

    seed: int = 0
    output_dir: str = ""                  # "" : runs/<config name>
    checkpoint_period: int = 1000         # iterations between checkpoints (and one at the end)
    keep_checkpoints: int = 0             # keep the newest N checkpoints (and the newest intact one); 0 keeps all
    eval_period: int = 0                  # iterations between evaluations; 0: only at the end
    # stop once an evaluation reaches it: [box AP] or, with masks, [box AP, mask AP] (percent), e.g.
    # LargeDet Table 4's Mask R-CNN row: [37.6, 33.9]
    target_ap: Optional[List[float]] = None
    target_metric: str = "AP"             # what target_ap is compared with: one of TARGET_METRICS (box, and mask)
    # score the evaluations in background processes while training goes on (the ranks still infer in
    # step); the score is logged against the iteration it scored, and a target reached stops every rank
    async_eval: bool = False
    log_period: int = 20                  # iterations between metrics lines
    device: str = "auto"                  # one of DEVICE_KINDS; auto: cuda:<local rank> when a GPU is visible
    amp: str = "none"                     # one of hpc.options.AMP_MODES; auto: bf16 or fp16 on a GPU, none on the CPU
    channels_last: bool = False           # NHWC activations (faster oneDNN/cuDNN kernels with amp)
    tensorboard: bool = False             # also write the metrics as TensorBoard events in the run folder
    grad_compression: str = "none"        # one of hpc.options.COMPRESSIONS; fp16: gradients sent as float16

    def check(self, with_masks: bool) -> None:
        """``with_masks``: whether the model has a mask branch, which a mask AP target needs."""
        choice("train.amp", self.amp, AMP_MODES)
        choice("train.device", self.device, DEVICE_KINDS)
        choice("train.grad_compression", self.grad_compression, COMPRESSIONS)
        for key in ("checkpoint_period", "log_period"):
            positive(f"train.{key}", getattr(self, key))
        if self.target_ap is not None and not 1 <= len(self.target_ap) <= 2:
            raise UserError(f"train.target_ap={self.target_ap} must be [box AP] or [box AP, mask AP] in percent")
        if self.target_ap is not None and len(self.target_ap) == 2 and not with_masks:
            raise UserError(f"train.target_ap={self.target_ap} gives a mask AP but the model has no masks: give "
                            "[box AP], or set model.mask_on=true")
        if self.keep_checkpoints < 0:
            raise UserError(f"train.keep_checkpoints={self.keep_checkpoints} must be >= 0 (N keeps the newest N "
                            "checkpoints, 0 keeps every one)")
        if self.eval_period < 0:
            raise UserError(f"train.eval_period={self.eval_period} must be >= 0 (0: evaluate at the end only)")
        choice("train.target_metric", self.target_metric, TARGET_METRICS)
        if self.async_eval and self.eval_period == 0:
            raise UserError("train.async_eval=true scores the evaluations during training, but train.eval_period=0 "
                            "evaluates only at the end: set train.eval_period=N or train.async_eval=false")


@dataclass
class EvalSpec:
    """Evaluation: ``eval.*``."""

    images_per_rank: int = 1
    # The detector's inference settings (passed as ModelSpec's are); None: the named model's.
    score_threshold: Optional[float] = None  # keep detections scoring above this
    nms_threshold: Optional[float] = None    # per-class NMS IoU
    detections_per_image: Optional[int] = None

    def check(self) -> None:
        positive("eval.images_per_rank", self.images_per_rank)
        for key in ("score_threshold", "nms_threshold"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(f"eval.{key}={value} must be in [0, 1]")
        if self.detections_per_image is not None:
            positive("eval.detections_per_image", self.detections_per_image)


@dataclass(frozen=True)
class CheckpointIdentity:
    """The model a checkpoint holds, as train, eval and show compare it with their config's."""

    model_name: str
    num_classes: Optional[int]

    @classmethod
    def of(cls, model: ModelSpec) -> "CheckpointIdentity":
        return cls(model.name, model.num_classes)

    @classmethod
    def read(cls, state: Mapping[str, Any]) -> "CheckpointIdentity":
        return cls(state["model_name"], state.get("num_classes"))

    def fields(self) -> Dict[str, Any]:
        """What a checkpoint stores of it."""
        return {"model_name": self.model_name, "num_classes": self.num_classes}

    def mismatch(self, held: "CheckpointIdentity", config_name: str) -> Optional[str]:
        """None when ``held`` (a checkpoint's) is this one (config ``config_name``'s), else the words that
        say both."""
        if held == self:
            return None
        return (f"holds a {held.model_name} with {held.num_classes} classes, but {config_name} builds a "
                f"{self.model_name} with {self.num_classes}")
