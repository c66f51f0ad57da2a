"""Anchor boxes for every position of every FPN level.

Shapes: Hi, Wi = size of level i; A = anchors per position (one size x len(aspect_ratios)).
Anchors of a level are ordered (Hi, Wi, A), the same order as the RPN head's flattened outputs.
Boxes are (x1, y1, x2, y2) in input-image pixels.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn


def cell_anchors(size: float, aspect_ratios: Sequence[float]) -> torch.Tensor:
    """``Tensor[A, 4]`` (x1, y1, x2, y2) boxes centred on (0, 0) of area ``size**2`` and height/width
    equal to each aspect ratio (detectron2's convention; not rounded to integers, unlike torchvision)."""
    boxes = []
    for ratio in aspect_ratios:
        width = math.sqrt(size * size / ratio)
        height = width * ratio
        boxes.append((-width / 2, -height / 2, width / 2, height / 2))
    return torch.tensor(boxes, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """One anchor size per level, every aspect ratio, at every position of each level.

    Args:
        sizes: anchor side (sqrt of area) per level, in pixels, e.g. (32, 64, 128, 256, 512) for P2-P6.
        aspect_ratios: height / width, e.g. (0.5, 1.0, 2.0).
        strides: level strides in pixels, e.g. (4, 8, 16, 32, 64).
        offset: anchor centres at ``(j + offset) * stride``; 0.0 as detectron2's default.
    """

    def __init__(self, *, sizes: Sequence[float], aspect_ratios: Sequence[float], strides: Sequence[int],
                 offset: float = 0.0):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"Invalid anchor sizes {tuple(sizes)}: need one per level, strides {tuple(strides)}")
        self.strides = tuple(strides)
        self.offset = offset
        self.num_anchors_per_position = len(aspect_ratios)
        for level, size in enumerate(sizes):
            self.register_buffer(f"cell_anchors_{level}", cell_anchors(size, aspect_ratios), persistent=False)

    def forward(self, feature_sizes: Sequence[Sequence[int]]) -> List[torch.Tensor]:
        """Anchors per level, ``Tensor[Hi*Wi*A, 4]``, for levels of sizes ``[(H2, W2), (H3, W3), ...]``."""
        anchors = []
        for level, ((height, width), stride) in enumerate(zip(feature_sizes, self.strides)):
            cells = getattr(self, f"cell_anchors_{level}")
            xs = (torch.arange(width, dtype=torch.float32, device=cells.device) + self.offset) * stride
            ys = (torch.arange(height, dtype=torch.float32, device=cells.device) + self.offset) * stride
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=-1).reshape(-1, 1, 4)
            # (Hi*Wi, 1, 4) + (1, A, 4) -> (Hi*Wi*A, 4)
            anchors.append((shifts + cells[None]).reshape(-1, 4))
        return anchors
