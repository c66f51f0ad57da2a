"""Mask R-CNN's mask branch (He et al. 2017; detectron2's mask_rcnn_R_50_FPN "MaskRCNNConvUpsampleHead"):
the network, its training targets and loss, and the paste of predicted masks into the image.

    head = MaskHead(in_channels=256, num_classes=80)
    logits = head(pooler(features, positive_boxes))                   # (P, K, 28, 28), pooler S = 14
    targets = mask_targets(gt_masks, matched_gt_index, positive_boxes)  # one image: (Pi, 28, 28) 0/1
    loss = mask_loss(logits, positive_labels, torch.cat(targets_of_every_image))
    # inference, per image
    probs = mask_probabilities(logits, labels)                        # (D, 28, 28)
    masks = paste_masks(probs, boxes_in_original_pixels, original_size)   # bool (D, H, W)
    rles = encode_masks(masks)                                        # COCO "segmentation" of each detection

Shapes: R RoIs over the batch; C channels; S x S pooled bins (14); M x M mask cells (M = 2S = 28);
K classes (labels 1..K); G ground-truth instances of an image; P positive RoIs; D detections of an
image; H x W image pixels. Boxes are ``Tensor[N, 4]`` (x1, y1, x2, y2) in pixels, width ``x2 - x1``.

Sampling convention (the same as RoIAlign with ``aligned=True``): pixel (y, x) is the unit square
[x, x + 1) x [y, y + 1), sampled at its centre (x + 0.5, y + 0.5); mask cell (i, j) of a box is the
box's (i, j) cell of an M x M grid, with its value at the cell's centre.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn

from megdet.model.ops import roi_align

# Mask R-CNN's mask resolution (M) and threshold, for targets and predictions alike.
MASK_RESOLUTION = 28
MASK_THRESHOLD = 0.5
# detectron2's init of the mask predictor: small enough that every mask starts at probability ~0.5.
PREDICTOR_INIT_STD = 0.001
# paste_masks works on chunks of masks whose float32 (chunk, H, W) canvas stays under this many bytes.
PASTE_CHUNK_BYTES = 1 << 28


class MaskHead(nn.Module):
    """(R, C, S, S) pooled features -> (R, K, 2S, 2S) mask logits, one map per class.

    ``num_convs`` 3x3 convolutions of ``channels`` with ReLU, a 2x2 stride-2 transposed convolution
    with ReLU, a 1x1 convolution to K logits. Initialised as detectron2: Kaiming-normal (fan_out) for
    the convolutions, normal(0.001) for the predictor, zero biases.

    Args:
        in_channels: C (the FPN's 256).
        num_classes: K.
        channels: width of the convolutions (256).
        num_convs: 3x3 convolutions before the upsampling (4).
        norm: None, or ``norm(channels) -> nn.Module`` put after each 3x3 convolution (which then has no
            bias), e.g. ``nn.BatchNorm2d``, later turned into CGBN or frozen BN by ``hpc.cgbn.convert_model``.
    """

    def __init__(self, *, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 4,
                 norm: Optional[Callable[[int], nn.Module]] = None):
        super().__init__()
        for name, value, least in (("in_channels", in_channels, 1), ("num_classes", num_classes, 1),
                                   ("channels", channels, 1), ("num_convs", num_convs, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {least})")
        layers: List[nn.Module] = []
        for index in range(num_convs):
            conv = nn.Conv2d(in_channels if index == 0 else channels, channels, 3, padding=1, bias=norm is None)
            layers += [conv, norm(channels), nn.ReLU()] if norm is not None else [conv, nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        self.upsample = nn.ConvTranspose2d(channels if num_convs else in_channels, channels, 2, stride=2)
        self.predictor = nn.Conv2d(channels, num_classes, 1)
        for layer in (*(m for m in self.convs if isinstance(m, nn.Conv2d)), self.upsample):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.predictor.weight, std=PREDICTOR_INIT_STD)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.predictor(F.relu(self.upsample(self.convs(pooled))))


@torch.no_grad()
def mask_targets(gt_masks: torch.Tensor, matched_gt_index: torch.Tensor, rois: torch.Tensor,
                 resolution: int = MASK_RESOLUTION) -> torch.Tensor:
    """Mask targets of one image's positive RoIs: each RoI's matched ground-truth mask, cropped to the
    RoI and resampled to ``resolution`` x ``resolution`` with RoIAlign (aligned, adaptive sampling: the
    average of about one bilinear sample per mask pixel in each cell), then >= 0.5.

    One ``roi_align`` call for all RoIs: the G masks are the batch of a 1-channel feature map and each
    RoI's batch index is its matched instance. Holds the G masks as float32 meanwhile (G x H x W x 4 bytes).

    Args:
        gt_masks: uint8 or bool ``Tensor[G, H, W]`` at the input image's resolution, on the RoIs' device.
        matched_gt_index: int64 ``Tensor[P]`` in 0..G-1.
        rois: ``Tensor[P, 4]`` (x1, y1, x2, y2) in input pixels.
    Returns:
        float32 ``Tensor[P, resolution, resolution]`` of 0/1.
    """
    if rois.shape[0] == 0:
        return torch.zeros((0, resolution, resolution), dtype=torch.float32, device=rois.device)
    # (G, H, W) -> (G, 1, H, W); RoIs (P, 5) = (instance index, x1, y1, x2, y2)
    masks = gt_masks[:, None].to(torch.float32)
    boxes = torch.cat((matched_gt_index[:, None].to(torch.float32), rois.to(torch.float32)), dim=1)
    coverage = roi_align(masks, boxes, (resolution, resolution), 1.0, 0, True)
    return (coverage[:, 0] >= MASK_THRESHOLD).to(torch.float32)


def mask_loss(mask_logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel binary cross-entropy of each positive RoI's ground-truth class's logits, averaged over
    RoIs and pixels (the other classes' maps get no loss). 0, with a gradient path, without RoIs.

    Args:
        mask_logits: ``Tensor[P, K, M, M]``.
        labels: int64 ``Tensor[P]`` in 1..K.
        targets: ``Tensor[P, M, M]`` of 0/1.
    """
    if mask_logits.shape[0] == 0:
        return mask_logits.sum() * 0.0
    # (P, K, M, M) -> (P, M, M): each RoI's own class (labels 1..K -> channel 0..K-1)
    own = mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device), labels - 1]
    return F.binary_cross_entropy_with_logits(own.float(), targets.float(), reduction="mean")


def mask_probabilities(mask_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sigmoid of each detection's predicted class's map: ``Tensor[D, K, M, M]``, labels ``Tensor[D]``
    in 1..K -> float32 ``Tensor[D, M, M]``."""
    own = mask_logits[torch.arange(mask_logits.shape[0], device=mask_logits.device), labels - 1]
    return torch.sigmoid(own.float())


def _paste_weights(start: torch.Tensor, stop: torch.Tensor, cells: int, pixels: int) -> torch.Tensor:
    """Bilinear weights along one axis: ``Tensor[D, pixels, cells]``; row p holds the weights of the
    mask cells at pixel p's centre for boxes spanning [start, stop) (``Tensor[D]``), all zero for a
    pixel whose centre is outside. Coordinates are clamped to the first and last cell centres (the
    edge values extend to the box's border, as when resizing the mask to the box)."""
    centres = torch.arange(pixels, device=start.device, dtype=torch.float32) + 0.5
    cell_size = ((stop - start) / cells).clamp(min=torch.finfo(torch.float32).tiny)
    # pixel centre -> position in cells, cell centres at 0..cells-1: (D, pixels)
    position = ((centres[None, :] - start[:, None]) / cell_size[:, None] - 0.5).clamp(min=0, max=cells - 1)
    inside = (centres[None, :] >= start[:, None]) & (centres[None, :] < stop[:, None])
    grid = torch.arange(cells, device=start.device, dtype=torch.float32)
    # tent (bilinear) weights: (D, pixels, 1) vs (cells,) -> (D, pixels, cells)
    weights = (1.0 - (position[:, :, None] - grid).abs()).clamp(min=0)
    return weights * inside[:, :, None]


def paste_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int],
                threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Each detection's M x M mask pasted into the image: bool ``Tensor[D, H, W]``.

    A pixel is foreground when its centre lies in the box and the mask, bilinearly interpolated at that
    centre, is >= ``threshold``: the same as resizing the M x M mask to the box's size (bilinear, pixel
    centres, edges extended) and placing it, for boxes at any sub-pixel position. Bilinear sampling
    is separable, so each mask is pasted by two matrix products, ``rows (H, M) @ mask (M, M) @ columns
    (M, W)``, batched over the masks in chunks that bound the float canvas to ``PASTE_CHUNK_BYTES``.

    Args:
        mask_probs: ``Tensor[D, M, M]`` probabilities (``mask_probabilities``).
        boxes: ``Tensor[D, 4]`` (x1, y1, x2, y2) in the pixels of the ``image_size`` (H, W) image
            (the original image, for COCO results).
    """
    height, width = image_size
    count, cells = mask_probs.shape[0], mask_probs.shape[-1]
    pasted = torch.zeros((count, height, width), dtype=torch.bool, device=mask_probs.device)
    chunk = max(1, PASTE_CHUNK_BYTES // (4 * height * width))
    boxes = boxes.to(torch.float32)
    # float32 products even under autocast: bf16 weights would move pixels across the threshold
    with torch.autocast(device_type=mask_probs.device.type, enabled=False):
        for start in range(0, count, chunk):
            part = slice(start, start + chunk)
            rows = _paste_weights(boxes[part, 1], boxes[part, 3], cells, height)        # (d, H, M)
            columns = _paste_weights(boxes[part, 0], boxes[part, 2], cells, width)      # (d, W, M)
            # (d, H, M) @ (d, M, M) @ (d, M, W) -> (d, H, W)
            pasted[part] = rows @ mask_probs[part].to(torch.float32) @ columns.transpose(1, 2) >= threshold
    return pasted


def encode_masks(masks: torch.Tensor) -> List[Dict]:
    """bool ``Tensor[D, H, W]`` -> D COCO compressed RLEs {"size": [H, W], "counts": str} (str, not
    bytes, so that ``json`` writes them)."""
    if masks.shape[0] == 0:
        return []
    # (D, H, W) -> (H, W, D), column-major as pycocotools reads it
    array = np.asfortranarray(masks.detach().cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
