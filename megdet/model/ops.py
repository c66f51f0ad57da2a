"""Box and RoI operators: ``box_iou``, ``box_ioa``, ``nms``, ``batched_nms``, ``roi_align``.

``nms``, ``batched_nms`` and ``roi_align`` call torchvision's compiled kernels when torchvision imports
and a tiny call of each runs on the device type of their inputs (probed once per device type, on
that device); otherwise they call the pure-PyTorch versions in this module: vectorised (no Python
loop per box) and, for CUDA, with no host synchronisation per loop round. ``describe_backend`` says
which runs and why; the training banner prints it. ``box_iou`` is plain tensor arithmetic either way
(as torchvision's own).

Boxes are ``Tensor[N, 4]`` in ``(x1, y1, x2, y2)`` format, in pixels, with ``x1 <= x2`` and ``y1 <= y2``;
a box's width is ``x2 - x1`` (no "+1"). RoIs for ``roi_align`` are ``Tensor[K, 5]``:
``(batch_index, x1, y1, x2, y2)`` in input-image pixels.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# Above this many boxes, the pure batched NMS runs one NMS per group (sum of squares of the group sizes
# of work) instead of one NMS over all boxes shifted apart per group (the square of the sum); below it,
# the loop's overhead would dominate (many classes with few boxes each).
COORDINATE_TRICK_MAX_BOXES = 1000
# Rows of the IoU matrix computed at a time when building the suppression matrix (bounds float memory).
IOU_ROWS_PER_CHUNK = 2048


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas ``Tensor[N]`` of ``boxes`` ``Tensor[N, 4]`` (x1, y1, x2, y2); negative extents count as 0."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def clip_boxes(boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """``boxes`` ``Tensor[N, 4]`` (x1, y1, x2, y2) clipped to an image of ``(height, width)``:
    x into [0, width], y into [0, height]."""
    height, width = image_size
    x = boxes[:, 0::2].clamp(min=0, max=width)
    y = boxes[:, 1::2].clamp(min=0, max=height)
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def nonempty(boxes: torch.Tensor) -> torch.Tensor:
    """``Tensor[N]`` bool: True where ``boxes`` ``Tensor[N, 4]`` (x1, y1, x2, y2) has x2 > x1 and y2 > y1."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _intersection(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection areas ``Tensor[N, M]`` of ``Tensor[N, 4]`` and ``Tensor[M, 4]`` (x1, y1, x2, y2)."""
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    extent = (bottom_right - top_left).clamp(min=0)
    return extent[..., 0] * extent[..., 1]


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Intersection over union ``Tensor[N, M]`` of every pair of ``boxes1`` ``Tensor[N, 4]`` and
    ``boxes2`` ``Tensor[M, 4]`` (x1, y1, x2, y2). Two empty boxes give 0/0 = NaN, as torchvision's."""
    inter = _intersection(boxes1, boxes2)
    union = box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter
    return inter / union


def box_ioa(boxes: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Intersection over the area of each of ``boxes`` ``Tensor[N, 4]``, with each of ``regions``
    ``Tensor[M, 4]`` (x1, y1, x2, y2): ``Tensor[N, M]``; how much of a box lies inside a region
    (used for crowd regions). Empty boxes give 0."""
    inter = _intersection(boxes, regions)
    return inter / box_area(boxes).clamp(min=torch.finfo(boxes.dtype).tiny)[:, None]


# --------------------------------------------------------------------------------------------------
# Pure-PyTorch implementations


def _float_at_or_below(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` that is <= ``value``: for x of that dtype, x > it exactly when
    x > value as real numbers (comparing with ``value`` rounded to nearest is wrong by one ulp when
    it rounds up, as float32(0.3) does)."""
    rounded = torch.tensor(value, dtype=torch.float64).to(dtype)
    if rounded.item() > value:
        rounded = torch.nextafter(rounded, torch.tensor(-math.inf, dtype=dtype))
    return rounded.item()


def _suppression_matrix(boxes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``Tensor[N, N]`` bool: ``[j, i]`` is True when box j comes before box i and IoU(j, i) > threshold.

    ``boxes`` ``Tensor[N, 4]`` (x1, y1, x2, y2) sorted by decreasing score. The IoU is computed as
    torchvision's CPU kernel does, so that ties at the threshold fall the same way: areas
    (x2 - x1) * (y2 - y1), inter / (area_j + area_i - inter) in the boxes' dtype, compared with the
    threshold as a real number (two empty boxes: 0 / 0 = NaN, no suppression). In-place operations
    on one (rows, N) buffer at a time."""
    n = boxes.shape[0]
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    areas = (x2 - x1) * (y2 - y1)
    threshold = _float_at_or_below(iou_threshold, boxes.dtype)
    suppresses = torch.empty((n, n), dtype=torch.bool, device=boxes.device)
    columns = torch.arange(n, device=boxes.device)
    for start in range(0, n, IOU_ROWS_PER_CHUNK):
        rows = slice(start, start + IOU_ROWS_PER_CHUNK)
        inter = torch.minimum(x2[rows, None], x2[None, :]).sub_(torch.maximum(x1[rows, None], x1[None, :]))
        height = torch.minimum(y2[rows, None], y2[None, :]).sub_(torch.maximum(y1[rows, None], y1[None, :]))
        inter.clamp_(min=0).mul_(height.clamp_(min=0))
        union = (areas[rows, None] + areas[None, :]).sub_(inter)
        suppresses[rows] = (inter.div_(union) > threshold) & (columns[None, :] > columns[rows, None])
    return suppresses


def nms_pytorch(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression in pure PyTorch; same contract as ``nms``.

    Vectorised as a fixed point ("Cluster-NMS", Zheng et al. 2020): a box survives when no surviving
    higher-scored box overlaps it by IoU > threshold. Starting from "all survive" and re-applying that
    rule to the whole vector, box i is final after i rounds (it depends only on boxes before it), and the
    fixed point is unique, so the result equals greedy NMS exactly. Rounds = the longest suppression
    chain (a handful in practice), each one (N,) x (N, N) matrix-vector product.
    The convergence test reads the device, so it runs after 1, 2, 4, ... rounds (re-applying the rule
    at the fixed point changes nothing): log2(rounds) host synchronisations, not one per round.
    """
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    # As 0/1 floats so that "is suppressed by a survivor" is one matrix-vector product per round.
    suppresses = _suppression_matrix(boxes[order], iou_threshold).float()
    survives = torch.ones(order.shape[0], dtype=torch.bool, device=boxes.device)
    rounds = 1
    while True:
        for _ in range(rounds):
            survives = (survives.float() @ suppresses) == 0
        if torch.equal((survives.float() @ suppresses) == 0, survives):
            return order[survives]
        rounds *= 2


def batched_nms_pytorch(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                        iou_threshold: float) -> torch.Tensor:
    """NMS within each group in pure PyTorch; same contract as ``batched_nms``."""
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if boxes.shape[0] <= COORDINATE_TRICK_MAX_BOXES:
        # Shift group g by g * (max + 1), as torchvision does (the shifted coordinates round alike, so
        # ties fall alike), and by g * (max + 1 - min) when some coordinate is negative, where
        # torchvision's shift would let groups overlap; then one NMS does them all.
        spacing = boxes.max() + 1 - boxes.min().clamp(max=0)
        return nms_pytorch(boxes + (groups.to(boxes) * spacing)[:, None], scores, iou_threshold)
    # One NMS per class or level, never one per box; the group sizes are read once, not per group.
    by_group = torch.sort(groups, stable=True).indices
    sizes = torch.unique_consecutive(groups[by_group], return_counts=True)[1].tolist()
    keep = torch.cat([members[nms_pytorch(boxes[members], scores[members], iou_threshold)]
                      for members in torch.split(by_group, sizes)])
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def _axis_taps(coords: torch.Tensor, real: torch.Tensor, size: int,
               window: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cells and summed bilinear weights along one axis for every bin, with RoIAlign's border rules
    (Caffe2/detectron/torchvision): a sample more than one cell outside the map (coord < -1 or
    coord > size) weighs 0; inside that margin it is clamped to [0, size - 1].

    ``coords`` (K, P, G): sample positions in cells of each RoI's P bins; ``real`` (K, 1, G): which of
    the G samples exist (RoIs with fewer samples are padded). Returns ``cells`` (K, P, T) int64 and
    ``weights`` (K, P, T), the sum over a bin's samples of their low/high weights per cell. The samples
    of a bin span few consecutive cells, so taps on the same cell are merged into a window of
    ``window`` cells from the bin's lowest one (a bound the caller knows: G + 1 for adaptive
    sampling, whose G samples span less than G = ceil(bin) cells), unless that is no shorter than the
    2G separate taps or ``window`` is None (a fixed sampling ratio, whose bins may span many cells).
    """
    inside = (coords >= -1.0) & (coords <= size) & real
    coords = coords.clamp(min=0)
    low = coords.floor().long()
    at_last_cell = low >= size - 1
    low = torch.where(at_last_cell, torch.full_like(low, size - 1), low)
    high = torch.where(at_last_cell, low, low + 1)
    frac = torch.where(at_last_cell, torch.zeros_like(coords), coords - low.to(coords.dtype))
    # (K, P, G, 2) -> (K, P, 2G)
    cells = torch.stack((low, high), dim=-1).flatten(2)
    weights = (torch.stack((1 - frac, frac), dim=-1) * inside[..., None].to(coords.dtype)).flatten(2)
    if window is None or window >= cells.shape[-1]:
        return cells, weights
    weighted = weights != 0
    # the lowest weighted cell of each bin (inverted RoIs sample in decreasing order)
    first = torch.where(weighted, cells, torch.full_like(cells, size)).min(dim=-1, keepdim=True).values
    first = first.clamp(max=size - 1)
    offsets = torch.where(weighted, cells - first, torch.zeros_like(cells))
    merged = weights.new_zeros(weights.shape[:-1] + (window,)).scatter_add_(-1, offsets, weights)
    window_cells = (first + torch.arange(window, device=cells.device)).clamp(max=size - 1)
    return window_cells, merged


def roi_sample_grid(rois: torch.Tensor, output_size: Tuple[int, int], spatial_scale: float,
                    sampling_ratio: int, aligned: bool):
    """RoIAlign's geometry of ``rois`` (K, 5): (x1, y1, bin_w, bin_h) in feature cells, each (K,), and
    the samples per bin along y and x, (K,) int64 each (``sampling_ratio``, or adaptive ceil(bin))."""
    half_cell = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - half_cell
    y1 = rois[:, 2] * spatial_scale - half_cell
    roi_w = rois[:, 3] * spatial_scale - half_cell - x1
    roi_h = rois[:, 4] * spatial_scale - half_cell - y1
    if not aligned:  # legacy RoIAlign forces RoIs to at least one cell
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / output_size[1], roi_h / output_size[0]
    if sampling_ratio > 0:
        grid_h = torch.full((rois.shape[0],), sampling_ratio, dtype=torch.int64, device=rois.device)
        grid_w = grid_h
    else:  # adaptive: about one sample per feature cell; empty or inverted RoIs get no samples
        grid_h = torch.ceil(bin_h).clamp(min=0).long()
        grid_w = torch.ceil(bin_w).clamp(min=0).long()
    return x1, y1, bin_w, bin_h, grid_h, grid_w


def roi_align_pytorch(features: torch.Tensor, rois: torch.Tensor, output_size: Tuple[int, int],
                      spatial_scale: float, sampling_ratio: int, aligned: bool,
                      max_samples: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """RoIAlign in pure PyTorch; same contract as ``roi_align``.

    Bilinear sampling on a regular grid is separable: a bin's average is a weighted sum over a small
    window of rows times a window of columns. So every output bin is a weighted sum of a few feature
    cells, and the whole op is one ``embedding_bag`` (gather + weighted sum, with its backward) over
    the features laid out as a table of cells: no tensor of per-sample features is materialised.

    max_samples: the largest samples per bin along (y, x) over ``rois``, when the caller has read them
    already (``MultiScaleRoIAlign``, for all levels at once); None reads them here, the op's one host
    synchronisation.

    Shapes: features (N, C, H, W); rois (K, 5); returns (K, C, PH, PW).
    """
    n, channels, height, width = features.shape
    pooled_h, pooled_w = output_size
    k = rois.shape[0]
    if k == 0:
        return features.new_zeros((0, channels, pooled_h, pooled_w))
    # sample positions in float32 at least (bf16/fp16 features would put them off by whole cells)
    coord_dtype = torch.promote_types(features.dtype, torch.float32)
    rois = rois.detach().to(coord_dtype)
    x1, y1, bin_w, bin_h, grid_h, grid_w = roi_sample_grid(rois, output_size, spatial_scale, sampling_ratio, aligned)
    if max_samples is None:
        max_samples = tuple(torch.stack((grid_h.max(), grid_w.max())).tolist())
    max_grid_h, max_grid_w = max_samples
    if max_grid_h == 0 or max_grid_w == 0:
        return features.new_zeros((k, channels, pooled_h, pooled_w))

    def sample_positions(start, bin_size, grid, pooled, max_grid):
        """(K, pooled, max_grid) sample coordinates and (K, 1, max_grid) mask of real samples. Rounded as
        torchvision's kernels round them, (start + bin * bin_size) + ((step + 0.5) * bin_size) / grid,
        so that a sample exactly on the map's edge or on a cell boundary falls on the same side."""
        bins = torch.arange(pooled, device=rois.device, dtype=coord_dtype)
        steps = torch.arange(max_grid, device=rois.device)
        bin_starts = start[:, None] + bins[None, :] * bin_size[:, None]                        # (K, P)
        offsets = (steps.to(coord_dtype) + 0.5)[None, :] * bin_size[:, None] / grid.clamp(min=1)[:, None]  # (K, G)
        coords = bin_starts[:, :, None] + offsets[:, None, :]
        return coords, (steps[None, :] < grid[:, None])[:, None, :]

    adaptive = sampling_ratio <= 0
    rows, row_weights = _axis_taps(*sample_positions(y1, bin_h, grid_h, pooled_h, max_grid_h), height,
                                   max_grid_h + 1 if adaptive else None)
    cols, col_weights = _axis_taps(*sample_positions(x1, bin_w, grid_w, pooled_w, max_grid_w), width,
                                   max_grid_w + 1 if adaptive else None)
    row_weights = row_weights / (grid_h * grid_w).clamp(min=1).to(coord_dtype)[:, None, None]

    image_offset = rois[:, 0].long() * (height * width)
    # (K, PH, 1, TY, 1) and (K, 1, PW, 1, TX) -> (K, PH, PW, TY, TX) -> (K*PH*PW, TY*TX): one bag per bin
    bags = k * pooled_h * pooled_w
    cell_index = (image_offset[:, None, None, None, None] + rows[:, :, None, :, None] * width
                  + cols[:, None, :, None, :]).reshape(bags, -1)
    tap_weight = (row_weights[:, :, None, :, None] * col_weights[:, None, :, None, :]).reshape(bags, -1)
    # (N, C, H, W) -> (N*H*W, C): one row per feature cell
    table = features.permute(0, 2, 3, 1).reshape(n * height * width, channels)
    pooled = F.embedding_bag(cell_index, table, per_sample_weights=tap_weight.to(features.dtype), mode="sum")
    # (K*PH*PW, C) -> (K, C, PH, PW)
    return pooled.reshape(k, pooled_h, pooled_w, channels).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# Dispatch


@functools.lru_cache(maxsize=None)
def _probe(device_type: str) -> Tuple[str, str]:
    """("torchvision", its version) when torchvision's compiled nms and roi_align import and run on a
    tensor of ``device_type``, else ("pytorch", why not)."""
    try:
        import torchvision.ops

        device = torch.device(device_type)
        boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 5.0]], device=device)
        torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8], device=device), 0.5)
        torchvision.ops.roi_align(torch.zeros(1, 1, 8, 8, device=device),
                                  torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]], device=device), (2, 2), 1.0, 2, True)
    except Exception as error:  # any failure to import or run means the kernels are unusable here
        reason = str(error).splitlines()[0] if str(error) else ""
        return "pytorch", f"torchvision unusable on {device_type}: {type(error).__name__}: {reason}"
    return "torchvision", torchvision.__version__


def backend(device_type: str = "cpu") -> str:
    """``"torchvision"`` when torchvision's compiled nms and roi_align run on ``device_type``, else
    ``"pytorch"``; probed once per device type."""
    return _probe(device_type)[0]


def describe_backend(device_type: str) -> str:
    """Which nms/roi_align run on ``device_type``, and why, in one line for the banner."""
    name, detail = _probe(device_type)
    if name == "torchvision":
        return f"torchvision {detail} compiled nms/roi_align"
    return f"pure-PyTorch nms/roi_align ({detail})"


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression.

    Args:
        boxes: ``Tensor[N, 4]`` (x1, y1, x2, y2).
        scores: ``Tensor[N]``.
        iou_threshold: a box is discarded when its IoU with a kept, higher-scored box is > this.
    Returns:
        ``Tensor[K]`` int64 indices of the kept boxes, by decreasing score.
    """
    if backend(boxes.device.type) == "torchvision":
        import torchvision.ops

        return torchvision.ops.nms(boxes, scores, iou_threshold)
    return nms_pytorch(boxes, scores, iou_threshold)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                iou_threshold: float) -> torch.Tensor:
    """Non-maximum suppression within each group (class or level); boxes of different groups never
    suppress each other.

    Args:
        boxes: ``Tensor[N, 4]`` (x1, y1, x2, y2); scores: ``Tensor[N]``; groups: ``Tensor[N]`` int64.
    Returns:
        ``Tensor[K]`` int64 indices of the kept boxes, by decreasing score.
    """
    if backend(boxes.device.type) == "torchvision":
        import torchvision.ops

        return torchvision.ops.batched_nms(boxes, scores, groups, iou_threshold)
    return batched_nms_pytorch(boxes, scores, groups, iou_threshold)


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: Tuple[int, int],
              spatial_scale: float, sampling_ratio: int, aligned: bool,
              max_samples: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """RoIAlign (He et al. 2017): average of bilinear samples on a regular grid in each output bin.

    Args:
        features: ``Tensor[N, C, H, W]``.
        rois: ``Tensor[K, 5]`` (batch_index, x1, y1, x2, y2) in input pixels; ``spatial_scale`` maps
            them to feature cells (1 / stride).
        output_size: (PH, PW) bins.
        sampling_ratio: samples per bin along each axis; 0 = adaptive, ``ceil(roi_size / output_size)``.
        aligned: shift RoIs by -0.5 cell so that a pixel's centre samples that pixel (detectron2's
            ROIAlignV2); False is the original, which also forces RoIs to at least 1 x 1 cell.
        max_samples: for the pure-PyTorch kernel, the largest samples per bin over ``rois`` if known
            (see ``roi_align_pytorch``); torchvision's ignores it.
    Returns:
        ``Tensor[K, C, PH, PW]``; gradients flow to ``features`` only.
    """
    if backend(features.device.type) == "torchvision":
        import torchvision.ops

        # Coordinates in bf16/fp16 would be off by pixels: pool in float32 at least. torchvision's kernels
        # read NCHW-contiguous features (they call .contiguous()): convert the dtype and the layout in
        # one copy, none for contiguous float32 features (channels-last ones need that one copy).
        dtype = torch.promote_types(features.dtype, torch.float32)
        pooled = torchvision.ops.roi_align(features.to(dtype, memory_format=torch.contiguous_format), rois.to(dtype),
                                           output_size, spatial_scale, sampling_ratio, aligned)
        return pooled.to(features.dtype)
    return roi_align_pytorch(features, rois, output_size, spatial_scale, sampling_ratio, aligned, max_samples)

