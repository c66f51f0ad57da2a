"""megdet.specs: one torch-free spec per component family, each rule in one ``check()`` that names the
key and the fix; BN size converted from images to ranks in one place; the mask head's norm following
the same groups; the memory model finding the mask head by ``mask_on``."""
import dataclasses
import subprocess
import sys

import pytest

from hpc.errors import UserError
from megdet import config, memory_model
from megdet.model.settings import LEVEL_STRIDES
from megdet.specs import (BNGroups, CheckpointIdentity, DataSpec, EvalSpec, ModelSpec, SolverSpec, TrainSpec)
from tests.multirank import REPO


def test_the_specs_and_a_whole_config_load_without_torch():
    code = ("import sys, megdet.specs, megdet.config; megdet.config.load('largedet_mask_rcnn_coco_17min'); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("spec, check, message", [
    (ModelSpec(name="resnet18_fpn", anchor_sizes=[8, 16]), (), "model.anchor_sizes=[8, 16] needs 5 positive sizes"),
    (ModelSpec(norm="sync"), (), "model.norm='sync' is not one of cgbn, frozen, bn: choose one of them"),
    (ModelSpec(mask_head_norm="gn"), (), "model.mask_head_norm='gn' is not one of"),
    (DataSpec(flip_prob=2.0), (), "data.flip_prob=2.0 must be in [0, 1]"),
    (DataSpec(num_workers=-1), (), "data.num_workers=-1 must be >= 0"),
    (SolverSpec(optimizer="adam"), (), "solver.optimizer='adam' is not one of sgd, pmd_lamb, lamb, lars"),
    (SolverSpec(pmd_kernel="compiled"), (), "applies to pmd_lamb, not sgd: drop it or set solver.pmd_kernel"),
    (SolverSpec(steps=[10, 5], max_iter=20), (), "solver.steps=[10, 5] must be increasing"),
    (TrainSpec(amp="fp8"), (False,), "train.amp='fp8' is not one of"),
    (TrainSpec(target_ap=[30.0, 20.0]), (False,), "gives a mask AP but the model has no masks"),
    (EvalSpec(nms_threshold=1.5), (), "eval.nms_threshold=1.5 must be in [0, 1]"),
    (BNGroups(norms=("bn", None), bn_size=8, images_per_rank=2), (),
     "model.bn_size=8 applies to model.norm=cgbn only (it is 'bn'): set model.bn_size=null or model.norm=cgbn"),
    (BNGroups(norms=("cgbn",), bn_size=6, images_per_rank=4), (), "is not a positive multiple of data.images_per_rank"),
])
def test_each_spec_checks_its_own_rules_naming_key_and_fix(spec, check, message):
    with pytest.raises(UserError) as caught:
        spec.check(*check)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_default_specs_pass_their_checks():
    for spec in (ModelSpec(), DataSpec(), SolverSpec(), EvalSpec()):
        spec.check()
    TrainSpec().check(with_masks=False)


def test_bn_size_is_images_in_the_config_and_ranks_in_the_layers_converted_once():
    groups = BNGroups(norms=("cgbn", None), bn_size=32, images_per_rank=4)
    assert groups.group_size == 8
    assert BNGroups(norms=("cgbn",), bn_size=None, images_per_rank=4).group_size is None, "null: the whole world"
    assert BNGroups(norms=("frozen",), bn_size=None, images_per_rank=4).group_size is None
    cfg = config.load("megdet_r50_fpn_bs256_bn32")
    assert cfg.bn_groups.group_size * cfg.data.images_per_rank == cfg.model.bn_size
    with pytest.raises(UserError, match="model.bn_size=32 is 8 ranks of 4 images, which does not divide the world "
                                        "of 12 ranks"):
        groups.check_world(12, 4, batch_size=48)


def test_the_anchor_count_is_the_number_of_fpn_levels():
    ModelSpec(anchor_sizes=[1] * len(LEVEL_STRIDES)).check()
    with pytest.raises(UserError, match=f"needs {len(LEVEL_STRIDES)} positive sizes"):
        ModelSpec(anchor_sizes=[1] * (len(LEVEL_STRIDES) + 1)).check()


def test_a_cgbn_mask_head_shares_the_bn_groups_and_is_plain_bn_for_inference():
    import torch.nn as nn

    from hpc.cgbn import CrossGPUBatchNorm2d
    from megdet.engine.build import build_model

    cfg = config.load("shapes_mask_r18_cpu", ["model.norm=bn", "model.mask_head_norm=cgbn", "model.bn_size=4"])
    assert cfg.bn_groups.group_size == 1, "bn_size applies to a cross-GPU BN mask head on a per-rank BN backbone"
    training = build_model(cfg).roi_heads.mask_head
    inference = build_model(cfg, inference=True)
    cross = [m for m in training.modules() if isinstance(m, CrossGPUBatchNorm2d)]
    assert cross and all(m.group_ranks == (0,) for m in cross)
    assert not any(isinstance(m, CrossGPUBatchNorm2d) for m in inference.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in inference.roi_heads.mask_head.modules())
    assert set(build_model(cfg).state_dict()) == set(inference.state_dict()), "a checkpoint loads into either"


def test_the_memory_model_adds_the_mask_head_by_mask_on_not_by_name():
    box = memory_model.training_peak(model="resnet50_fpn", norm="bn", pretrained=True, images=2)
    masked = memory_model.training_peak(model="resnet50_fpn", norm="bn", pretrained=True, images=2, mask_on=True)
    named = memory_model.training_peak(model="mask_rcnn_r50_fpn", norm="bn", pretrained=True, images=2, mask_on=True)
    assert masked.gib > box.gib and masked == named
    mask_preset = config.load("largedet_mask_rcnn_coco_17min")
    as_box = config.load("largedet_mask_rcnn_coco_17min", ["model.mask_on=false", "train.target_ap=[37.6]"])
    assert memory_model.fit(mask_preset, 32).gib > memory_model.fit(as_box, 32).gib


def test_a_checkpoint_identity_names_both_models():
    mine = CheckpointIdentity.of(ModelSpec(name="resnet18_fpn", num_classes=3))
    assert mine.mismatch(CheckpointIdentity("resnet18_fpn", 3), "demo") is None
    assert mine.mismatch(CheckpointIdentity("resnet50_fpn", 80), "demo") == (
        "holds a resnet50_fpn with 80 classes, but demo builds a resnet18_fpn with 3")


def test_every_detector_setting_of_the_specs_reaches_the_detector_by_its_own_keyword():
    from megdet.engine.build import model_settings
    from megdet.model.settings import DEFAULTS, PRESETS

    keys = {section: {f.name for f in dataclasses.fields(spec)} & set(DEFAULTS)
            for section, spec in (("model", ModelSpec), ("eval", EvalSpec))}
    cfg = config.load("shapes_mask_r18_cpu")
    expected = {}
    for section, names in keys.items():
        for key in names:
            value = PRESETS["mask_rcnn_r50_fpn"][key]
            value = "frozen" if key == "mask_head_norm" else value
            setattr(getattr(cfg, section), key, list(value) if isinstance(value, tuple) else value)
            expected[key] = value
    assert model_settings(cfg) == expected


def test_model_defaults_are_declared_once():
    import inspect

    from megdet.model import build_detector

    assert inspect.signature(build_detector).parameters["norm"].default == ModelSpec().norm
    assert inspect.signature(build_detector).parameters["name"].default is inspect.Parameter.empty
