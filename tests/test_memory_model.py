"""megdet.memory_model: the rules the peak-memory model rests on, seen in a real training graph (a frozen stage
keeps nothing, a recomputed one only its input), and what ``fit`` does with a GPU's memory."""
import pytest
import torch

from hpc.errors import UserError
from hpc.recompute import saved_tensor_bytes
from megdet import config, memory_model
from megdet.model import build_detector
from tests.test_model import mixed_batch

torch.set_num_threads(min(2, torch.get_num_threads()))


def saved_by_stage(**settings):
    torch.manual_seed(0)
    model = build_detector("resnet18_fpn", num_classes=4, norm="bn", fpn_channels=32, box_head_dim=64,
                           rpn_pre_nms_topk=(100, 100), rpn_post_nms_topk=(50, 50), roi_batch_size_per_image=32,
                           **settings).train()
    backbone = model.backbone
    parts = {"stem": [backbone.conv1, backbone.bn1, backbone.maxpool], "res2": [backbone.layer1],
             "res3": [backbone.layer2], "res4": [backbone.layer3], "res5": [backbone.layer4]}
    images, targets = mixed_batch()
    outputs = {}
    backbone.layer1.register_forward_hook(lambda module, inputs, output: outputs.setdefault("res2", output))
    sizes = saved_tensor_bytes(lambda: model(images, targets), parts,
                               exclude=[*model.parameters(), *model.buffers()])
    return sizes, outputs["res2"]


def test_a_frozen_stage_keeps_nothing_and_a_recomputed_stage_only_its_input():
    trained, _ = saved_by_stage(freeze_at=0)
    assert all(trained[stage] > 0 for stage in memory_model.STAGES)
    frozen, res2_output = saved_by_stage(freeze_at=2, sublinear_stages=("res3",))
    assert "stem" not in frozen and "res2" not in frozen, "no gradient reaches a frozen stage: it keeps nothing"
    assert frozen["res3"] == res2_output.untyped_storage().nbytes(), "a recomputed stage keeps only its input"
    assert frozen["res4"] > trained["res4"], "the next stage keeps the recomputed stage's output"
    assert frozen["res5"] == trained["res5"]


def estimate(**changes):
    settings = dict(model="resnet50_fpn", norm="cgbn", pretrained=True, images=4, recomputed=(), optimizer="sgd")
    settings.update(changes)
    return memory_model.training_peak(**settings).gib


def test_the_estimate_follows_images_norm_recomputation_precision_and_optimizer():
    assert estimate(images=8) - estimate(images=4) == pytest.approx(estimate(images=4) - estimate(images=0))
    assert estimate(norm="frozen") < estimate() and estimate(pretrained=False) > estimate()
    assert estimate(recomputed=("res3",)) < estimate() and estimate(amp="bf16") < estimate()
    assert estimate(optimizer="pmd_lamb") > estimate()
    assert estimate(max_size=1000, min_size=600) < estimate()
    assert estimate(model="resnet101_fpn") > estimate()
    with pytest.raises(UserError, match="no memory figures for model 'resnet152_fpn'"):
        memory_model.measured("resnet152_fpn")


@pytest.mark.parametrize("norm", ["bn", "frozen"])
def test_resnet101_differs_from_resnet50_by_its_res4_as_measured(norm):
    """resnet101_fpn's figures are resnet50_fpn's but for res4 (23 blocks, not 6): its saved tensors,
    measured on both stages at an eighth of the reference size, keep the figures' ratio."""
    r50, r101 = memory_model.MEASURED["resnet50_fpn"], memory_model.MEASURED["resnet101_fpn"]
    for field in ("outputs", "heads", "base"):
        assert getattr(r101, field) == getattr(r50, field)
    trains = norm == "bn"
    assert {k: v for k, v in r101.own[trains].items() if k != "res4"} == \
        {k: v for k, v in r50.own[trains].items() if k != "res4"}
    saved = {}
    for name in ("resnet50_fpn", "resnet101_fpn"):
        stage = build_detector(name, num_classes=4, norm=norm, freeze_at=0).train().backbone.layer3
        res3_output = torch.randn(1, 512, 36, 60, requires_grad=True)
        saved[name] = saved_tensor_bytes(lambda: stage(res3_output), {"res4": [stage]},
                                         exclude=[res3_output, *stage.parameters(), *stage.buffers()])["res4"]
    assert saved["resnet101_fpn"] / saved["resnet50_fpn"] == pytest.approx(r101.own[trains]["res4"] /
                                                                           r50.own[trains]["res4"], rel=0.01)


def test_fit_recomputes_the_largest_saving_first_never_a_frozen_stage_and_refuses_one_line():
    # 8 images per GPU, res3 recomputed, stem and res2 frozen; float32 activations (auto would halve them)
    cfg = config.load("megdet_r50_fpn_bs64_bn64", ["train.amp=none"])
    assert memory_model.fit(cfg, 12).recomputed == ("res3",)
    assert memory_model.fit(cfg, 11).recomputed == ("res3", "res4")
    scratch = config.load("megdet_r50_fpn_bs64_bn64", ["train.amp=none", "model.backbone_weights=null",
                                                       "model.sublinear_stages=[]"])
    assert memory_model.fit(scratch, 12).recomputed[0] == "res2", "from scratch res2 trains and saves the most"
    with pytest.raises(UserError) as caught:
        memory_model.fit(cfg, 6)
    message = str(caught.value)
    assert "\n" not in message and "even with res3, res4, res5 recomputed" in message, message
    assert "spread the batch over 16 GPUs or more (4 images each)" in message
