"""Faster R-CNN + FPN on ResNet in plain PyTorch (see docs/detector.md): ``build_detector(name, ...)``."""
from megdet.model.detector import MODEL_NAMES, FasterRCNN, build_detector

__all__ = ["MODEL_NAMES", "FasterRCNN", "build_detector"]
