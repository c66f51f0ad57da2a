"""ResNet-18/50/101 backbone in torchvision's module layout (so torchvision ImageNet checkpoints load
as they are), returning the outputs of stages res2-res5 (strides 4, 8, 16, 32).

Built with ``nn.BatchNorm2d``; the detector's builder swaps the norm layers with
``hpc.cgbn.convert_model``. Bottlenecks stride in the 3x3 convolution, as torchvision's ("ResNet v1.5";
detectron2's MSRA weights stride in the 1x1 instead).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Sequence, Union

import torch
from torch import nn

from hpc.errors import UserError
from megdet.weights import STAGES, frozen_stage_names

STAGE_NAMES = STAGES[1:]  # res2..res5, the stages with outputs
# stage name -> torchvision's module name
STAGE_MODULES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}
# Keys of a torchvision ImageNet checkpoint that are not part of the backbone (the classifier).
CLASSIFIER_PREFIX = "fc."


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34)."""
    expansion = 1
    last_norm = "bn2"

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet-50/101)."""
    expansion = 4
    last_norm = "bn3"

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int):
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


# depth: (block, blocks per stage res2..res5)
ARCHITECTURES = {
    18: (BasicBlock, (2, 2, 2, 2)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}
STEM_CHANNELS = 64
STAGE_WIDTHS = (64, 128, 256, 512)


class ResNet(nn.Module):
    """ResNet trunk (no classifier): ``forward(images (N, 3, H, W))`` -> ``{"res2": (N, C2, H/4, W/4), ...,
    "res5": (N, C5, H/32, W/32)}``.

    Args:
        depth: 18, 50 or 101.
    """

    def __init__(self, *, depth: int):
        super().__init__()
        if depth not in ARCHITECTURES:
            raise ValueError(f"ResNet depth {depth} is not built; use one of {sorted(ARCHITECTURES)}")
        block, blocks_per_stage = ARCHITECTURES[depth]
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = STEM_CHANNELS
        self.out_channels: Dict[str, int] = {}
        for index, (name, width, blocks) in enumerate(zip(STAGE_NAMES, STAGE_WIDTHS, blocks_per_stage)):
            stride = 1 if index == 0 else 2
            layers = []
            for block_index in range(blocks):
                layers.append(block(in_channels, width, stride if block_index == 0 else 1))
                in_channels = width * block.expansion
            setattr(self, STAGE_MODULES[name], nn.Sequential(*layers))
            self.out_channels[name] = in_channels
        self._initialise()

    def _initialise(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def zero_init_residual(self, stages: Sequence[str]) -> None:
        """Zero the scale (gamma) of the last norm of each residual branch in ``stages``: every block
        starts as the identity, which trains from scratch more stably (Goyal et al. 2017, the large-batch
        paper). Only for norms that train: a frozen zero gamma would cut the branch off for good."""
        for name in stages:
            for block in getattr(self, STAGE_MODULES[name]):
                nn.init.zeros_(getattr(block, block.last_norm).weight)

    def freeze(self, freeze_at: int, to_frozen_norm: Callable[[nn.Module], nn.Module]) -> None:
        """Stop gradients into the first ``freeze_at`` stages (``frozen_stage_names``) and make their norm
        layers frozen with ``to_frozen_norm(module) -> module`` (e.g. ``hpc.cgbn.convert_model`` in
        "frozen" mode), as detectron2's FREEZE_AT."""
        frozen = frozen_stage_names(freeze_at)
        if "stem" in frozen:
            self.conv1.requires_grad_(False)
            self.bn1 = to_frozen_norm(self.bn1).requires_grad_(False)
        for name in STAGE_NAMES:
            if name in frozen:
                stage = to_frozen_norm(getattr(self, STAGE_MODULES[name]))
                setattr(self, STAGE_MODULES[name], stage.requires_grad_(False))

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outputs = {}
        for name in STAGE_NAMES:
            x = getattr(self, STAGE_MODULES[name])(x)
            outputs[name] = x
        return outputs


def load_torchvision_checkpoint(resnet: ResNet, path: Union[str, Path]) -> None:
    """Load an ImageNet checkpoint saved by torchvision (``torch.save(resnet.state_dict())``) into ``resnet``.

    The classifier (``fc.*``) is skipped; BN ``num_batches_tracked`` may be absent (older torchvision files).
    Any other missing or unexpected key, or a shape mismatch, is a ``UserError`` naming the keys.
    Call before converting the norm layers (the keys are those of ``nn.BatchNorm2d``).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"backbone_weights {str(path)!r} is not a file; give the path of a torchvision "
                        "ResNet ImageNet checkpoint (.pth), or leave it unset to train from scratch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's text runs over several lines; its first one says what failed
        first = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise UserError(f"backbone_weights {str(path)!r} cannot be read by torch.load ({first}): it is truncated "
                        "or not a torch checkpoint; fetch the file again") from None
    if not isinstance(state, dict):
        raise UserError(f"backbone_weights {str(path)!r} holds a {type(state).__name__}, not a state dict")
    state = {key: value for key, value in state.items() if not key.startswith(CLASSIFIER_PREFIX)}
    expected = resnet.state_dict()
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [f"{key} {tuple(state[key].shape)} != {tuple(expected[key].shape)}"
                   for key in state if key in expected and state[key].shape != expected[key].shape]
    if missing or unexpected or wrong_shape:
        raise UserError(f"backbone_weights {str(path)!r} does not fit this ResNet (is it the same depth, in "
                        f"torchvision's key layout?): missing {missing[:5]} ({len(missing)}), unexpected "
                        f"{unexpected[:5]} ({len(unexpected)}), shape {wrong_shape[:5]} ({len(wrong_shape)})")
    resnet.load_state_dict(state, strict=False)
