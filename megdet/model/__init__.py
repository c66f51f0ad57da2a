"""Faster R-CNN + FPN on ResNet in plain PyTorch (see docs/detector.md): ``build_detector(name, ...)``.

``MODEL_NAMES`` (``megdet.model.settings``) loads without torch; the detector itself on first use.
"""
from megdet.model.settings import MODEL_NAMES

__all__ = ["MODEL_NAMES", "FasterRCNN", "build_detector"]


def __getattr__(name: str):
    if name in ("FasterRCNN", "build_detector"):
        from megdet.model import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'megdet.model' has no attribute {name!r}")
