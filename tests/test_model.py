"""megdet.model: the parts on tiny tensors (anchors, box coder, matching, sampling, level mapping) and
the whole detector on small images (shapes, losses, detections in original coordinates, bad input,
checkpoint loading, norm modes, sublinear memory)."""
import json
import math

import pytest
import torch

from hpc.cgbn import CrossGPUBatchNorm2d, FrozenBatchNorm2d
from hpc.errors import UserError
from megdet.model import MODEL_NAMES, build_detector
from megdet.model.detector import check_target_values
from megdet.model.anchors import AnchorGenerator
from megdet.model.box_coder import DEFAULT_SCALE_CLAMP, BoxCoder
from megdet.model import ops
from megdet.model.matching import BACKGROUND, FOREGROUND, IGNORE, Matcher, sample_labels
from megdet.model.roi_heads import MultiScaleRoIAlign
from tests.test_ops import random_boxes

torch.set_num_threads(min(2, torch.get_num_threads()))
NUM_CLASSES = 4


def target(boxes, labels, crowd=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    crowd = [False] * len(boxes) if crowd is None else crowd
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64),
            "iscrowd": torch.tensor(crowd, dtype=torch.bool)}


def small_detector(**overrides):
    """resnet18_fpn with few proposals and RoIs, so that a step takes well under a second."""
    settings = dict(rpn_pre_nms_topk=(300, 300), rpn_post_nms_topk=(100, 100), roi_batch_size_per_image=64,
                    fpn_channels=32, box_head_dim=64)
    settings.update(overrides)
    return build_detector("resnet18_fpn", num_classes=NUM_CLASSES, norm="bn", **settings)


def mixed_batch():
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 130, generator=generator) * 255, torch.rand(3, 64, 70, generator=generator) * 255,
              torch.rand(3, 75, 64, generator=generator) * 255]
    targets = [target([[10, 12, 60, 80], [70, 5, 125, 40]], [1, 3]),
               target([], []),                                           # no annotations: background only
               target([[0, 0, 64, 40]], [2], crowd=[True])]              # crowd only
    return images, targets


# ---------------------------------------------------------------------------------------------------
# Parts


def test_anchors_cover_every_position_with_each_ratio():
    generator = AnchorGenerator(sizes=(32, 64), aspect_ratios=(0.5, 1.0, 2.0), strides=(4, 8))
    level2, level3 = generator([(3, 5), (2, 3)])
    assert level2.shape == (3 * 5 * 3, 4) and level3.shape == (2 * 3 * 3, 4)
    widths, heights = level2[:, 2] - level2[:, 0], level2[:, 3] - level2[:, 1]
    torch.testing.assert_close(widths * heights, torch.full((45,), 32.0 ** 2))
    torch.testing.assert_close((heights / widths)[:3], torch.tensor([0.5, 1.0, 2.0]))
    centres = (level2[:, :2] + level2[:, 2:]) / 2
    # order (H, W, A): the 3 anchors of position (row 1, column 2) follow 1 * 5 + 2 positions
    torch.testing.assert_close(centres[(1 * 5 + 2) * 3:(1 * 5 + 2) * 3 + 3], torch.tensor([[8.0, 4.0]] * 3))


def test_box_coder_round_trip_and_clamp():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    references = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 50.0, 30.0]])
    targets = torch.tensor([[2.0, -3.0, 14.0, 25.0], [6.0, 4.0, 40.0, 44.0]])
    deltas = coder.encode(references, targets)
    torch.testing.assert_close(deltas[0, 0], torch.tensor(10.0 * (8.0 - 5.0) / 10.0))
    torch.testing.assert_close(coder.decode(deltas, references), targets)
    # class-specific deltas (R, 2*4) decode to (R, 2*4)
    assert coder.decode(deltas.repeat(1, 2), references).shape == (2, 8)
    huge = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    box = coder.decode(huge, references[:1])[0]
    torch.testing.assert_close(box[2] - box[0], 10.0 * torch.tensor(DEFAULT_SCALE_CLAMP).exp())


def test_matcher_thresholds_low_quality_and_crowd():
    matcher = Matcher(low_threshold=0.3, high_threshold=0.7, allow_low_quality_matches=True, crowd_ioa_threshold=0.7)
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0], [200.0, 0.0, 300.0, 100.0]])
    crowd = torch.tensor([False, False, True])
    candidates = torch.tensor([
        [0.0, 0.0, 10.0, 9.0],       # IoU 0.9 with gt 0: foreground
        [0.0, 0.0, 10.0, 5.0],       # IoU 0.5: ignored
        [50.0, 50.0, 60.0, 60.0],    # nothing: background
        [100.0, 100.0, 115.0, 115.0],  # IoU 0.44 with gt 1, its best: foreground (low-quality match)
        [210.0, 10.0, 230.0, 30.0],  # inside the crowd region: ignored, not foreground
        [100.0, 100.0, 120.0, 120.0],  # IoU 0.25 with gt 1: background
    ])
    matched, labels = matcher(gt, crowd, candidates)
    assert labels.tolist() == [FOREGROUND, IGNORE, BACKGROUND, FOREGROUND, IGNORE, BACKGROUND]
    assert matched[0] == 0 and matched[3] == 1
    _, no_gt_labels = matcher(torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool), candidates)
    assert (no_gt_labels == BACKGROUND).all()


def test_sampling_caps_positives_and_fills_with_negatives():
    labels = torch.tensor([1] * 100 + [0] * 500 + [-1] * 100)
    sample = sample_labels(labels, batch_size=256, positive_fraction=0.25)
    positive = sample.indices[sample.positive]
    negative = sample.indices[sample.valid & ~sample.positive]
    assert len(positive) == 64 and len(negative) == 192 and sample.valid.all()
    assert (labels[positive] == 1).all() and (labels[negative] == 0).all()
    assert len(set(sample.indices.tolist())) == 256
    assert sample.positive[:64].all() and not sample.positive[64:].any(), "positives come first"
    few = torch.tensor([1] * 3 + [0] * 500)
    sample = sample_labels(few, batch_size=256, positive_fraction=0.5)
    assert sample.positive.sum() == 3 and (sample.valid & ~sample.positive).sum() == 253
    # fewer eligible candidates than slots: the rest of the slots are padding, never a positive
    scarce = torch.tensor([1] * 3 + [0] * 5 + [-1] * 40)
    sample = sample_labels(scarce, batch_size=32, positive_fraction=0.5)
    assert sample.indices.shape == (32,) and sample.valid.tolist() == [True] * 8 + [False] * 24
    assert sorted(sample.indices[:3].tolist()) == [0, 1, 2] and sorted(sample.indices[3:8].tolist()) == [3, 4, 5, 6, 7]
    assert sample_labels(torch.zeros(0, dtype=torch.int8), batch_size=8, positive_fraction=0.5).indices.shape == (0,)


def test_sampling_is_uniform_over_positives_and_over_negatives():
    """Each positive is in the sample with probability cap / #positives, each negative with probability
    (batch - #sampled positives) / #negatives, whatever its position (a biased top-k would favour some)."""
    torch.manual_seed(0)
    labels = torch.tensor([0] * 30 + [1] * 10 + [-1] * 5 + [0] * 30)
    draws = 4000
    counts = torch.zeros(labels.shape[0])
    for _ in range(draws):
        sample = sample_labels(labels, batch_size=16, positive_fraction=0.25)
        counts[sample.indices[sample.valid]] += 1
    frequency = counts / draws
    assert (frequency[labels == -1] == 0).all()
    # 4 of 10 positives and 12 of 60 negatives per draw; 4000 draws put each frequency within 0.03 (> 4 sigma)
    assert (frequency[labels == 1] - 0.4).abs().max() < 0.03
    assert (frequency[labels == 0] - 0.2).abs().max() < 0.03


def test_roi_level_mapping_follows_the_fpn_rule():
    pooler = MultiScaleRoIAlign(output_size=7, strides=(4, 8, 16, 32), sampling_ratio=0, aligned=True)
    sides = torch.tensor([10.0, 111.0, 112.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack((torch.zeros(7), torch.zeros(7), sides, sides), dim=1)
    expected = [min(max(math.floor(4 + math.log2(s / 224 + 1e-8)), 2), 5) - 2 for s in sides.tolist()]
    assert pooler.level_of(boxes).tolist() == expected == [0, 0, 1, 2, 2, 3, 3]


def test_multiscale_pooling_equals_each_roi_pooled_on_its_own_level():
    """One level sort, one host read of the level sizes and sampling grids: the same as pooling every
    RoI alone on the level its size maps to (and the RoIs handed in stay as they were)."""
    generator = torch.Generator().manual_seed(3)
    strides = (4, 8, 16, 32)
    pooler = MultiScaleRoIAlign(output_size=7, strides=strides, sampling_ratio=0, aligned=True)
    features = [torch.randn(2, 3, 256 // s, 320 // s, generator=generator, dtype=torch.float64) for s in strides]
    boxes = [random_boxes(n, 250, generator, max_side=250.0).double() for n in (12, 5)]
    before = [b.clone() for b in boxes]
    pooled = pooler(features, boxes)
    expected = []
    for image, image_boxes in enumerate(boxes):
        for box, level in zip(image_boxes, pooler.level_of(image_boxes).tolist()):
            roi = torch.cat((torch.tensor([float(image)], dtype=torch.float64), box))[None]
            expected.append(ops.roi_align_pytorch(features[level], roi, (7, 7), 1.0 / strides[level], 0, True))
    torch.testing.assert_close(pooled, torch.cat(expected))
    assert len(set(pooler.level_of(torch.cat(boxes)).tolist())) > 1, "the boxes must span several levels"
    assert all(torch.equal(b, a) for b, a in zip(boxes, before))


@pytest.mark.parametrize("aligned, sampling_ratio", [(True, 0), (False, 0), (True, 2)])
def test_pooling_every_level_without_a_read_equals_pooling_level_by_level(aligned, sampling_ratio):
    """The formulation of torchvision's compiled path (each level pools every RoI, the others collapsed to
    empty boxes) gives the pure path's values and gradients, here with the kernel that runs on this
    machine."""
    generator = torch.Generator().manual_seed(5)
    strides = (4, 8, 16, 32)
    pooler = MultiScaleRoIAlign(output_size=7, strides=strides, sampling_ratio=sampling_ratio, aligned=aligned)
    features = [torch.randn(2, 3, 256 // s, 320 // s, generator=generator, dtype=torch.float64, requires_grad=True)
                for s in strides]
    boxes = [random_boxes(n, 250, generator, max_side=250.0).double() for n in (12, 5)]
    rois = torch.cat([torch.cat((torch.full_like(b[:, :1], i), b), dim=1) for i, b in enumerate(boxes)])
    levels = pooler.level_of(rois[:, 1:])
    assert len(set(levels.tolist())) > 2, "the boxes must span several levels"
    results = []
    for pool in (pooler._pool_by_level, pooler._pool_every_level):
        pooled = pool(features, rois, levels)
        gradients = torch.autograd.grad((pooled * torch.arange(pooled.numel()).view_as(pooled)).sum(), features,
                                        allow_unused=True)  # a level without RoIs has no graph by level
        results.append((pooled, [torch.zeros_like(f) if g is None else g for f, g in zip(features, gradients)]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for every_level, by_level in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(every_level, by_level)


def test_proposals_leave_unusable_boxes_out_without_selecting_them_out():
    """Non-finite or (clipped) empty boxes go to NMS as copies of the best box, which suppresses them: the
    proposals are those of NMS over the usable boxes alone, and an image without any gets zero boxes."""
    torch.manual_seed(0)
    rpn = small_detector(rpn_pre_nms_topk=(60, 60), rpn_post_nms_topk=(50, 50)).rpn.eval()
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    anchors = rpn.anchor_generator(sizes)
    objectness = [torch.randn(3, len(a)) for a in anchors]
    deltas = [torch.randn(3, len(a), 4) for a in anchors]
    deltas[0][0, :40] = float("nan")                     # image 0: non-finite boxes
    objectness[1][0, :10] = float("inf")                 # and non-finite scores
    image_sizes = [(64, 80), (20, 24), (64, 80)]         # image 1: most boxes outside it, empty once clipped
    deltas = [d.clone() for d in deltas]
    for d in deltas:
        d[2] = float("nan")                              # image 2: nothing usable
    proposals = rpn.propose(anchors, objectness, deltas, image_sizes)
    for image in (0, 1):
        boxes, scores, levels = [], [], []
        for level, (a, o, d) in enumerate(zip(anchors, objectness, deltas)):
            top_scores, top = o[image].topk(min(60, o.shape[1]))
            boxes.append(rpn.box_coder.decode(d[image][top], a[top]))
            scores.append(top_scores)
            levels.append(torch.full_like(top, level))
        boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        usable = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        boxes = ops.clip_boxes(boxes, image_sizes[image])
        keep = torch.nonzero(usable & ops.nonempty(boxes)).squeeze(1)
        assert 0 < len(keep) < len(boxes), "the case needs both usable and unusable boxes"
        kept = keep[ops.batched_nms(boxes[keep], scores[keep], levels[keep], rpn.nms_threshold)][:50]
        torch.testing.assert_close(proposals[image], boxes[kept], rtol=0, atol=0)
    assert proposals[2].shape[1] == 4 and (proposals[2] == 0).all()


# ---------------------------------------------------------------------------------------------------
# The detector


def test_builder_names_and_bad_settings():
    assert {"resnet18_fpn", "resnet50_fpn"} <= set(MODEL_NAMES)
    with pytest.raises(ValueError, match="unknown model"):
        build_detector("resnet7_fpn", num_classes=3)
    with pytest.raises(TypeError, match="unknown model settings"):
        build_detector("resnet18_fpn", num_classes=3, norm="bn", fpn_chanels=64)
    with pytest.raises(ValueError, match="sublinear_stages"):
        build_detector("resnet18_fpn", num_classes=3, norm="bn", sublinear_stages=("layer9",))


def test_train_on_mixed_sizes_empty_and_crowd_only_images():
    torch.manual_seed(0)
    model = small_detector().train()
    images, targets = mixed_batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    assert losses["loss_cls"] > 0 and losses["loss_rpn_cls"] > 0
    sum(losses.values()).backward()
    head = model.roi_heads.predictor
    assert head.cls_score.weight.grad.abs().sum() > 0 and head.bbox_pred.weight.grad.abs().sum() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_background_only_batch_has_zero_box_losses():
    torch.manual_seed(0)
    model = small_detector().train()
    images, targets = mixed_batch()
    losses = model(images[1:], targets[1:])
    assert losses["loss_rpn_box"] == 0 and losses["loss_box"] == 0
    assert losses["loss_cls"] > 0


def test_eval_returns_detections_in_original_coordinates():
    torch.manual_seed(0)
    model = small_detector(score_threshold=0.0).eval()
    images, _ = mixed_batch()
    original_sizes = [(192, 260), (640, 700), (75, 64)]
    with torch.no_grad():
        in_input = model(images)
        in_original = model(images, original_sizes=original_sizes)
    assert len(in_original) == 3
    for image, before, after, (height, width) in zip(images, in_input, in_original, original_sizes):
        assert set(after) == {"boxes", "scores", "labels"}
        assert after["boxes"].dtype == torch.float32 and after["labels"].dtype == torch.int64
        count = len(after["boxes"])
        assert 0 < count <= 100 and after["boxes"].shape == (count, 4) and after["scores"].shape == (count,)
        assert ((after["labels"] >= 1) & (after["labels"] <= NUM_CLASSES)).all()
        assert (after["scores"][:-1] >= after["scores"][1:]).all()
        boxes = before["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= image.shape[2]).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= image.shape[1]).all()
        scale = torch.tensor([width / image.shape[2], height / image.shape[1]] * 2)
        torch.testing.assert_close(after["boxes"], boxes * scale)
        torch.testing.assert_close(after["scores"], before["scores"])


def bad_case(case, images, targets):
    if case == "inverted box":
        targets[0]["boxes"][1] = torch.tensor([70.0, 5.0, 60.0, 40.0])
    elif case == "label 0":
        targets[0]["labels"][0] = 0
    elif case == "label too big":
        targets[0]["labels"][0] = NUM_CLASSES + 1
    elif case == "tiny image":
        images[1] = torch.rand(3, 20, 70)
    elif case == "nan pixel":
        images[2][0, 5, 5] = float("nan")
    elif case == "nan box":
        targets[0]["boxes"][0, 2] = float("nan")
    elif case == "int32 image":
        images[0] = images[0].to(torch.int32)
    elif case == "no targets":
        targets = None
    elif case == "missing iscrowd":
        del targets[2]["iscrowd"]
    return images, targets


@pytest.mark.parametrize("case, kind, message", [
    ("tiny image", ValueError, "smaller than the network's stride 32"),
    ("int32 image", TypeError, "dtype"),
    ("no targets", ValueError, "no targets"),
    ("missing iscrowd", ValueError, "lacks"),
])
def test_a_broken_tensor_contract_is_a_bug_not_a_user_error(case, kind, message):
    """What reaches the model comes from our loader: a wrong shape, dtype or device is a bug in the caller,
    raised as ValueError/TypeError so the CLI shows its traceback (UserError is for what a user gave)."""
    model = small_detector().train()
    images, targets = bad_case(case, *mixed_batch())
    with pytest.raises(kind, match=message) as caught:
        model(images, targets)
    assert not isinstance(caught.value, UserError)


@pytest.mark.parametrize("case, message", [
    ("inverted box", "x2 <= x1"),
    ("label 0", "outside 1..4"),
    ("label too big", "outside 1..4"),
    ("nan box", "not finite"),
    ("nan pixel", "NaN"),
])
def test_bad_values_make_every_training_loss_nan_and_the_host_checks_name_them(case, message):
    """Training reads no value from the device: a bad target or pixel makes every loss NaN (the guard then
    skips the step), with no error from inside the model, no NaN gradient and no NaN BN statistic. The
    host-side checks name the value: check_target_values (megdet's loader runs it) and inference."""
    torch.manual_seed(0)
    model = small_detector().train()
    images, targets = bad_case(case, *mixed_batch())
    losses = model(images, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}
    assert all(torch.isnan(loss) for loss in losses.values()), losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(torch.isfinite(b).all() for b in model.buffers())
    with pytest.raises(ValueError if case == "nan pixel" else UserError, match=message):
        if case == "nan pixel":
            model.eval()(images)
        else:
            check_target_values(targets, NUM_CLASSES)
    check_target_values(mixed_batch()[1], NUM_CLASSES)


def test_uint8_images_give_the_losses_of_the_same_pixels_as_float():
    """The loader sends uint8 (a quarter of the bytes to the GPU); the detector converts them itself."""
    images, targets = mixed_batch()
    pixels = [image.round().clamp(0, 255) for image in images]
    losses = []
    for batch in (pixels, [p.to(torch.uint8) for p in pixels]):
        torch.manual_seed(0)
        model = small_detector().train()
        torch.manual_seed(1)
        losses.append(model(batch, targets))
    assert losses[0].keys() == losses[1].keys()
    for name in losses[0]:
        torch.testing.assert_close(losses[0][name], losses[1][name], rtol=0, atol=0, msg=name)


def torchvision_resnet_state_dict(depth):
    """Random tensors under the keys and shapes of torchvision's ``resnet{depth}().state_dict()``,
    written from torchvision's layout (not from our module): conv1/bn1, layer1-4 of blocks, fc."""
    bottleneck = depth != 18
    blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    generator = torch.Generator().manual_seed(depth)
    state = {}

    def conv(key, out_channels, in_channels, kernel):
        state[f"{key}.weight"] = torch.randn(out_channels, in_channels, kernel, kernel, generator=generator)

    def bn(key, channels):
        state[f"{key}.weight"] = torch.rand(channels, generator=generator) + 0.5
        state[f"{key}.bias"] = torch.randn(channels, generator=generator)
        state[f"{key}.running_mean"] = torch.randn(channels, generator=generator)
        state[f"{key}.running_var"] = torch.rand(channels, generator=generator) + 0.5
        state[f"{key}.num_batches_tracked"] = torch.tensor(0)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    in_channels = 64
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        out_channels = width * 4 if bottleneck else width
        for index in range(count):
            key = f"layer{stage}.{index}"
            if bottleneck:
                conv(f"{key}.conv1", width, in_channels, 1)
                bn(f"{key}.bn1", width)
                conv(f"{key}.conv2", width, width, 3)
                bn(f"{key}.bn2", width)
                conv(f"{key}.conv3", out_channels, width, 1)
                bn(f"{key}.bn3", out_channels)
            else:
                conv(f"{key}.conv1", width, in_channels, 3)
                bn(f"{key}.bn1", width)
                conv(f"{key}.conv2", width, width, 3)
                bn(f"{key}.bn2", width)
            if index == 0 and (stage > 1 or in_channels != out_channels):
                conv(f"{key}.downsample.0", out_channels, in_channels, 1)
                bn(f"{key}.downsample.1", out_channels)
            in_channels = out_channels
    state["fc.weight"] = torch.randn(1000, in_channels, generator=generator)
    state["fc.bias"] = torch.randn(1000, generator=generator)
    return state


@pytest.mark.parametrize("depth, name", [(18, "resnet18_fpn"), (50, "resnet50_fpn")])
def test_torchvision_checkpoint_loads_every_key(tmp_path, depth, name):
    state = torchvision_resnet_state_dict(depth)
    path = tmp_path / f"resnet{depth}.pth"
    torch.save(state, path)
    model = build_detector(name, num_classes=3, norm="frozen", backbone_weights=str(path), freeze_at=0)
    loaded = model.backbone.state_dict()
    expected = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype), msg=key)
    assert isinstance(model.backbone.layer3[0].bn1, FrozenBatchNorm2d)


def test_checkpoint_of_another_depth_is_a_user_error(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_resnet_state_dict(50), path)
    with pytest.raises(UserError, match="does not fit this ResNet"):
        build_detector("resnet18_fpn", num_classes=3, norm="bn", backbone_weights=str(path))
    with pytest.raises(UserError, match="is not a file"):
        build_detector("resnet18_fpn", num_classes=3, norm="bn", backbone_weights=str(tmp_path / "none.pth"))


def test_norm_modes_and_frozen_stem_and_stage1():
    model = build_detector("resnet18_fpn", num_classes=3, norm="cgbn", freeze_at=2)
    backbone = model.backbone
    assert isinstance(backbone.layer2[0].bn1, CrossGPUBatchNorm2d)
    assert isinstance(backbone.bn1, FrozenBatchNorm2d) and isinstance(backbone.layer1[0].bn1, FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in backbone.conv1.parameters())
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    images, targets = mixed_batch()
    model.train()
    sum(model(images[:1], targets[:1]).values()).backward()
    assert backbone.layer2[0].downsample[0].weight.grad.abs().sum() > 0 and backbone.conv1.weight.grad is None


def test_sublinear_stages_give_the_same_losses_and_gradients():
    torch.manual_seed(0)
    plain = small_detector()
    recomputed = small_detector(sublinear_stages=("res2", "res3", "res4", "res5"))
    recomputed.load_state_dict(plain.state_dict())
    images, targets = mixed_batch()
    losses = []
    for model in (plain, recomputed):
        torch.manual_seed(1)  # the same anchor and RoI samples
        losses.append(model.train()(images, targets))
        sum(losses[-1].values()).backward()
    for name in losses[0]:
        torch.testing.assert_close(losses[0][name], losses[1][name], msg=name)
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    torch.testing.assert_close(plain.backbone.layer2[0].bn1.running_mean,
                               recomputed.backbone.layer2[0].bn1.running_mean)


def test_bench_model_runs_at_a_tiny_size(tmp_path, capsys):
    from megdet.cli import main

    assert main(["bench", "model", "--models", "resnet18_fpn", "--sizes", "64", "--batch", "1", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "model.json").read_text())
    assert [(row["settings"], row["sublinear"]) for row in result["rows"]] == \
        [("equal", "-"), ("defaults", "-"), ("defaults", "res2,res3")]
    assert result["inputs"]["images"] == {"64": "64x107"}  # 800 x 1333 at 800
    assert all(row["s_per_image"] > 0 and row["peak_MiB"] > 0 for row in result["rows"])
    assert all(row["model_MiB"] > 0 and row["model_vs_measured"] > 0 for row in result["rows"]), "megdet.memory_model beside"
    assert "| resnet18_fpn | 64 |" in (tmp_path / "model.md").read_text()
    if not torch.cuda.is_available():
        assert main(["bench", "model", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "--device cuda" in capsys.readouterr().err
