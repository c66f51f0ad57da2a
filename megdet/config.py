"""Run configuration: nested dataclasses filled from a YAML preset (one per paper row) and overrides.

    cfg = megdet.config.load("largedet_coco_12min", ["solver.max_iter=100", "train.output_dir=runs/x"])
    cfg.solver.lr            # resolved: given, or base_lr * batch_size / base_batch (linear scaling rule)
    cfg.check_world(comm.size, comm.local_size)   # batch, images per rank and BN groups fit this launch
                                                  # (inside nodes where model.bn_node_local asks)

Presets live in ``megdet/configs/NAME.yaml``, and as rows of ``megdet/configs/tables/*.yaml`` (a base
preset and the keys that differ, ``TABLE_ROWS``); ``PRESETS`` lists both. A YAML file or an override may
only name fields that exist here; every value is checked against the field's type. Bad input raises
``UserError`` with one line that names the key or value and the fix. Only the builders in the engine
read a ``Config``; every component takes explicit keyword arguments.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from hpc.errors import UserError
from hpc.options import AMP_MODES, COMPRESSIONS, DEVICE_KINDS
from hpc.schedule import DEFAULT_WARMUP_FACTOR, POLICIES, decay_factors, linear_scaling_rule
from megdet.model.settings import MODEL_NAMES, NORMS
from megdet.model.settings import PRESETS as MODEL_PRESETS
from megdet import weights

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# A table file (configs/tables/*.yaml) holds one preset per paper row that differs from a preset file
# in a few values: ``rows: {NAME: {base: PRESET, <the sections and keys that differ>}}``.
TABLE_DIR = CONFIG_DIR / "tables"
TABLE_ROWS = {name: (path, row) for path in sorted(TABLE_DIR.glob("*.yaml"))
              for name, row in yaml.safe_load(path.read_text())["rows"].items()}
PRESETS = tuple(sorted([path.stem for path in CONFIG_DIR.glob("*.yaml")] + list(TABLE_ROWS)))

OPTIMIZERS = ("sgd", "pmd_lamb", "lamb", "lars")
# hpc.optim.PMDLAMB's kernels: one multi-tensor op per line of Algorithm 1 (any device), or torch.compile'd
# per tensor (CPU only, needs a C++ compiler; 1.0-1.1x SGD's step here against 1.6-2.2x, docs/benchmarks.md).
PMD_KERNELS = ("multi_tensor", "compiled")
# solver.layer_adaptation: which param groups (hpc.optim.param_groups) take LAMB's ratio ||x|| / ||u||.
LAYER_ADAPTATION = {"all": ("weights", "norm", "bias"), "weights": ("weights",)}


@dataclass
class PaperConfig:
    """Which published result the preset reproduces, and what the paper reports for it."""

    row: str = ""                         # e.g. "MegDet Table 3, batch 256, BN size 32"
    gpus: int = 1
    gpus_per_node: int = 1
    expected_time: str = ""               # training time the paper reports, e.g. "12 min"
    box_ap: Optional[float] = None        # COCO box AP@[.5:.95] the paper reports (percent); null: failed
    gpu_memory_gb: Optional[float] = None  # memory of one paper GPU (megdet job's --gpu-memory); null: CPU


@dataclass
class ModelConfig:
    name: str = "resnet50_fpn"            # one of megdet.model.settings.MODEL_NAMES
    num_classes: int = 80                 # foreground classes; labels are 1..num_classes
    norm: str = "bn"                      # one of NORMS; cgbn = cross-GPU batch norm over bn_size images;
                                          # frozen (fixed statistics and affine) only on backbone_weights
    bn_size: Optional[int] = None         # images per cross-GPU BN group (cgbn only); None: all ranks
    bn_node_local: bool = False           # refuse a launch where a BN group spans nodes (MegDet Sec. 3.3)
    # ImageNet weights of the backbone: "torchvision:resnet50" (torch hub's cache, megdet.weights)
    # or a file path; None: random init. With weights the stem and res2 are frozen (detectron2 FREEZE_AT
    # 2); without, nothing is, and model.norm=frozen is refused unless allow_frozen_random is true.
    backbone_weights: Optional[str] = None
    allow_frozen_random: bool = False     # model.norm=frozen without weights: keep BN at its initial values
    sublinear_stages: List[str] = field(default_factory=list)  # stages recomputed in backward (memory)
    # The detector's own settings, by the keys of megdet.model.settings.DEFAULTS; None (the default):
    # the value of the named model there, the one place those values are written.
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


@dataclass
class DataConfig:
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


@dataclass
class SolverConfig:
    optimizer: str = "sgd"                # one of OPTIMIZERS
    batch_size: int = 16                  # images per iteration over all ranks and passes
    backward_passes_per_step: int = 1     # micro-batches of data.images_per_rank accumulated per step
    lr: Optional[float] = None            # None: base_lr * batch_size / base_batch (linear scaling rule)
    base_lr: float = 0.02
    base_batch: int = 16
    max_iter: int = 90000
    steps: List[int] = field(default_factory=lambda: [60000, 80000])  # iterations where the LR decays
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


@dataclass
class TrainConfig:
    seed: int = 0
    output_dir: str = ""                  # "" : runs/<config name>
    checkpoint_period: int = 1000         # iterations between checkpoints (and one at the end)
    keep_checkpoints: int = 0             # keep the newest N checkpoints (and the newest intact one); 0 keeps all
    eval_period: int = 0                  # iterations between evaluations; 0: only at the end
    # stop once an evaluation reaches it: [box AP] or, with masks, [box AP, mask AP] (percent), e.g.
    # LargeDet Table 4's Mask R-CNN row: [37.6, 33.9]
    target_ap: Optional[List[float]] = None
    log_period: int = 20                  # iterations between metrics lines
    device: str = "auto"                  # one of DEVICE_KINDS; auto: cuda:<local rank> when a GPU is visible
    amp: str = "none"                     # one of hpc.options.AMP_MODES; auto: bf16 or fp16 on a GPU, none on the CPU
    channels_last: bool = False           # NHWC activations (faster oneDNN/cuDNN kernels with amp)
    tensorboard: bool = False             # also write the metrics as TensorBoard events in the run folder
    grad_compression: str = "none"        # one of hpc.options.COMPRESSIONS; fp16: gradients sent as float16


@dataclass
class EvalConfig:
    images_per_rank: int = 1
    # The detector's inference settings, by the keys of megdet.model.settings.DEFAULTS; None: the model's.
    score_threshold: Optional[float] = None  # keep detections scoring above this
    nms_threshold: Optional[float] = None    # per-class NMS IoU
    detections_per_image: Optional[int] = None


@dataclass
class Config:
    name: str = ""
    description: str = ""
    paper: PaperConfig = field(default_factory=PaperConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def bn_group_ranks(self) -> Optional[int]:
        """Ranks per cross-GPU BN group (None: the whole world), for ``comm.partition``."""
        if self.model.norm != "cgbn" or self.model.bn_size is None:
            return None
        return self.model.bn_size // self.data.images_per_rank

    def check_world(self, world_size: int, local_size: int) -> None:
        """Raise ``UserError`` unless the batch, the images per rank and the BN groups fit ``world_size``
        ranks (``local_size`` of them per node), each group inside one node where ``model.bn_node_local``
        asks. The trainer calls it on every rank before anything is written; ``megdet job`` before it
        renders a script."""
        batch, per_rank = self.solver.batch_size, self.data.images_per_rank
        if batch % world_size:
            raise UserError(f"solver.batch_size={batch} is not divisible by {world_size} ranks: launch a "
                            f"divisor of {batch} ranks (e.g. {batch // per_rank} for data.images_per_rank="
                            f"{per_rank}) or set solver.batch_size to a multiple of {world_size}")
        passes = self.solver.backward_passes_per_step
        if batch // world_size != per_rank * passes:
            per_step = f"data.images_per_rank={per_rank}" if passes == 1 else \
                f"data.images_per_rank={per_rank} x solver.backward_passes_per_step={passes}"
            raise UserError(f"solver.batch_size={batch} over {world_size} ranks is {batch // world_size} images "
                            f"per rank but {per_step}: launch {batch // (per_rank * passes)} ranks or set "
                            f"data.images_per_rank={batch // world_size // passes}"
                            + (f" (with {passes} passes)" if passes > 1 else ""))
        group = self.bn_group_ranks()
        if group is not None and world_size % group:
            raise UserError(f"model.bn_size={self.model.bn_size} is {group} ranks of {per_rank} images, which "
                            f"does not divide the world of {world_size} ranks ({local_size} per node): set "
                            f"model.bn_size to {per_rank} times a divisor of {world_size}, or null for all ranks")
        ranks = group or world_size
        if self.model.norm == "cgbn" and self.model.bn_node_local and local_size % ranks:
            # Launchers place consecutive ranks on a node, and a BN group is consecutive ranks.
            raise UserError(f"model.bn_node_local asks for BN groups inside one node, but model.bn_size="
                            f"{self.model.bn_size or batch} is {ranks} ranks of {per_rank} images and a node runs "
                            f"{local_size}: launch on nodes of a multiple of {ranks} ranks, or set model.bn_size "
                            f"to {per_rank} times a divisor of {local_size}, or model.bn_node_local=false")


def load(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """The config of a preset name (see ``PRESETS``) or a YAML path, with ``key.sub=value`` overrides
    applied, checked, and ``solver.lr`` resolved."""
    if name_or_path in TABLE_ROWS:
        path, row = TABLE_ROWS[name_or_path]
        changes = {key: value for key, value in row.items() if key != "base"}
        document = _merged(_document(_preset_path(row["base"])), {**changes, "name": name_or_path})
        where, stem = f"{path} row {name_or_path}", name_or_path
    else:
        path = _preset_path(name_or_path)
        document, where, stem = _document(path), str(path), path.stem
    return from_document(document, where, stem, overrides)


def from_document(document: Dict[str, Any], where: str, stem: str = "config", overrides: Sequence[str] = ()) -> Config:
    """The config of a mapping of sections (a preset's YAML, or the one a checkpoint holds); ``where``
    names it in errors, ``stem`` is the name when it has none. Checked and resolved as ``load``."""
    config = _build(Config, document, where, "")
    for override in overrides:
        _apply_override(config, override)
    if not config.name:
        config.name = stem
    if not config.train.output_dir:
        config.train.output_dir = os.path.join("runs", config.name)
    _validate(config)
    if config.solver.lr is None:
        config.solver.lr = linear_scaling_rule(config.solver.batch_size, base_lr=config.solver.base_lr,
                                               base_batch=config.solver.base_batch)
    if config.solver.pmd_cycle != math.inf:
        config.solver.pmd_cycle = int(config.solver.pmd_cycle)
    return config


def _document(path: Path) -> Dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML ({_one_line(error)}): fix the file") from None
    if not isinstance(document, dict):
        raise UserError(f"{path} must hold a mapping of config sections, not {type(document).__name__}")
    return document


def _merged(base: Dict[str, Any], changes: Dict[str, Any]) -> Dict[str, Any]:
    """``base`` with ``changes`` laid over it, section by section (a list or value is replaced whole)."""
    merged = dict(base)
    for key, value in changes.items():
        both_sections = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _merged(base[key], value) if both_sections else value
    return merged


def _preset_path(name_or_path: str) -> Path:
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"config file {name_or_path} does not exist: give an existing YAML file "
                            f"or a preset name ({', '.join(PRESETS)})")
        return path
    if name_or_path not in PRESETS:
        close = difflib.get_close_matches(name_or_path, PRESETS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown preset {name_or_path!r}{hint}: choose one of {', '.join(PRESETS)}, "
                        "or give the path of a .yaml file")
    return CONFIG_DIR / f"{name_or_path}.yaml"


def _field_types(cls) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: Sequence[str], where: str) -> UserError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    return UserError(f"unknown config key {key!r} in {where}{hint}: valid keys are "
                     f"{', '.join(prefix + name for name in valid)}")


def _build(cls, values: Dict[str, Any], where: str, prefix: str):
    """An instance of dataclass ``cls`` from a mapping, every key and value checked."""
    types = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in types:
            raise _unknown_key(dotted, list(types), where)
        kind = types[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise UserError(f"config key {dotted!r} in {where} must be a mapping of "
                                f"{', '.join(_field_types(kind))}, not {value!r}")
            kwargs[key] = _build(kind, value, where, dotted + ".")
        else:
            kwargs[key] = _check_value(dotted, value, kind, where)
    return cls(**kwargs)


def _check_value(key: str, value: Any, kind, where: str) -> Any:
    """``value`` converted to ``kind`` (int, float, str, bool, Optional[...] or List[...]), or UserError."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        try:
            return _check_value(key, value, next(a for a in args if a is not type(None)), where)
        except UserError:
            raise _bad_type(key, value, kind, where) from None
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise _bad_type(key, value, kind, where)
        return [_check_value(f"{key}[{i}]", item, args[0], where) for i, item in enumerate(value)]
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    if kind is str and isinstance(value, str):
        return value
    raise _bad_type(key, value, kind, where)


def _type_name(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        return f"{_type_name(next(a for a in args if a is not type(None)))} or null"
    if origin in (list, List):
        return f"a list of {_type_name(args[0])}"
    return kind.__name__


def _bad_type(key, value, kind, where) -> UserError:
    return UserError(f"config key {key!r} in {where} must be {_type_name(kind)}, not {value!r}: fix the value")


def _apply_override(config: Config, override: str) -> None:
    """Apply one ``section.key=value`` (value in YAML syntax: 0.1, null, [100, 200], text)."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {override!r} is not key=value: write e.g. solver.max_iter=100")
    where = "the overrides"
    parts = key.split(".")
    target: Any = config
    for depth, part in enumerate(parts):
        types = _field_types(type(target))
        if part not in types:
            raise _unknown_key(".".join(parts[:depth + 1]), list(types), where)
        kind = types[part]
        if dataclasses.is_dataclass(kind):
            if depth == len(parts) - 1:
                raise UserError(f"override {override!r} names a whole section: set its keys, "
                                f"e.g. {key}.{next(iter(_field_types(kind)))}=...")
            target = getattr(target, part)
            continue
        if depth != len(parts) - 1:
            raise UserError(f"override {override!r}: {'.'.join(parts[:depth + 1])} is not a section")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        setattr(target, part, _check_value(key, value, kind, where))


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UserError(f"{key}={value!r} is not one of {', '.join(choices)}: choose one of them")


def _positive(key: str, value) -> None:
    if value is None or value <= 0:
        raise UserError(f"{key}={value} must be positive")


def _check_backbone(model: ModelConfig) -> None:
    """The weights fit the model, and what the rule of megdet.weights.default_freeze_at freezes is
    frozen on loaded weights only."""
    pretrained = model.backbone_weights is not None
    if pretrained:
        entry = weights.lookup(model.backbone_weights)
        arch = f"resnet{MODEL_PRESETS[model.name]['depth']}"
        if entry is not None and entry.arch != arch:
            raise UserError(f"model.backbone_weights={model.backbone_weights!r} are {entry.arch} weights but "
                            f"model.name={model.name} has a {arch} backbone: use {weights.PREFIX}{arch}")
    elif model.norm == "frozen" and not model.allow_frozen_random:
        raise UserError("model.norm=frozen keeps every BN layer at its initial values (scale 1, shift 0, mean 0, "
                        "variance 1), which only makes sense on loaded weights, and model.backbone_weights is null: "
                        "set model.backbone_weights (e.g. torchvision:resnet50), or model.norm=bn or cgbn to train "
                        "BN from scratch, or model.allow_frozen_random=true to freeze it anyway")
    unknown = [stage for stage in model.sublinear_stages if stage not in weights.STAGES[1:]]
    if unknown:
        raise UserError(f"model.sublinear_stages={model.sublinear_stages} names {unknown}, not backbone stages: "
                        f"use some of {', '.join(weights.STAGES[1:])}")
    frozen = [stage for stage in model.sublinear_stages
              if stage in weights.frozen_stage_names(weights.default_freeze_at(pretrained))]
    if frozen:
        raise UserError(f"model.sublinear_stages={model.sublinear_stages} lists {frozen}, frozen on the loaded "
                        "weights (the stem and res2, as detectron2's FREEZE_AT 2): a frozen stage keeps no "
                        f"activations, so recomputing it saves nothing; drop {', '.join(frozen)}")


def _validate(config: Config) -> None:
    """Values that are the right type but cannot work, each named with its fix."""
    model, data, solver, train = config.model, config.data, config.solver, config.train
    _choice("model.name", model.name, MODEL_NAMES)
    _choice("model.norm", model.norm, NORMS)
    _choice("solver.optimizer", solver.optimizer, OPTIMIZERS)
    _choice("solver.policy", solver.policy, tuple(POLICIES))
    _choice("solver.layer_adaptation", solver.layer_adaptation, tuple(LAYER_ADAPTATION))
    _choice("train.amp", train.amp, AMP_MODES)
    _choice("train.device", train.device, DEVICE_KINDS)
    _choice("train.grad_compression", train.grad_compression, COMPRESSIONS)
    _choice("solver.pmd_kernel", solver.pmd_kernel, PMD_KERNELS)
    if solver.pmd_kernel != "multi_tensor" and solver.optimizer != "pmd_lamb":
        raise UserError(f"solver.pmd_kernel={solver.pmd_kernel!r} applies to pmd_lamb, not {solver.optimizer}: "
                        "drop it or set solver.pmd_kernel=multi_tensor")
    if solver.layer_adaptation != "all" and solver.optimizer not in ("lamb", "pmd_lamb"):
        raise UserError(f"solver.layer_adaptation={solver.layer_adaptation!r} applies to lamb and pmd_lamb, not "
                        f"{solver.optimizer}: drop it or set solver.layer_adaptation=all")
    if model.anchor_sizes is not None and (len(model.anchor_sizes) != 5 or min(model.anchor_sizes) <= 0):
        raise UserError(f"model.anchor_sizes={model.anchor_sizes} needs 5 positive sizes, one per level P2-P6")
    for key in ("roi_batch_size_per_image", "fpn_channels", "box_head_dim"):
        if getattr(model, key) is not None:
            _positive(f"model.{key}", getattr(model, key))
    for key in ("rpn_pre_nms_topk", "rpn_post_nms_topk"):
        value = getattr(model, key)
        if value is not None and (len(value) != 2 or min(value) <= 0):
            raise UserError(f"model.{key}={value} needs 2 positive counts: [train, test]")
    if model.roi_positive_fraction is not None and not 0 < model.roi_positive_fraction <= 1:
        raise UserError(f"model.roi_positive_fraction={model.roi_positive_fraction} must be in (0, 1]")
    for key, value in (("model.num_classes", model.num_classes), ("data.images_per_rank", data.images_per_rank),
                       ("data.max_size", data.max_size), ("data.test_min_size", data.test_min_size),
                       ("solver.batch_size", solver.batch_size), ("solver.base_lr", solver.base_lr),
                       ("solver.backward_passes_per_step", solver.backward_passes_per_step),
                       ("solver.base_batch", solver.base_batch), ("solver.max_iter", solver.max_iter),
                       ("train.checkpoint_period", train.checkpoint_period),
                       ("train.log_period", train.log_period), ("eval.images_per_rank", config.eval.images_per_rank)):
        _positive(key, value)
    if solver.lr is not None:
        _positive("solver.lr", solver.lr)
    if not (solver.pmd_cycle == math.inf or solver.pmd_cycle >= 1 and float(solver.pmd_cycle).is_integer()):
        raise UserError(f"solver.pmd_cycle={solver.pmd_cycle:g} must be a whole number of iterations >= 1, or inf "
                        "for no moments decay (the LAMB rows of LargeDet Table 2)")
    _check_backbone(model)
    if not data.min_sizes or any(size <= 0 for size in data.min_sizes):
        raise UserError(f"data.min_sizes={data.min_sizes} must be a non-empty list of positive sizes")
    if not 0.0 <= data.flip_prob <= 1.0:
        raise UserError(f"data.flip_prob={data.flip_prob} must be in [0, 1]")
    if model.bn_size is not None:
        if model.norm != "cgbn":
            raise UserError(f"model.bn_size={model.bn_size} applies to model.norm=cgbn only (it is "
                            f"{model.norm!r}): set model.bn_size=null or model.norm=cgbn")
        if model.bn_size <= 0 or model.bn_size % data.images_per_rank:
            raise UserError(f"model.bn_size={model.bn_size} is not a positive multiple of data.images_per_rank="
                            f"{data.images_per_rank}: a BN group holds whole ranks")
    if list(solver.steps) != sorted(set(solver.steps)) or any(not 0 < s < solver.max_iter for s in solver.steps):
        raise UserError(f"solver.steps={solver.steps} must be increasing iterations between 0 and "
                        f"solver.max_iter={solver.max_iter}")
    try:
        decay_factors(solver.policy, len(solver.steps))  # the schedule's own rule: "long" decays 3 times
    except ValueError:
        decays = len(POLICIES[solver.policy].decay_factors)
        raise UserError(f"solver.policy={solver.policy!r} decays the LR {decays} times but solver.steps="
                        f"{solver.steps} has {len(solver.steps)}: give {decays} steps") from None
    if not 0 <= solver.warmup_iters <= solver.max_iter:
        raise UserError(f"solver.warmup_iters={solver.warmup_iters} must be in [0, solver.max_iter="
                        f"{solver.max_iter}]")
    if not 0.0 < solver.warmup_factor <= 1.0:
        raise UserError(f"solver.warmup_factor={solver.warmup_factor} must be in (0, 1]")
    if len(solver.betas) != 2 or not all(0.0 < b < 1.0 for b in solver.betas):
        raise UserError(f"solver.betas={solver.betas} must be two values in (0, 1): [beta_1, beta_2]")
    for key, value in (("eval.score_threshold", config.eval.score_threshold),
                       ("eval.nms_threshold", config.eval.nms_threshold)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"{key}={value} must be in [0, 1]")
    if config.eval.detections_per_image is not None:
        _positive("eval.detections_per_image", config.eval.detections_per_image)
    if data.num_workers is not None and data.num_workers < 0:
        raise UserError(f"data.num_workers={data.num_workers} must be >= 0 (0: load in the training process; "
                        "null: one per CPU the launcher gives the rank, less one)")
    if train.target_ap is not None and not 1 <= len(train.target_ap) <= 2:
        raise UserError(f"train.target_ap={train.target_ap} must be [box AP] or [box AP, mask AP] in percent")
    if train.target_ap is not None and len(train.target_ap) == 2 and not model.with_masks:
        raise UserError(f"train.target_ap={train.target_ap} gives a mask AP but the model has no masks: give "
                        "[box AP], or set model.mask_on=true")
    if model.mask_head_norm is not None:
        _choice("model.mask_head_norm", model.mask_head_norm, NORMS)
    if train.keep_checkpoints < 0:
        raise UserError(f"train.keep_checkpoints={train.keep_checkpoints} must be >= 0 (N keeps the newest N "
                        "checkpoints, 0 keeps every one)")
    if train.eval_period < 0:
        raise UserError(f"train.eval_period={train.eval_period} must be >= 0 (0: evaluate at the end only)")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
