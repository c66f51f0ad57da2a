"""Feature Pyramid Network (Lin et al. 2017): P2-P6 from the ResNet stages res2-res5.

Shapes: N images; Ci channels of stage i; Hi, Wi = input size / stride of level i.
    Pi = out_conv_i(lateral_i(res_i) + upsample_2x(P_{i+1} before its out_conv))   i = 5..2
    P6 = P5 subsampled by 2 (max-pool, kernel 1), for the RPN's 512 px anchors (no RoI is pooled from P6).
No norm in the FPN (detectron2's default); convolutions initialised as detectron2's (Caffe2 "xavier").
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megdet.model.settings import LEVEL_NAMES


class FPN(nn.Module):
    """``forward({"res2": (N, C2, H2, W2), ..., "res5": ...})`` -> ``{"p2": (N, C, H2, W2), ..., "p6": ...}``.

    Args:
        in_channels: channels of res2..res5, in that order.
        out_channels: channels of every level (256 in the papers).
    """

    def __init__(self, *, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.out_channels = out_channels
        for conv in list(self.lateral_convs) + list(self.output_convs):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, stages: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        inputs = list(stages.values())
        top_down = self.lateral_convs[-1](inputs[-1])
        outputs = [self.output_convs[-1](top_down)]
        for index in range(len(inputs) - 2, -1, -1):
            lateral = self.lateral_convs[index](inputs[index])
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output_convs[index](top_down))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return dict(zip(LEVEL_NAMES, outputs))
