"""COCO segmentations of one image -> binary instance masks at the network's input size, in the
data-loading workers (Mask R-CNN targets).

    masks = masks_for_image(record["segmentation"], image_id=record["image_id"],
                            annotation_ids=record["annotation_ids"], height=record["height"],
                            width=record["width"], out_height=new_height, out_width=new_width, flip=flip)
    # uint8 [K, new_height, new_width] of 0/1, one per annotation, aligned with the resized (and
    # flipped) image and boxes of ``megdet.data.transforms``

A COCO segmentation, in original-image pixels, is one of
    polygons          [[x1, y1, x2, y2, ...], ...]         one instance, possibly in several parts
    uncompressed RLE  {"counts": [int, ...], "size": [h, w]}   crowd regions of the COCO files
    compressed RLE    {"counts": str, "size": [h, w]}         pycocotools' encoding

Polygons are scaled by (out_width / width, out_height / height), as the boxes are, and rasterised by
pycocotools at the output size: exact, no resampling. RLEs are decoded at the original size, resized
with the image's own filter (bilinear, widened when shrinking: PIL's BILINEAR resize of the image in
the transforms, which torch's antialiased bilinear reproduces) and thresholded at 0.5. So a mask edge
lands where the image's edge lands, at sub-pixel accuracy, where nearest-neighbour resizing would
move edges by up to half an output pixel and drop or keep thin parts by chance. A flip reverses the
columns of the rasterised masks, exactly as the image's pixels are reversed (pycocotools' polygon
rasteriser is not symmetric under x -> width - x at the pixel level).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from hpc.errors import UserError

# A mask's resized coverage at or above this is foreground.
MASK_THRESHOLD = 0.5
# A polygon needs this many points (x, y pairs) to enclose an area.
MIN_POLYGON_POINTS = 3


def has_segmentations(annotations: Iterable[Dict[str, Any]]) -> bool:
    """True when at least one of the COCO ``annotations`` has a non-empty "segmentation" (polygons or
    RLE); a data set without any cannot train a mask head."""
    return any(annotation.get("segmentation") for annotation in annotations)


def masks_for_image(segmentations: Sequence[Any], *, image_id: int, annotation_ids: Sequence[int], height: int,
                    width: int, out_height: int, out_width: int, flip: bool = False) -> np.ndarray:
    """One image's COCO segmentations -> uint8 [K, out_height, out_width] binary masks.

    Args:
        segmentations: K COCO segmentations (polygons, uncompressed or compressed RLE) in the pixels
            of the ``height`` x ``width`` original image.
        image_id, annotation_ids: the image's id and its K annotation ids, to name a bad one in errors.
        out_height, out_width: the resized image's size.
        flip: mirror the masks horizontally, as the image.
    Raises:
        UserError: a polygon with fewer than 3 points, an RLE whose size is not the image's, or a
            segmentation of another form.
    """
    if len(annotation_ids) != len(segmentations):
        raise ValueError(f"Invalid annotation_ids: {len(annotation_ids)} ids for {len(segmentations)} segmentations")
    masks = np.zeros((len(segmentations), out_height, out_width), dtype=np.uint8)
    rle_rows: List[int] = []
    rle_masks: List[np.ndarray] = []
    for row, (segmentation, annotation_id) in enumerate(zip(segmentations, annotation_ids)):
        check_segmentation(segmentation, f"annotation {annotation_id} of image {image_id}", height, width)
        if isinstance(segmentation, dict):
            rle_rows.append(row)
            rle_masks.append(_decode_rle(segmentation, height, width))
        else:
            scale = (out_width / width, out_height / height)
            masks[row] = _rasterise_polygons(segmentation, scale, out_height, out_width)
    if rle_masks:
        masks[rle_rows] = _resized(np.stack(rle_masks), out_height, out_width)
    if flip:
        masks = np.ascontiguousarray(masks[:, :, ::-1])
    return masks


def _describe(segmentation: Any) -> str:
    """A short description of a malformed segmentation for an error message."""
    if isinstance(segmentation, list) and not segmentation:
        return "[] (empty)"
    if isinstance(segmentation, list) and all(isinstance(v, (int, float)) for v in segmentation):
        return f"[{', '.join(str(v) for v in segmentation[:4])}{', ...' if len(segmentation) > 4 else ''}] " \
               "(a flat list: wrap a polygon as [[x1, y1, ...]])"
    return f"of type {type(segmentation).__name__}"


def check_segmentation(segmentation: Any, where: str, height: int, width: int) -> None:
    """UserError, naming ``where`` (the annotation and its image) and the fix, unless ``segmentation`` is
    polygons of at least MIN_POLYGON_POINTS (x, y) points or an RLE of the ``height`` x ``width`` image.
    ``megdet pack`` checks every one before writing a shard; the loader decodes only checked ones."""
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) for s in size)) \
                or not isinstance(counts, (list, str, bytes)):
            raise UserError(f"{where}: segmentation is a dict with keys {sorted(segmentation)} and size {size!r}, not "
                            "an RLE: give {\"counts\": [ints] or str, \"size\": [h, w]}")
        if size != [height, width]:
            raise UserError(f"{where}: its RLE is {size[0]}x{size[1]} (h x w) but the image is {height}x{width}: fix "
                            "the image's height/width in the annotation file or re-encode the mask at that size")
        if isinstance(counts, list) and sum(counts) != height * width:
            raise UserError(f"{where}: its RLE counts cover {sum(counts)} pixels, not {height}x{width} = "
                            f"{height * width}: re-encode the mask")
        return
    if not (isinstance(segmentation, list) and segmentation and all(isinstance(p, list) for p in segmentation)):
        raise UserError(f"{where}: segmentation {_describe(segmentation)} is neither polygons nor an RLE: give "
                        "[[x1, y1, x2, y2, ...], ...] or {\"counts\": ..., \"size\": [h, w]}, or drop the annotation")
    for part, polygon in enumerate(segmentation):
        if len(polygon) < 2 * MIN_POLYGON_POINTS or len(polygon) % 2 \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon):
            raise UserError(f"{where}: polygon {part} has {len(polygon)} values, not x, y pairs of at least "
                            f"{MIN_POLYGON_POINTS} points: fix or drop that polygon")


def _rasterise_polygons(polygons: List[List[float]], scale, out_height: int, out_width: int) -> np.ndarray:
    """The union of checked ``polygons`` (original pixels) scaled by ``scale`` (sx, sy) and rasterised at
    ``out_height`` x ``out_width``: uint8 [out_height, out_width]."""
    # (2P,) -> (P, 2) * (sx, sy) -> (2P,)
    scaled = [(np.asarray(polygon, dtype=np.float64).reshape(-1, 2) * scale).reshape(-1).tolist() for polygon in polygons]
    rles = mask_utils.frPyObjects(scaled, out_height, out_width)
    return mask_utils.decode(mask_utils.merge(rles))


def _decode_rle(rle: Dict[str, Any], height: int, width: int) -> np.ndarray:
    """A checked uncompressed or compressed RLE of a ``height`` x ``width`` image -> uint8 [height, width]."""
    if isinstance(rle["counts"], list):
        rle = mask_utils.frPyObjects(rle, height, width)
    return mask_utils.decode(rle)


def _resized(masks: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """uint8 [N, h, w] 0/1 -> uint8 [N, out_height, out_width] 0/1: antialiased bilinear (pixel centres,
    as PIL's BILINEAR) and coverage >= 0.5."""
    if masks.shape[1:] == (out_height, out_width):
        return masks
    coverage = F.interpolate(torch.from_numpy(masks)[:, None].float(), size=(out_height, out_width),
                             mode="bilinear", align_corners=False, antialias=True)
    return (coverage[:, 0] >= MASK_THRESHOLD).numpy().astype(np.uint8)
