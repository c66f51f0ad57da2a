"""Run configuration: the specs of ``megdet.specs``, one per section, filled from a YAML preset (one per
paper row) and overrides, then checked by each spec's own ``check()``.

    cfg = megdet.config.load("largedet_coco_12min", ["solver.max_iter=100", "train.output_dir=runs/x"])
    cfg.solver.lr            # resolved: given, or base_lr * batch_size / base_batch (linear scaling rule)
    cfg.check_world(comm.size, comm.local_size)   # batch, images per rank and BN groups fit this launch
                                                  # (inside nodes where model.bn_node_local asks)
    cfg.fill_from_shards(num_classes=len(train_set.categories), num_images=len(train_set))
                                                  # model.num_classes: null and solver.epochs (Open Images)

Presets live in ``megdet/configs/NAME.yaml``, and as rows of ``megdet/configs/tables/*.yaml`` (a base
preset and the keys that differ, ``TABLE_ROWS``); ``PRESETS`` lists both. A YAML file or an override may
only name fields of the specs; every value is checked against the field's type here, and its meaning by
its spec. Bad input raises ``UserError`` with one line that names the key or value and the fix. Only the
builders in the engine read a ``Config``; every component takes explicit keyword arguments.
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
from hpc.schedule import linear_scaling_rule
from megdet.specs import (BNGroups, CheckpointIdentity, DataSpec, EvalSpec, ModelSpec, PaperSpec, SolverSpec,
                          TrainSpec)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# A table file (configs/tables/*.yaml) holds one preset per paper row that differs from a preset file
# in a few values: ``rows: {NAME: {base: PRESET, <the sections and keys that differ>}}``.
TABLE_DIR = CONFIG_DIR / "tables"
TABLE_ROWS = {name: (path, row) for path in sorted(TABLE_DIR.glob("*.yaml"))
              for name, row in yaml.safe_load(path.read_text())["rows"].items()}
PRESETS = tuple(sorted([path.stem for path in CONFIG_DIR.glob("*.yaml")] + list(TABLE_ROWS)))

@dataclass
class Config:
    name: str = ""
    description: str = ""
    paper: PaperSpec = field(default_factory=PaperSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    solver: SolverSpec = field(default_factory=SolverSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def bn_groups(self) -> BNGroups:
        """Cross-GPU BN's groups of ``model.bn_size`` images, in ranks for the layers."""
        return BNGroups(norms=(self.model.norm, self.model.head_norm if self.model.with_masks else None),
                        bn_size=self.model.bn_size, images_per_rank=self.data.images_per_rank,
                        node_local=self.model.bn_node_local)

    @property
    def identity(self) -> CheckpointIdentity:
        """The model identity its checkpoints carry."""
        return CheckpointIdentity.of(self.model)

    def check(self) -> None:
        """Values that are the right type but cannot work, each named with its fix: each spec's own rules."""
        self.model.check()
        self.data.check()
        self.solver.check()
        self.train.check(with_masks=self.model.with_masks)
        self.eval.check()
        self.bn_groups.check()
        self._check_evaluations()

    def _check_evaluations(self) -> None:
        """What evaluating during training needs of the other sections."""
        train, max_iter = self.train, self.solver.max_iter
        if train.async_eval and not self.data.val:
            raise UserError("train.async_eval=true scores evaluations of data.val, but data.val is empty: set "
                            "data.val=SHARDS or train.async_eval=false")
        if max_iter is not None and train.eval_period > max_iter:
            raise UserError(f"train.eval_period={train.eval_period} is longer than the run (solver.max_iter="
                            f"{max_iter}): it would never evaluate before the end; set train.eval_period <= "
                            f"{max_iter}, or 0 to evaluate at the end only")

    def fill_from_shards(self, *, num_classes: int, num_images: Optional[int] = None) -> None:
        """What a preset leaves to the data, filled in (on every rank, alike) once the shards are open:
        ``model.num_classes`` when null (the shards' ``num_classes`` categories) and, for training
        (``num_images`` given) with ``solver.epochs``, ``solver.max_iter`` and ``solver.steps``. Checked
        again after."""
        if self.model.num_classes is None:
            self.model.num_classes = num_classes
        if num_images is not None and self.solver.epochs is not None:
            self.solver.max_iter, self.solver.steps = self.solver.iterations_for(num_images)
        self.check()

    def check_world(self, world_size: int, local_size: int) -> None:
        """Raise ``UserError`` unless the batch, the images per rank and the BN groups fit ``world_size``
        ranks (``local_size`` of them per node), each group inside one node where ``model.bn_node_local``
        asks. The trainer calls it on every rank before anything is written; ``megdet job`` before it
        renders a script."""
        self.solver.check_world(world_size, self.data.images_per_rank)
        self.bn_groups.check_world(world_size, local_size, self.solver.batch_size)


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
    config.check()
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


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
