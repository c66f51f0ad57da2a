"""megdet.model.ops: the pure-PyTorch NMS and RoIAlign against brute-force references written here from
the definitions, and against torchvision's kernels when those run on this machine."""
import math

import pytest
import torch

from megdet.model import ops

torch.set_num_threads(min(2, torch.get_num_threads()))


def random_boxes(n, size, generator, min_side=1.0, max_side=40.0):
    """``Tensor[n, 4]`` (x1, y1, x2, y2), clustered so that many overlap, some crossing the image border."""
    centres = torch.rand(max(n // 8, 1), 2, generator=generator) * size
    centre = centres[torch.randint(len(centres), (n,), generator=generator)]
    centre = centre + torch.randn(n, 2, generator=generator) * 6
    sides = min_side + torch.rand(n, 2, generator=generator) * (max_side - min_side)
    return torch.cat((centre - sides / 2, centre + sides / 2), dim=1)


def iou_by_definition(a, b):
    """IoU of two (x1, y1, x2, y2) boxes as Python floats; NaN for two empty boxes (0 / 0)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else math.nan


def nms_by_definition(boxes, scores, threshold):
    """Greedy NMS: walk boxes by decreasing score; keep one unless a kept box overlaps it by IoU > t."""
    boxes, scores = boxes.tolist(), scores.tolist()
    kept = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if all(not iou_by_definition(boxes[j], boxes[i]) > threshold for j in kept):
            kept.append(i)
    return kept


def bilinear_by_definition(fmap, y, x):
    """Bilinear sample of ``fmap`` (H x W nested lists) at (y, x) with RoIAlign's border rules: zero more
    than one cell outside, clamped to the map inside that margin."""
    height, width = len(fmap), len(fmap[0])
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    return ((1 - ly) * (1 - lx) * fmap[y_low][x_low] + (1 - ly) * lx * fmap[y_low][x_high]
            + ly * (1 - lx) * fmap[y_high][x_low] + ly * lx * fmap[y_high][x_high])


def roi_align_by_definition(features, rois, pooled, scale, sampling_ratio, aligned):
    """RoIAlign by explicit loops over RoIs, channels, bins and samples."""
    feats = features.tolist()
    out = torch.zeros(len(rois), features.shape[1], pooled, pooled, dtype=torch.float64)
    for r, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        offset = 0.5 if aligned else 0.0
        start_x, start_y = x1 * scale - offset, y1 * scale - offset
        roi_w, roi_h = x2 * scale - offset - start_x, y2 * scale - offset - start_y
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / pooled, roi_h / pooled
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled)
        count = max(grid_h * grid_w, 1)
        for c in range(features.shape[1]):
            for py in range(pooled):
                for px in range(pooled):
                    total = 0.0
                    for iy in range(grid_h):
                        y = start_y + py * bin_h + (iy + 0.5) * bin_h / grid_h
                        for ix in range(grid_w):
                            x = start_x + px * bin_w + (ix + 0.5) * bin_w / grid_w
                            total += bilinear_by_definition(feats[int(b)][c], y, x)
                    out[r, c, py, px] = total / count
    return out


def border_and_degenerate_rois(height, width, stride):
    """RoIs (batch, x1, y1, x2, y2) in input pixels: inside, on and across every border, outside the
    map, zero width, zero height, a single point, and inverted (x2 < x1)."""
    h, w = height * stride, width * stride
    return torch.tensor([
        [0, 3.3, 5.1, 27.7, 30.2],
        [1, 0.0, 0.0, w, h],                 # the whole map
        [0, -9.0, -7.0, 12.0, 10.0],         # across the top-left border
        [1, w - 10.0, h - 6.0, w + 9.0, h + 11.0],  # across the bottom-right border
        [0, w + 5.0, 4.0, w + 20.0, 19.0],   # fully outside on the right
        [1, 10.0, 10.0, 10.0, 30.0],         # zero width
        [0, 4.0, 17.0, 36.0, 17.0],          # zero height
        [1, 21.5, 13.5, 21.5, 13.5],         # a point
        [0, 30.0, 20.0, 12.0, 8.0],          # inverted
        [1, 1.2, 2.9, 7.1, 5.3],             # smaller than one bin
    ], dtype=torch.float64)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_definition(threshold):
    generator = torch.Generator().manual_seed(int(threshold * 10))
    boxes = random_boxes(300, 200, generator)
    scores = torch.randperm(300, generator=generator).float() / 300  # distinct: no tie order to argue
    keep = ops.nms_pytorch(boxes, scores, threshold)
    assert keep.dtype == torch.int64
    assert keep.tolist() == nms_by_definition(boxes, scores, threshold)
    assert 0 < len(keep) < len(boxes)


def test_nms_with_degenerate_and_identical_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 0, 10],
                          [1, 1, 9, 9], [100, 100, 110, 110]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    keep = ops.nms_pytorch(boxes, scores, 0.5)
    assert keep.tolist() == nms_by_definition(boxes, scores, 0.5)
    # the duplicate and the box inside are suppressed; empty boxes (IoU 0/0) suppress nothing
    assert keep.tolist() == [0, 2, 3, 4, 6]
    assert ops.nms_pytorch(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)


def test_nms_chain_needs_several_rounds():
    # each box suppresses the next one only: greedy keeps every other box, which a single
    # matrix pass ("Fast NMS") gets wrong
    boxes = torch.tensor([[i * 2.0, 0.0, i * 2.0 + 10.0, 10.0] for i in range(9)])
    scores = torch.linspace(1.0, 0.1, 9)
    keep = ops.nms_pytorch(boxes, scores, 0.6)
    assert keep.tolist() == nms_by_definition(boxes, scores, 0.6) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("num_boxes", [400, ops.COORDINATE_TRICK_MAX_BOXES + 500])
def test_batched_nms_is_nms_within_each_group(num_boxes):
    """Both code paths (boxes shifted apart per group, one NMS per group) against a reference made of
    NMS by the definition per group (or, for thousands of boxes, of the NMS verified above)."""
    generator = torch.Generator().manual_seed(num_boxes)
    boxes = random_boxes(num_boxes, 300, generator)
    scores = torch.randperm(num_boxes, generator=generator).float() / num_boxes
    groups = torch.randint(0, 5, (num_boxes,), generator=generator)
    nms_of_group = nms_by_definition if num_boxes < 1000 else (
        lambda b, s, t: ops.nms_pytorch(b, s, t).tolist())
    expected = []
    for group in range(5):
        members = torch.nonzero(groups == group).squeeze(1)
        expected += members[nms_of_group(boxes[members], scores[members], 0.5)].tolist()
    expected.sort(key=lambda i: -scores[i].item())
    assert ops.batched_nms_pytorch(boxes, scores, groups, 0.5).tolist() == expected


def test_box_iou_and_ioa_by_definition():
    generator = torch.Generator().manual_seed(3)
    a, b = random_boxes(20, 50, generator), random_boxes(15, 50, generator)
    iou = ops.box_iou(a, b)
    expected = torch.tensor([[iou_by_definition(x, y) for y in b.tolist()] for x in a.tolist()])
    torch.testing.assert_close(iou, expected)
    inside = torch.tensor([[2.0, 2.0, 4.0, 4.0], [0.0, 0.0, 20.0, 20.0]])
    region = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    torch.testing.assert_close(ops.box_ioa(inside, region), torch.tensor([[1.0], [0.25]]))


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_explicit_bilinear_sampling(sampling_ratio, aligned):
    generator = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    stride = 4
    features = torch.randn(2, 3, 9, 11, generator=generator, dtype=torch.float64)
    rois = border_and_degenerate_rois(9, 11, stride)
    pooled = 3
    out = ops.roi_align_pytorch(features, rois, (pooled, pooled), 1.0 / stride, sampling_ratio, aligned)
    expected = roi_align_by_definition(features, rois, pooled, 1.0 / stride, sampling_ratio, aligned)
    assert out.shape == (len(rois), 3, pooled, pooled) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected)
    assert out[0].abs().sum() > 0
    assert out[4].abs().sum() == 0  # more than one cell outside the map


def test_roi_align_gradient_is_the_adjoint_of_the_forward():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(2, 2, 6, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = border_and_degenerate_rois(6, 7, 2)
    torch.autograd.gradcheck(lambda f: ops.roi_align_pytorch(f, rois, (2, 2), 0.5, 0, True), (features,))


def test_roi_align_without_rois_or_samples():
    features = torch.randn(1, 4, 8, 8)
    assert ops.roi_align_pytorch(features, torch.zeros(0, 5), (7, 7), 0.25, 0, True).shape == (0, 4, 7, 7)
    point = torch.tensor([[0.0, 5.0, 5.0, 5.0, 5.0]])
    assert ops.roi_align_pytorch(features, point, (7, 7), 0.25, 0, True).abs().sum() == 0


def test_clip_and_nonempty():
    boxes = torch.tensor([[-5.0, -2.0, 30.0, 12.0], [40.0, 1.0, 50.0, 8.0]])
    clipped = ops.clip_boxes(boxes, (10, 20))
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 20.0, 10.0], [20.0, 1.0, 20.0, 8.0]]))
    assert ops.nonempty(clipped).tolist() == [True, False]


torchvision_usable = ops.backend() == "torchvision"


@pytest.mark.skipif(not torchvision_usable, reason="torchvision's compiled nms/roi_align do not import or "
                    "run against this torch build (see the log of megdet.model.ops); compared on machines "
                    "where they do")
def test_pure_ops_match_torchvision():
    import torchvision.ops

    generator = torch.Generator().manual_seed(11)
    boxes = random_boxes(2000, 400, generator)
    scores = torch.rand(2000, generator=generator)
    groups = torch.randint(0, 10, (2000,), generator=generator)
    assert ops.nms_pytorch(boxes, scores, 0.7).tolist() == torchvision.ops.nms(boxes, scores, 0.7).tolist()
    assert (ops.batched_nms_pytorch(boxes, scores, groups, 0.5).tolist()
            == torchvision.ops.batched_nms(boxes, scores, groups, 0.5).tolist())
    features = torch.randn(2, 8, 40, 50, generator=generator, requires_grad=True)
    rois = torch.cat((torch.randint(0, 2, (300, 1), generator=generator).float(),
                      random_boxes(300, 200, generator, max_side=150)), dim=1)
    for sampling_ratio in (0, 2):
        for aligned in (True, False):
            ours = ops.roi_align_pytorch(features, rois, (7, 7), 0.25, sampling_ratio, aligned)
            theirs = torchvision.ops.roi_align(features, rois, (7, 7), 0.25, sampling_ratio, aligned)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
            grad = torch.randn(ours.shape, generator=generator)
            ours_grad, = torch.autograd.grad(ours, features, grad)
            theirs_grad, = torch.autograd.grad(theirs, features, grad)
            torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-4)
