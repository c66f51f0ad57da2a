"""Shard record -> detector input: resize (shorter side, capped longer side), horizontal flip, boxes
from COCO xywh in original pixels to xyxy in resized pixels, COCO category ids to labels 1..C.

    transform = DetectionTransform(min_sizes=(640, 800), max_size=1333, flip_prob=0.5,
                                   category_ids=[c["id"] for c in dataset.categories])
    sample = transform(dataset[i], rng)          # rng: np.random.Generator (size and flip draws)
    images, targets, original_sizes, image_ids = collate([sample, ...])
    outputs = detector(images, targets)

A record's image may be stored downscaled; its boxes are in the original ``height`` x ``width``
pixels. The output size is computed from the original size (as if the full image were resized), so a
downscaled shard gives the same boxes and image size as a full-size one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from hpc.errors import UserError
from megdet.data.segmentation import masks_for_image

# A box narrower or lower than this (resized pixels) after clipping to the image is dropped.
MIN_BOX_SIDE = 1e-3


@dataclass
class Sample:
    """One transformed record.

    image: uint8 [3, H, W], RGB, resized: a quarter of float32's bytes through the loader's pinned
    memory and the copy to the GPU, where the detector normalises it. target: {"boxes": float32 [K, 4] xyxy resized pixels,
    "labels": int64 [K] in 1..C, "iscrowd": bool [K]}, and with masks "masks": uint8 [K, H, W] (each
    instance's segmentation at the resized size, flipped with the image). original_size: (height, width) of the original
    image. num_degenerate: boxes dropped because they were empty or outside the image.
    """

    image: torch.Tensor
    target: Dict[str, torch.Tensor]
    image_id: int
    original_size: Tuple[int, int]
    num_degenerate: int


def resized_shape(height: int, width: int, min_size: int, max_size: int) -> Tuple[int, int]:
    """(new_height, new_width): shorter side ``min_size``, longer side at most ``max_size``, aspect kept
    (detectron2's ResizeShortestEdge rounding)."""
    scale = min_size / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """[K, 4] (x, y, w, h) -> [K, 4] (x1, y1, x2, y2) = (x, y, x + w, y + h)."""
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


class DetectionTransform:
    """Callable ``(record, rng) -> Sample``.

    min_sizes: shorter-side sizes; one is drawn per image when there are several. max_size: cap on the
    longer side. flip_prob: probability of a horizontal flip (0 for evaluation). category_ids: the
    data set's COCO category ids in label order (label = position + 1).
    """

    def __init__(self, *, min_sizes: Sequence[int], max_size: int, flip_prob: float,
                 category_ids: Sequence[int], masks: bool = False):
        if not min_sizes or min(min_sizes) <= 0 or max_size <= 0:
            raise ValueError(f"Invalid sizes: min_sizes={list(min_sizes)}, max_size={max_size}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"Invalid flip_prob: {flip_prob}")
        self.min_sizes = tuple(int(s) for s in min_sizes)
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)
        self.category_ids = [int(c) for c in category_ids]
        self.label_of = {category_id: label for label, category_id in enumerate(self.category_ids, start=1)}
        self.masks = masks

    @property
    def is_random(self) -> bool:
        return len(self.min_sizes) > 1 or self.flip_prob > 0

    def __call__(self, record: Dict, rng: Optional[np.random.Generator] = None) -> Sample:
        if self.is_random and rng is None:
            raise ValueError("a random transform (several min_sizes or flip_prob > 0) needs an rng")
        height, width = int(record["height"]), int(record["width"])
        min_size = self.min_sizes[int(rng.integers(len(self.min_sizes)))] if len(self.min_sizes) > 1 \
            else self.min_sizes[0]
        flip = self.flip_prob > 0 and rng.random() < self.flip_prob
        new_height, new_width = resized_shape(height, width, min_size, self.max_size)

        pixels = record["image"]
        if pixels.shape[:2] != (new_height, new_width):
            pixels = np.asarray(Image.fromarray(pixels).resize((new_width, new_height), Image.BILINEAR))
        if flip:
            pixels = pixels[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (H, W, 3) -> (3, H, W)

        boxes = xywh_to_xyxy(np.asarray(record["boxes"], dtype=np.float64).reshape(-1, 4))
        boxes *= [new_width / width, new_height / height, new_width / width, new_height / height]
        if flip:
            boxes[:, [0, 2]] = new_width - boxes[:, [2, 0]]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, new_width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, new_height)
        keep = np.all(np.isfinite(boxes), axis=1) & (boxes[:, 2] - boxes[:, 0] > MIN_BOX_SIDE) \
            & (boxes[:, 3] - boxes[:, 1] > MIN_BOX_SIDE)

        category_ids = np.asarray(record["category_ids"], dtype=np.int64).reshape(-1)
        unknown = sorted(set(category_ids.tolist()) - set(self.label_of))
        if unknown:
            raise UserError(f"image {record['image_id']} ({record['file_name']}) has category ids {unknown} that "
                            f"the data set's categories {self.category_ids} do not list: re-pack the shards")
        labels = np.array([self.label_of[c] for c in category_ids.tolist()], dtype=np.int64)
        iscrowd = np.asarray(record["iscrowd"], dtype=bool).reshape(-1)
        target = {"boxes": torch.from_numpy(boxes[keep].astype(np.float32)).reshape(-1, 4),
                  "labels": torch.from_numpy(labels[keep]),
                  "iscrowd": torch.from_numpy(iscrowd[keep])}
        if self.masks:
            # Decoded here, in the loader's worker: polygons rasterised at the resized size, RLEs resized.
            masks = masks_for_image(record["segmentation"], image_id=int(record["image_id"]),
                                    annotation_ids=[int(i) for i in record["annotation_ids"]], height=height,
                                    width=width, out_height=new_height, out_width=new_width, flip=flip)
            target["masks"] = torch.from_numpy(np.ascontiguousarray(masks[keep]))
        return Sample(image, target, int(record["image_id"]), (height, width), int((~keep).sum()))


def collate(samples: Sequence[Sample]) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]],
                                                  List[Tuple[int, int]], List[int]]:
    """(images, targets, original_sizes, image_ids) lists in the detector's input format."""
    return ([s.image for s in samples], [s.target for s in samples], [s.original_size for s in samples],
            [s.image_id for s in samples])


def build_transform(config, *, categories: Sequence[Dict], train: bool) -> DetectionTransform:
    """The training (random sizes, flips) or evaluation (test size, no flip) transform of a ``Config``."""
    data = config.data
    category_ids = [int(c["id"]) for c in categories]
    if len(category_ids) != config.model.num_classes:
        raise UserError(f"the data set has {len(category_ids)} categories but model.num_classes="
                        f"{config.model.num_classes}: set model.num_classes={len(category_ids)}")
    if train:
        return DetectionTransform(min_sizes=data.min_sizes, max_size=data.max_size, flip_prob=data.flip_prob,
                                  category_ids=category_ids, masks=config.model.with_masks)
    return DetectionTransform(min_sizes=(data.test_min_size,), max_size=data.max_size, flip_prob=0.0,
                              category_ids=category_ids)
