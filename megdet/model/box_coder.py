"""Box regression targets: boxes <-> deltas (dx, dy, dw, dh) relative to reference boxes.

Boxes are ``Tensor[R, 4]`` (x1, y1, x2, y2) in pixels, width = x2 - x1. For a reference box with centre
(x, y) and size (w, h) and a target box (x*, y*, w*, h*), with weights (wx, wy, ww, wh):

    dx = wx (x* - x) / w     dy = wy (y* - y) / h     dw = ww log(w* / w)     dh = wh log(h* / h)

The RPN uses weights (1, 1, 1, 1), the RoI head (10, 10, 5, 5) (detectron2 and torchvision defaults):
the weights scale the targets to roughly unit variance. Decoding clamps dw and dh at log(1000 / 16) so
that one wild prediction cannot overflow exp().
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

# Largest predicted log-scale change accepted when decoding: a 16 px anchor may grow to 1000 px.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _centres_and_sizes(boxes: torch.Tensor):
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights


class BoxCoder:
    """Encodes target boxes as deltas from reference boxes and decodes deltas back to boxes."""

    def __init__(self, weights: Tuple[float, float, float, float], scale_clamp: float = DEFAULT_SCALE_CLAMP):
        if len(weights) != 4 or min(weights) <= 0:
            raise ValueError(f"Invalid box coder weights: {weights} (need 4 positive numbers)")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, references: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Deltas ``Tensor[R, 4]`` that move ``references`` ``Tensor[R, 4]`` onto ``targets`` ``Tensor[R, 4]``
        (both x1, y1, x2, y2; references must have positive width and height)."""
        ref_x, ref_y, ref_w, ref_h = _centres_and_sizes(references)
        tgt_x, tgt_y, tgt_w, tgt_h = _centres_and_sizes(targets)
        wx, wy, ww, wh = self.weights
        return torch.stack((wx * (tgt_x - ref_x) / ref_w, wy * (tgt_y - ref_y) / ref_h,
                            ww * torch.log(tgt_w / ref_w), wh * torch.log(tgt_h / ref_h)), dim=1)

    def decode(self, deltas: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Boxes from ``deltas`` ``Tensor[R, 4k]`` (k boxes per reference, e.g. one per class) applied to
        ``references`` ``Tensor[R, 4]``; returns ``Tensor[R, 4k]`` (x1, y1, x2, y2 repeated k times)."""
        deltas = deltas.float()
        references = references.to(deltas.dtype)
        ref_x, ref_y, ref_w, ref_h = _centres_and_sizes(references)
        wx, wy, ww, wh = self.weights
        # (R, 4k) -> (R, k, 4)
        deltas = deltas.reshape(deltas.shape[0], -1, 4)
        dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        centre_x = dx * ref_w[:, None] + ref_x[:, None]
        centre_y = dy * ref_h[:, None] + ref_y[:, None]
        half_w = 0.5 * torch.exp(dw) * ref_w[:, None]
        half_h = 0.5 * torch.exp(dh) * ref_h[:, None]
        boxes = torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h), dim=2)
        # (R, k, 4) -> (R, 4k)
        return boxes.reshape(deltas.shape[0], -1)
