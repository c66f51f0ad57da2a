"""Mask R-CNN building blocks on real COCO polygons and a crowd RLE: decoding segmentations
(megdet.data.segmentation), mask targets and pasting (megdet.model.mask_head) against references
written here from the definitions (pycocotools rasterisation, a per-sample RoIAlign, a per-pixel
bilinear paste, PIL's resize), the head, its loss, RLE encoding, and mask AP of the ground truth."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from hpc.cgbn import FrozenBatchNorm2d, convert_model
from hpc.errors import UserError
from megdet.data.segmentation import has_segmentations, masks_for_image
from megdet.engine import evaluate
from megdet.model import mask_head
from megdet.model.mask_head import (MaskHead, encode_masks, mask_loss, mask_probabilities, mask_targets,
                                    paste_masks)
from tests.conftest import REALDATA

torch.set_num_threads(min(2, torch.get_num_threads()))

ICEVISION = REALDATA / "icevision_coco6" / "annotations.json"
MMPOSE = REALDATA / "mmpose_coco4" / "test_coco.json"
VOC = REALDATA / "padilla_voc100" / "instances_default.json"
REAL_SETS = {"icevision_coco6": ICEVISION, "mmpose_coco4": MMPOSE}
# A soft value this close to the 0.5 threshold may fall on either side between float32 and float64.
THRESHOLD_TIE = 1e-5


def needs(path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (the shared real data, ../shared/realdata)")


def images_with_annotations(path):
    """[(image entry, its annotations)] of a COCO file, images without annotations left out."""
    dataset = json.loads(path.read_text())
    annotations = {}
    for annotation in dataset["annotations"]:
        annotations.setdefault(annotation["image_id"], []).append(annotation)
    return [(image, annotations[image["id"]]) for image in dataset["images"] if image["id"] in annotations]


def decode(image, annotations, out_height=None, out_width=None, flip=False, segmentations=None):
    """masks_for_image of an image's annotations (at the original size by default)."""
    return masks_for_image([a["segmentation"] for a in annotations] if segmentations is None else segmentations,
                           image_id=image["id"], annotation_ids=[a["id"] for a in annotations],
                           height=image["height"], width=image["width"], out_height=out_height or image["height"],
                           out_width=out_width or image["width"], flip=flip)


def pycocotools_mask(segmentation, height, width):
    """The reference raster: pycocotools' own decoding of a polygon list or an uncompressed RLE."""
    rles = mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(mask_utils.merge(rles) if isinstance(rles, list) else rles)


# --------------------------------------------------------------------------------------------------
# Decoding segmentations


@needs(ICEVISION)
@needs(MMPOSE)
@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_masks_at_the_original_size_are_pycocotools_rasters_and_flip_mirrors_them(name):
    for image, annotations in images_with_annotations(REAL_SETS[name]):
        masks = decode(image, annotations)
        assert masks.dtype == np.uint8 and masks.shape == (len(annotations), image["height"], image["width"])
        for mask, annotation in zip(masks, annotations):
            assert np.array_equal(mask, pycocotools_mask(annotation["segmentation"], image["height"], image["width"]))
        assert np.array_equal(decode(image, annotations, flip=True), masks[:, :, ::-1])


def polygon_reference(polygons, height, width):
    """bool [height, width]: pixels whose centre (x + 0.5, y + 0.5) is inside any of ``polygons``
    (flat [x1, y1, ...] lists), by the even-odd crossing rule."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    covered = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        x0, y0 = np.asarray(polygon[0::2], dtype=np.float64), np.asarray(polygon[1::2], dtype=np.float64)
        inside = np.zeros((height, width), dtype=bool)
        for xa, ya, xb, yb in zip(x0, y0, np.roll(x0, -1), np.roll(y0, -1)):
            if ya == yb:
                continue
            crossing = xa + (ys - ya) * (xb - xa) / (yb - ya)
            inside ^= ((ya > ys) != (yb > ys)) & (xs < crossing)
        covered |= inside
    return covered


def edge_pixels(mask):
    """bool [H, W]: pixels with a 4-neighbour of the other value, outside the image counting as False."""
    padded = np.pad(mask, 1)
    centre = padded[1:-1, 1:-1]
    return ((padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre) | (padded[1:-1, :-2] != centre)
            | (padded[1:-1, 2:] != centre))


@needs(ICEVISION)
@needs(MMPOSE)
@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_resized_polygon_masks_are_the_scaled_polygons_at_pixel_centres(name):
    """Polygons scaled per axis (x by 0.6, y by 1.7) and rasterised at the output size equal the
    pixel-centre rule on the scaled polygons, except on edge pixels (pycocotools rounds vertices to
    1/5 pixel): every disagreeing pixel touches the reference's edge, and IoU >= 0.95."""
    for image, annotations in images_with_annotations(REAL_SETS[name]):
        height, width = image["height"], image["width"]
        out_height, out_width = int(height * 1.7 + 0.5), int(width * 0.6 + 0.5)
        scale = np.array([out_width / width, out_height / height])
        masks = decode(image, annotations, out_height, out_width).astype(bool)
        for mask, annotation in zip(masks, annotations):
            if annotation["iscrowd"]:
                continue
            scaled = [(np.reshape(p, (-1, 2)) * scale).reshape(-1) for p in annotation["segmentation"]]
            reference = polygon_reference(scaled, out_height, out_width)
            assert not (mask != reference)[~edge_pixels(reference)].any()
            assert (mask & reference).sum() / (mask | reference).sum() >= 0.95


@needs(ICEVISION)
@pytest.mark.parametrize("scale", [0.3, 0.6, 1.7])
def test_resized_rle_masks_match_pil_bilinear_of_the_full_mask(scale):
    """RLEs (the real crowd region, and every polygon turned into a compressed RLE at the original size)
    are decoded, resized as PIL resizes the image (BILINEAR, float) and thresholded at 0.5: identical to
    PIL except for pixels whose coverage is within THRESHOLD_TIE of 0.5 (exact halves when upsampling)."""
    for image, annotations in images_with_annotations(ICEVISION):
        height, width = image["height"], image["width"]
        out_height, out_width = int(height * scale + 0.5), int(width * scale + 0.5)
        full = [pycocotools_mask(a["segmentation"], height, width) for a in annotations]
        rles = [a["segmentation"] if a["iscrowd"] else mask_utils.encode(np.asfortranarray(m))
                for a, m in zip(annotations, full)]
        assert all(isinstance(r["counts"], list if a["iscrowd"] else bytes) for r, a in zip(rles, annotations))
        masks = decode(image, annotations, out_height, out_width, segmentations=rles)
        for mask, reference in zip(masks, full):
            coverage = np.asarray(Image.fromarray(reference.astype(np.float32), mode="F")
                                  .resize((out_width, out_height), Image.BILINEAR))
            decided = np.abs(coverage - 0.5) > THRESHOLD_TIE
            assert np.array_equal(mask[decided], (coverage >= 0.5)[decided])
            assert not (~decided & ~edge_pixels(coverage >= 0.5)).any(), "ties only on the mask's edge"


@needs(ICEVISION)
def test_bad_segmentations_are_one_line_errors_naming_image_and_annotation():
    image, annotations = next((i, a) for i, a in images_with_annotations(ICEVISION) if any(x["iscrowd"] for x in a))
    crowd = next(a for a in annotations if a["iscrowd"])
    taller = {**image, "height": image["height"] + 1}
    cases = [
        ([[10, 10, 20, 20]], "polygon 0 has 4 values, not x, y pairs of at least 3 points"),
        ([[10, 10, 20, 10, 20, 20], [1, 2, 3, 4, 5]], "polygon 1 has 5 values"),
        ({"counts": crowd["segmentation"]["counts"][:-1], "size": crowd["segmentation"]["size"]},
         f"cover {sum(crowd['segmentation']['counts'][:-1])} pixels"),
        ({"size": [image["height"], image["width"]]}, "not an RLE"),
        ([10, 10, 20, 10, 20, 20], "a flat list: wrap a polygon as [[x1, y1, ...]]"),
        ([], "segmentation [] (empty) is neither polygons nor an RLE"),
        ("10 10 20 20", "segmentation of type str is neither polygons nor an RLE"),
    ]
    for segmentation, message in cases:
        with pytest.raises(UserError) as error:
            masks_for_image([segmentation], image_id=image["id"], annotation_ids=[crowd["id"]], height=image["height"],
                            width=image["width"], out_height=50, out_width=60)
        assert message in str(error.value) and "\n" not in str(error.value)
        assert str(error.value).startswith(f"annotation {crowd['id']} of image {image['id']}: ")
    with pytest.raises(UserError) as error:
        decode(taller, [crowd])
    assert str(error.value) == (
        f"annotation {crowd['id']} of image {image['id']}: its RLE is {image['height']}x{image['width']} (h x w) "
        f"but the image is {image['height'] + 1}x{image['width']}: fix the image's height/width in the annotation "
        "file or re-encode the mask at that size")


@needs(ICEVISION)
@needs(VOC)
def test_has_segmentations_tells_mask_data_sets_from_box_only_ones():
    assert has_segmentations(json.loads(ICEVISION.read_text())["annotations"])
    voc = json.loads(VOC.read_text())["annotations"]
    assert voc and all(a["segmentation"] == [] for a in voc) and not has_segmentations(voc)


# --------------------------------------------------------------------------------------------------
# Mask targets


def _axis_samples(start, size, cells, extent):
    """RoIAlign (aligned, adaptive) sample positions along one axis and their bilinear taps, written
    from torchvision's CPU kernel: positions (cells * grid,), low/high cells, their weights, validity."""
    start -= 0.5
    bin_size = size / cells
    grid = math.ceil(bin_size)
    positions = start + (np.arange(cells)[:, None] + (np.arange(grid)[None, :] + 0.5) / grid) * bin_size
    positions = positions.reshape(-1)
    valid = (positions >= -1.0) & (positions <= extent)
    positions = np.maximum(positions, 0.0)
    low = np.floor(positions).astype(np.int64)
    last = low >= extent - 1
    low[last] = extent - 1
    high = np.where(last, low, low + 1)
    high_weight = np.where(last, 0.0, positions - low)
    return grid, low, high, 1.0 - high_weight, high_weight, valid


def roi_align_reference(mask, box, cells):
    """float64 [cells, cells]: RoIAlign of one (H, W) map over box (x1, y1, x2, y2), aligned=True,
    adaptive sampling: every sample's bilinear value computed, then averaged per bin."""
    height, width = mask.shape
    grid_y, y0, y1, wy0, wy1, valid_y = _axis_samples(box[1], box[3] - box[1], cells, height)
    grid_x, x0, x1, wx0, wx1, valid_x = _axis_samples(box[0], box[2] - box[0], cells, width)
    values = (wy0[:, None] * wx0[None, :] * mask[y0[:, None], x0[None, :]]
              + wy0[:, None] * wx1[None, :] * mask[y0[:, None], x1[None, :]]
              + wy1[:, None] * wx0[None, :] * mask[y1[:, None], x0[None, :]]
              + wy1[:, None] * wx1[None, :] * mask[y1[:, None], x1[None, :]])
    values = values * (valid_y[:, None] & valid_x[None, :])
    return values.reshape(cells, grid_y, cells, grid_x).mean(axis=(1, 3))


def jittered_boxes(annotations, rng, width):
    """xyxy boxes: each annotation's box with its corners moved by up to 15% of its size; the first one
    also pushed across the image's right border."""
    boxes = []
    for annotation in annotations:
        x, y, w, h = annotation["bbox"]
        box = np.array([x, y, x + w, y + h]) + rng.uniform(-0.15, 0.15, 4) * [w, h, w, h]
        boxes.append([box[0], box[1], max(box[2], box[0] + 1.0), max(box[3], box[1] + 1.0)])
    boxes[0][2] = width + 0.3 * (boxes[0][2] - boxes[0][0])
    return np.array(boxes, dtype=np.float32)


@needs(ICEVISION)
@needs(MMPOSE)
@pytest.mark.parametrize("name", sorted(REAL_SETS))
def test_mask_targets_equal_a_per_sample_roialign_of_the_pycocotools_raster(name):
    """Targets of jittered boxes (two RoIs per instance, in shuffled order) equal the reference resampled
    mask >= 0.5, except where the reference is within THRESHOLD_TIE of 0.5 (float32 sums of up to
    hundreds of samples against float64)."""
    rng = np.random.default_rng(0)
    for image, annotations in images_with_annotations(REAL_SETS[name]):
        height, width = image["height"], image["width"]
        gt_masks = torch.from_numpy(decode(image, annotations))
        boxes = np.concatenate([jittered_boxes(annotations, rng, width), jittered_boxes(annotations, rng, width)])
        matched = np.tile(np.arange(len(annotations)), 2)
        order = rng.permutation(len(boxes))
        boxes, matched = boxes[order], matched[order]
        targets = mask_targets(gt_masks, torch.from_numpy(matched), torch.from_numpy(boxes))
        assert targets.dtype == torch.float32 and targets.shape == (len(boxes), 28, 28)
        for target, box, index in zip(targets.numpy(), boxes, matched):
            raster = pycocotools_mask(annotations[index]["segmentation"], height, width).astype(np.float64)
            reference = roi_align_reference(raster, box.astype(np.float64), 28)
            decided = np.abs(reference - 0.5) > THRESHOLD_TIE
            assert np.array_equal(target[decided], (reference >= 0.5)[decided].astype(np.float32))
            assert (~decided).sum() <= 2
        assert set(np.unique(targets.numpy())) <= {0.0, 1.0} and targets.sum() > 0


def test_mask_targets_of_no_rois_and_of_an_exact_rectangle():
    gt_masks = torch.zeros((2, 40, 50), dtype=torch.uint8)
    gt_masks[1, 10:20, 30:44] = 1
    assert mask_targets(gt_masks, torch.zeros(0, dtype=torch.int64), torch.zeros((0, 4))).shape == (0, 28, 28)
    rois = torch.tensor([[30.0, 10.0, 44.0, 20.0], [30.0, 10.0, 44.0, 20.0], [25.0, 10.0, 44.0, 20.0]])
    targets = mask_targets(gt_masks, torch.tensor([1, 0, 1]), rois)
    assert targets[0].eq(1).all() and targets[1].eq(0).all()
    # the box starts 5 px (of 19) left of the rectangle: 5 / 19 * 28 = 7.4 columns are background
    assert targets[2][:, :7].eq(0).all() and targets[2][:, 8:].eq(1).all()
    pasted = paste_masks(targets[:1], rois[:1], (40, 50))
    assert torch.equal(pasted[0], gt_masks[1].bool()), "a mask pasted into its own box is the mask"


# --------------------------------------------------------------------------------------------------
# Pasting


def paste_reference(probs, box, height, width, threshold):
    """(expected, tie) bool [height, width]: expected pixels are those whose centre lies in box (x1, y1,
    x2, y2) and where the M x M mask, interpolated bilinearly at that centre (cell centres at the box's
    cell centres, edge values kept to the border), is >= threshold; tie where that value is within
    THRESHOLD_TIE of the threshold."""
    cells = probs.shape[0]
    out = np.zeros((height, width), dtype=bool)
    tie = np.zeros((height, width), dtype=bool)
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        return out, tie
    ys = np.arange(height) + 0.5
    xs = np.arange(width) + 0.5
    rows = np.nonzero((ys >= y1) & (ys < y2))[0]
    cols = np.nonzero((xs >= x1) & (xs < x2))[0]
    v = np.clip((ys[rows] - y1) / ((y2 - y1) / cells) - 0.5, 0, cells - 1)
    u = np.clip((xs[cols] - x1) / ((x2 - x1) / cells) - 0.5, 0, cells - 1)
    i0, j0 = np.floor(v).astype(int), np.floor(u).astype(int)
    i1, j1 = np.minimum(i0 + 1, cells - 1), np.minimum(j0 + 1, cells - 1)
    fy, fx = (v - i0)[:, None], (u - j0)[None, :]
    value = ((1 - fy) * (1 - fx) * probs[np.ix_(i0, j0)] + (1 - fy) * fx * probs[np.ix_(i0, j1)]
             + fy * (1 - fx) * probs[np.ix_(i1, j0)] + fy * fx * probs[np.ix_(i1, j1)])
    out[np.ix_(rows, cols)] = value >= threshold
    tie[np.ix_(rows, cols)] = np.abs(value - threshold) <= THRESHOLD_TIE
    return out, tie


def smooth_probabilities(count, generator):
    """``Tensor[count, 28, 28]`` in (0, 1) with blob-like regions above 0.5 (random 5x5, upsampled)."""
    return F.interpolate(torch.rand(count, 1, 5, 5, generator=generator), size=(28, 28), mode="bilinear",
                         align_corners=False)[:, 0]


def test_paste_matches_a_per_pixel_bilinear_reference(monkeypatch):
    """Fractional boxes, some crossing the image's border, a sub-pixel one and an empty one; the result
    equals the reference except where the reference is within THRESHOLD_TIE of the threshold; chunking
    over masks changes nothing."""
    generator = torch.Generator().manual_seed(0)
    height, width = 61, 83
    corners = torch.rand(14, 2, generator=generator) * torch.tensor([width, height]) - 10
    sides = 2 + torch.rand(14, 2, generator=generator) * 50
    boxes = torch.cat((corners, corners + sides), dim=1)
    boxes[12] = torch.tensor([20.2, 30.1, 20.6, 30.9])
    boxes[13] = torch.tensor([40.0, 5.0, 40.0, 25.0])
    probs = smooth_probabilities(14, generator)
    for threshold in (0.5, 0.3):
        pasted = paste_masks(probs, boxes, (height, width), threshold=threshold)
        assert pasted.dtype == torch.bool and pasted.shape == (14, height, width)
        for mask, prob, box in zip(pasted.numpy(), probs.double().numpy(), boxes.double().numpy()):
            expected, tie = paste_reference(prob, box, height, width, threshold)
            assert np.array_equal(mask[~tie], expected[~tie])
            assert tie.sum() <= 2
        assert pasted[:12].any(dim=(1, 2)).all() and not pasted[13].any()
    at_once = paste_masks(probs, boxes, (height, width))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(paste_masks(probs, boxes, (height, width)), at_once), "float32 under autocast"
    monkeypatch.setattr(mask_head, "PASTE_CHUNK_BYTES", 3 * 4 * height * width)  # chunks of 3 masks
    assert torch.equal(paste_masks(probs, boxes, (height, width)), at_once)


def test_paste_of_an_integer_box_is_a_bilinear_resize_placed_in_the_image():
    """For a box on whole pixels, pasting is torch's bilinear resize of the mask to the box's size
    (align_corners=False), cropped to the image, thresholded: the definition in the brief."""
    generator = torch.Generator().manual_seed(1)
    probs = smooth_probabilities(3, generator)
    boxes = torch.tensor([[3.0, 4.0, 40.0, 19.0], [10.0, 0.0, 17.0, 50.0], [30.0, 20.0, 70.0, 60.0]])
    height, width = 45, 52
    pasted = paste_masks(probs, boxes, (height, width))
    for mask, prob, box in zip(pasted, probs, boxes.long().tolist()):
        x1, y1, x2, y2 = box
        resized = F.interpolate(prob[None, None].double(), size=(y2 - y1, x2 - x1), mode="bilinear",
                                align_corners=False)[0, 0]
        canvas = torch.zeros((max(y2, height), max(x2, width)), dtype=torch.float64)
        canvas[y1:y2, x1:x2] = resized
        canvas = canvas[:height, :width]
        decided = (canvas - 0.5).abs() > THRESHOLD_TIE
        assert torch.equal(mask[decided], (canvas >= 0.5)[decided])


@needs(ICEVISION)
@needs(MMPOSE)
def test_targets_pasted_back_into_their_boxes_recover_the_real_masks():
    """Mask at 28 x 28 in its own box, pasted back: IoU with the full-resolution mask >= 0.85 for
    instances of 1000 pixels or more (the loss is the 28 x 28 quantisation of detailed outlines)."""
    checked = 0
    for path in (ICEVISION, MMPOSE):
        for image, annotations in images_with_annotations(path):
            gt_masks = torch.from_numpy(decode(image, annotations))
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)])
            pasted = paste_masks(mask_targets(gt_masks, torch.arange(len(annotations)), boxes), boxes,
                                 (image["height"], image["width"]))
            truth = gt_masks.bool()
            iou = (pasted & truth).sum(dim=(1, 2)) / (pasted | truth).sum(dim=(1, 2))
            large = truth.sum(dim=(1, 2)) >= 1000
            assert (iou[large] >= 0.85).all(), iou
            checked += int(large.sum())
    assert checked >= 15


# --------------------------------------------------------------------------------------------------
# The head and its loss


def test_mask_head_shapes_and_detectron2_init():
    head = MaskHead(in_channels=256, num_classes=5)
    logits = head(torch.randn(3, 256, 14, 14))
    assert logits.shape == (3, 5, 28, 28)
    convs = [m for m in head.convs if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) and c.out_channels == 256 for c in convs)
    assert head.upsample.stride == (2, 2) and head.upsample.kernel_size == (2, 2)
    for conv in convs:
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.03)
        assert conv.bias.abs().max() == 0
    # ConvTranspose2d weights are (in, out, kH, kW): fan_out as PyTorch computes it is in * kH * kW
    assert head.upsample.weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 4)), rel=0.03)
    assert head.predictor.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert head.predictor.bias.abs().max() == 0 and head.upsample.bias.abs().max() == 0
    assert torch.sigmoid(logits).sub(0.5).abs().max() < 0.05, "every mask starts near probability 0.5"
    with pytest.raises(ValueError, match="Invalid num_classes: 0"):
        MaskHead(in_channels=256, num_classes=0)


def test_mask_head_with_a_norm_and_frozen_conversion():
    head = MaskHead(in_channels=8, num_classes=3, channels=16, num_convs=2, norm=nn.BatchNorm2d)
    convs = [m for m in head.convs if isinstance(m, nn.Conv2d)]
    assert [type(m) for m in head.convs] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    assert all(conv.bias is None for conv in convs)
    assert head(torch.randn(4, 8, 14, 14)).shape == (4, 3, 28, 28)
    convert_model(head, mode="frozen")
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in head.modules()) == 2
    assert MaskHead(in_channels=8, num_classes=2, num_convs=0, channels=4)(torch.randn(1, 8, 7, 7)).shape == (1, 2, 14, 14)


def test_mask_loss_is_the_bce_of_the_ground_truth_class_only():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, 28, 28, generator=generator, requires_grad=True)
    labels = torch.tensor([1, 3, 2, 3])
    targets = (torch.rand(4, 28, 28, generator=generator) > 0.5).float()
    loss = mask_loss(logits, labels, targets)
    own = logits[[0, 1, 2, 3], [0, 2, 1, 2]].double()
    p = torch.sigmoid(own)
    by_definition = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean()
    assert loss.item() == pytest.approx(by_definition.item(), rel=1e-6)
    loss.backward()
    gets_gradient = logits.grad.abs().sum(dim=(2, 3)) > 0
    assert torch.equal(gets_gradient, F.one_hot(labels - 1, 3).bool())
    assert torch.allclose(mask_probabilities(logits.detach(), labels), torch.sigmoid(own.float().detach()))


def test_mask_loss_without_positive_rois_is_zero_with_a_gradient_path():
    head = MaskHead(in_channels=8, num_classes=3, channels=8)
    loss = mask_loss(head(torch.randn(0, 8, 14, 14)), torch.zeros(0, dtype=torch.int64), torch.zeros(0, 28, 28))
    assert loss.item() == 0.0
    loss.backward()
    assert head.predictor.weight.grad is not None and head.predictor.weight.grad.abs().max() == 0


# --------------------------------------------------------------------------------------------------
# COCO results


def test_encode_masks_gives_json_ready_rles_that_decode_back():
    generator = torch.Generator().manual_seed(3)
    masks = torch.rand(3, 17, 23, generator=generator) > 0.6
    rles = encode_masks(masks)
    assert json.loads(json.dumps(rles)) == rles
    assert all(r["size"] == [17, 23] and isinstance(r["counts"], str) for r in rles)
    for rle, mask in zip(rles, masks):
        assert np.array_equal(mask_utils.decode(rle), mask.numpy().astype(np.uint8))
    assert encode_masks(torch.zeros((0, 17, 23), dtype=torch.bool)) == []


@needs(ICEVISION)
def test_ground_truth_masks_encoded_as_results_score_mask_ap_100():
    """The real polygons, decoded and encoded with these functions, given back as segm results (crowd
    regions left out): mask AP 100; the boxes' detections moved by 3 px score less."""
    coco_gt = evaluate.load_ground_truth(ICEVISION)
    results = []
    for image, annotations in images_with_annotations(ICEVISION):
        kept = [a for a in annotations if not a["iscrowd"]]
        for annotation, rle in zip(kept, encode_masks(torch.from_numpy(decode(image, kept)).bool())):
            results.append({"image_id": image["id"], "category_id": annotation["category_id"],
                            "segmentation": rle, "score": 1.0})
    metrics, table = evaluate.evaluate(coco_gt, results, iou_type="segm")
    assert metrics["AP"] == pytest.approx(100.0) and "Average Precision" in table
    shifted = [{**r, "segmentation": encode_masks(torch.from_numpy(np.roll(mask_utils.decode(r["segmentation"]), 3,
                                                                           axis=1)).bool()[None])[0]}
               for r in results]
    assert evaluate.evaluate(coco_gt, shifted, iou_type="segm")[0]["AP"] < 90.0
