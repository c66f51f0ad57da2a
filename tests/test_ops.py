"""megdet.model.ops: the pure-PyTorch NMS and RoIAlign against brute-force references written here from
the definitions, and against torchvision's kernels when those run on this machine."""
import math

import pytest
import torch

from megdet.model import ops

torch.set_num_threads(min(2, torch.get_num_threads()))
torchvision_usable = ops.backend() == "torchvision"


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


# (inter, union, threshold, dtype) at which a box inside another along x has an IoU that ties with the
# threshold: the ratio inter / union rounds, in the boxes' dtype, to exactly the threshold's nearest
# number; testing inter > union * threshold instead decides the other way.
NMS_TIES = [(63, 90, 0.7, torch.float64), (3, 10, 0.3, torch.float32), (3, 5, 0.6, torch.float32),
            (7, 10, 0.7, torch.float32), (1, 2, 0.5, torch.float32)]


@pytest.mark.parametrize("inter, union, threshold, dtype", NMS_TIES)
def test_nms_ties_at_the_threshold_fall_as_in_torchvision(inter, union, threshold, dtype):
    """torchvision's rule, by definition: the IoU inter / union computed in the boxes' dtype, then
    compared with the threshold as a real number; suppressed when greater."""
    boxes = torch.tensor([[0.0, 0.0, union, 1.0], [0.0, 0.0, inter, 1.0]], dtype=dtype)
    scores = torch.tensor([0.9, 0.8], dtype=dtype)
    iou = (torch.tensor(inter, dtype=dtype) / torch.tensor(union, dtype=dtype)).item()
    expected = [0] if iou > threshold else [0, 1]
    assert ops.nms_pytorch(boxes, scores, threshold).tolist() == expected
    assert ops.batched_nms_pytorch(boxes, scores, torch.tensor([2, 2]), threshold).tolist() == expected
    if torchvision_usable:
        import torchvision.ops

        assert torchvision.ops.nms(boxes, scores, threshold).tolist() == expected


def test_batched_nms_keeps_groups_apart_with_negative_coordinates():
    """torchvision shifts group g by g * (max + 1), which lets these two identical boxes of two groups
    overlap (IoU 0.28 after the shift) and suppresses one; ours shifts by max + 1 - min."""
    boxes = torch.tensor([[-100.0, -100.0, 50.0, 50.0], [-100.0, -100.0, 50.0, 50.0]])
    assert ops.batched_nms_pytorch(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.2).tolist() == [0, 1]


# (height, width, stride, aligned, sampling_ratio, RoI in input pixels): a sample lies exactly on the
# map's edge (-1 or the size, still inside) when its position is rounded in torchvision's order,
# (start + bin * bin_size) + ((step + 0.5) * bin_size) / grid, and one ulp outside in another order.
ROI_EDGE_TIES = [(3, 4, 4, True, 0, [1.0, -6.0, -6.0, 20.0, 2.0]), (6, 8, 1, True, 0, [1.0, -1.25, -1.5, 5.25, 0.5]),
                 (6, 9, 1, True, 2, [0.0, 3.5, -1.25, 4.5, -0.25]), (10, 9, 2, False, 0, [0.0, 13.5, -2.5, 16.0, 22.5])]


@pytest.mark.parametrize("height, width, stride, aligned, sampling_ratio, roi", ROI_EDGE_TIES)
def test_roi_align_samples_on_the_map_edge_fall_as_in_torchvision(height, width, stride, aligned, sampling_ratio, roi):
    """float64 against the definition, whose positions are rounded in torchvision's order (and, where
    torchvision's kernels run, against them): equal to rounding, where a sample counted on one side
    and dropped on the other would differ by its whole weight."""
    generator = torch.Generator().manual_seed(height * width)
    features = torch.randn(2, 2, height, width, generator=generator, dtype=torch.float64)
    rois = torch.tensor([roi], dtype=torch.float64)
    out = ops.roi_align_pytorch(features, rois, (3, 3), 1.0 / stride, sampling_ratio, aligned)
    expected = roi_align_by_definition(features, rois, 3, 1.0 / stride, sampling_ratio, aligned)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if torchvision_usable:
        import torchvision.ops

        theirs = torchvision.ops.roi_align(features, rois, (3, 3), 1.0 / stride, sampling_ratio, aligned)
        torch.testing.assert_close(out, theirs, rtol=1e-12, atol=1e-12)


def grid_boxes(n, generator, cells=24):
    """``Tensor[n, 4]`` float64 boxes with integer corners in [0, cells] and x1 < x2, y1 < y2: their IoUs
    are ratios of small integers, so many fall exactly on a threshold."""
    corners = torch.randint(0, cells + 1, (n, 2, 2), generator=generator).double()
    low, high = corners.min(dim=2).values, corners.max(dim=2).values + 1
    return torch.stack((low[:, 0], low[:, 1], high[:, 0], high[:, 1]), dim=1)


def quarter_cell_rois(k, height, width, stride, generator):
    """``Tensor[k, 5]`` float64 RoIs (batch 0 or 1) in input pixels whose corners lie on quarter cells from
    1.5 cells before the map to 1.5 cells past it: sample positions land exactly on cell boundaries and
    on the map's edges, where RoIAlign's border rules decide."""
    def corner(size):
        return (torch.randint(-6, 4 * size + 7, (k, 2), generator=generator).double() / 4).sort(dim=1).values
    xs, ys = corner(width), corner(height)
    batch = torch.randint(0, 2, (k, 1), generator=generator).double()
    return torch.cat((batch, xs[:, :1], ys[:, :1], xs[:, 1:], ys[:, 1:]), dim=1) * torch.tensor([1.0] + [stride] * 4)


NMS_THRESHOLDS = (0.3, 0.5, 0.6, 0.7)
ROI_ALIGN_SETTINGS = [(aligned, sampling_ratio) for aligned in (True, False) for sampling_ratio in (0, 1, 2)]


def disagreements_with_torchvision(seed):
    """Our pure ops against torchvision's compiled ones on one seeded case of each kind, in float64 and
    float32: ``(cases compared, [(what, dtype, seed), ...])`` for NMS (kept indices identical), batched
    NMS (with the coordinate trick and, above COORDINATE_TRICK_MAX_BOXES boxes, one NMS per group), and
    RoIAlign's output and gradient (equal to the rounding of the sums' order: the same samples, cells
    and weights)."""
    import torchvision.ops

    generator = torch.Generator().manual_seed(seed)
    threshold = NMS_THRESHOLDS[seed % len(NMS_THRESHOLDS)]
    n = 1200 if seed % 50 == 0 else 150
    boxes = grid_boxes(n, generator)
    scores = torch.randperm(n, generator=generator).double() / n
    groups = torch.randint(0, 4, (n,), generator=generator)
    height, width = (int(v) for v in torch.randint(3, 12, (2,), generator=generator))
    stride = (1, 2, 4, 8)[seed % 4]
    features = torch.randn(2, 2, height, width, generator=generator, dtype=torch.float64)
    rois = quarter_cell_rois(12, height, width, stride, generator)
    grad = torch.randn(12, 2, 3, 3, generator=generator, dtype=torch.float64)
    aligned, sampling_ratio = ROI_ALIGN_SETTINGS[seed % len(ROI_ALIGN_SETTINGS)]
    cases, disagreements = 0, []
    for dtype in (torch.float64, torch.float32):
        tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        b, sc = boxes.to(dtype), scores.to(dtype)
        checks = {"nms": ops.nms_pytorch(b, sc, threshold).tolist() == torchvision.ops.nms(b, sc, threshold).tolist(),
                  "batched_nms": (ops.batched_nms_pytorch(b, sc, groups, threshold).tolist()
                                  == torchvision.ops.batched_nms(b, sc, groups, threshold).tolist())}
        f = features.to(dtype).requires_grad_()
        r, g = rois.to(dtype), grad.to(dtype)
        ours = ops.roi_align_pytorch(f, r, (3, 3), 1.0 / stride, sampling_ratio, aligned)
        theirs = torchvision.ops.roi_align(f, r, (3, 3), 1.0 / stride, sampling_ratio, aligned)
        ours_grad, = torch.autograd.grad(ours, f, g)
        theirs_grad, = torch.autograd.grad(theirs, f, g)
        checks["roi_align"] = torch.allclose(ours, theirs, **tolerance)
        checks["roi_align gradient"] = torch.allclose(ours_grad, theirs_grad, **tolerance)
        cases += len(checks)
        disagreements += [(what, str(dtype), seed) for what, agree in checks.items() if not agree]
    return cases, disagreements


@pytest.mark.skipif(not torchvision_usable, reason="torchvision's compiled nms/roi_align do not import or "
                    "run against this torch build (see the log of megdet.model.ops); compared on machines "
                    "where they do")
def test_pure_ops_agree_with_torchvision_at_exact_ties():
    """1200 seeded cases built to tie: IoUs exactly at the threshold, RoI samples exactly on cells and
    on the map's edges."""
    cases, disagreements = 0, []
    for seed in range(150):
        seed_cases, seed_disagreements = disagreements_with_torchvision(seed)
        cases += seed_cases
        disagreements += seed_disagreements
    assert cases == 1200 and not disagreements, f"{len(disagreements)} of {cases} cases: {disagreements[:20]}"


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


@pytest.mark.skipif(not torchvision_usable, reason="torchvision's compiled nms/roi_align do not import or "
                    "run against this torch build (see the log of megdet.model.ops); compared on machines "
                    "where they do")
@pytest.mark.parametrize("dtype, memory_format, copies", [
    (torch.float32, torch.contiguous_format, 0), (torch.float32, torch.channels_last, 1),
    (torch.bfloat16, torch.channels_last, 1), (torch.bfloat16, torch.contiguous_format, 1)])
def test_roi_align_copies_the_features_at_most_once(dtype, memory_format, copies):
    """Whole-map copies in one ops.roi_align call on torchvision's kernels, their own .contiguous()
    included (the profiler sees inside them): converting bf16 to float32 and channels-last to NCHW
    is one copy, and contiguous float32 features are read in place."""
    from torch.profiler import ProfilerActivity, profile

    features = torch.randn(2, 16, 32, 40).to(dtype).contiguous(memory_format=memory_format)
    rois = torch.tensor([[0, 4.0, 4.0, 60.0, 50.0], [1, 10.0, 20.0, 100.0, 120.0]])
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, acc_events=True) as profiler:
        pooled = ops.roi_align(features, rois, (7, 7), 0.25, 0, True)
    whole_map = [event.name for event in profiler.events() if event.name in ("aten::clone", "aten::_to_copy")
                 and event.input_shapes[:1] == [list(features.shape)]]
    assert len(whole_map) == copies, whole_map
    assert pooled.dtype == dtype and pooled.shape == (2, 16, 7, 7)
