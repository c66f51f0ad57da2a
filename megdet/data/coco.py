"""COCO annotation file -> validated per-image records for ``megdet pack``, and back again.

    source = load_coco("annotations/instances_val2017.json", images_dir="val2017")
    source.entries     # [hpc.shards.writer.ImageEntry], the file's image order
    source.box_fixes   # {"clipped": n, "dropped": n, "area_from_box": n}
    coco = export_coco(ShardDataset("shards/val2017"))   # the annotation file again, from shards

Training arrays (boxes, category ids, iscrowd, areas) are cleaned: a box reaching outside the image
is clipped to it; a box with zero or negative size after that (or a non-finite one) is dropped. Both
are counted. The annotation file's own entries are kept untouched beside them, so exporting gives
back exactly what was packed and evaluation from shards equals evaluation from the source file.
Image ids, annotation ids and category ids are kept as they are, 0 included: the training label of
a category is its rank among the sorted category ids plus one (``hpc.shards.ShardDataset.categories``),
so a category with id 0 never becomes the background label.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from hpc.errors import UserError
from hpc.shards.writer import ImageEntry

COCO_LISTS = ("images", "annotations", "categories")


@dataclass
class CocoSource:
    """One split of a COCO data set, validated.

    annotation_file: the json. sha256: of its bytes. categories: its category entries, as they are.
    header: its other top-level entries ("info", "licenses", ...). entries: one per image, in order.
    box_fixes: how many boxes were clipped, dropped, or given an area from their box.
    """

    annotation_file: Path
    sha256: str
    categories: List[Dict[str, Any]]
    header: Dict[str, Any]
    entries: List[ImageEntry]
    box_fixes: Dict[str, int] = field(default_factory=dict)

    def dataset_metadata(self) -> Dict[str, Any]:
        """What the manifest records about the source."""
        return {"annotation_file": self.annotation_file.name, "annotation_sha256": self.sha256,
                "categories": self.categories, "header": self.header, "box_fixes": self.box_fixes}


def clean_boxes(boxes: np.ndarray, *, height: int, width: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """Clip COCO xywh boxes float64 [K, 4] to a ``width`` x ``height`` image.

    Returns (boxes float32 [K', 4], keep bool [K], clipped count): a box is dropped when it is not
    finite or has no area inside the image; boxes already inside are returned bit for bit.
    """
    finite = np.isfinite(boxes).all(axis=1)
    x1, y1 = boxes[:, 0], boxes[:, 1]
    x2, y2 = x1 + boxes[:, 2], y1 + boxes[:, 3]
    cx1, cy1 = np.clip(x1, 0, width), np.clip(y1, 0, height)
    cx2, cy2 = np.clip(x2, 0, width), np.clip(y2, 0, height)
    keep = finite & (cx2 > cx1) & (cy2 > cy1)
    outside = (cx1 != x1) | (cy1 != y1) | (cx2 != x2) | (cy2 != y2)
    clipped = keep & outside
    fixed = boxes.copy()
    fixed[clipped] = np.stack([cx1, cy1, cx2 - cx1, cy2 - cy1], axis=1)[clipped]
    return fixed[keep].astype(np.float32), keep, int(clipped.sum())


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(entry: Dict[str, Any], keys: Sequence[str], what: str, path: Path) -> None:
    missing = [key for key in keys if key not in entry]
    if missing:
        raise UserError(f"Invalid annotation file {path}: {what} {json.dumps(entry)[:200]} lacks "
                        f"{', '.join(missing)}; every COCO {what} needs {', '.join(keys)}")


def load_coco(annotation_file: str, images_dir: str) -> CocoSource:
    """Read and validate ``annotation_file``; image files are looked up under ``images_dir``."""
    path = Path(annotation_file)
    try:
        raw = path.read_bytes()
        coco = json.loads(raw)
    except FileNotFoundError:
        raise UserError(f"Invalid --coco-json: {path} does not exist") from None
    except ValueError as error:
        raise UserError(f"Invalid annotation file {path}: not JSON ({error})") from None
    if not isinstance(coco, dict) or "images" not in coco or "categories" not in coco:
        raise UserError(f"Invalid annotation file {path}: a COCO file is an object with 'images', "
                        f"'categories' and (except for test splits) 'annotations' lists")
    images_root = Path(images_dir)
    if not images_root.is_dir():
        raise UserError(f"Invalid --images: {images_root} is not a folder")

    categories = coco["categories"]
    for category in categories:
        _require(category, ("id", "name"), "category", path)
    category_ids = [c["id"] for c in categories]
    if len(set(category_ids)) != len(category_ids):
        raise UserError(f"Invalid annotation file {path}: category ids repeat: {sorted(category_ids)}")

    annotations_of: Dict[Any, List[Tuple[int, Dict[str, Any]]]] = {}  # image id -> [(position, annotation)]
    for image in coco["images"]:
        _require(image, ("id", "file_name", "height", "width"), "image", path)
        if not _is_integer(image["id"]):
            raise UserError(f"Invalid annotation file {path}: image id {image['id']!r} is not an integer; "
                            f"COCO image ids are integers")
        if image["id"] in annotations_of:
            raise UserError(f"Invalid annotation file {path}: image id {image['id']} appears twice")
        if not all(_is_number(image[side]) and image[side] > 0 for side in ("height", "width")):
            raise UserError(f"Invalid annotation file {path}: image id {image['id']} has size "
                            f"{image['width']}x{image['height']}; width and height must be positive")
        annotations_of[image["id"]] = []
    known_categories = set(category_ids)
    for position, annotation in enumerate(coco.get("annotations", [])):
        _require(annotation, ("id", "image_id", "category_id", "bbox"), "annotation", path)
        if not _is_integer(annotation["id"]):
            raise UserError(f"Invalid annotation file {path}: annotation id {annotation['id']!r} is not an "
                            f"integer; COCO annotation ids are integers")
        if annotation["image_id"] not in annotations_of:
            raise UserError(f"Invalid annotation file {path}: annotation id {annotation['id']} refers to "
                            f"image id {annotation['image_id']}, which is not in 'images'")
        if annotation["category_id"] not in known_categories:
            raise UserError(f"Invalid annotation file {path}: annotation id {annotation['id']} has "
                            f"category id {annotation['category_id']}, which is not in 'categories'")
        if not (isinstance(annotation["bbox"], list) and len(annotation["bbox"]) == 4
                and all(_is_number(value) for value in annotation["bbox"])):
            raise UserError(f"Invalid annotation file {path}: annotation id {annotation['id']} has bbox "
                            f"{annotation['bbox']}; a COCO bbox is [x, y, width, height]")
        annotations_of[annotation["image_id"]].append((position, annotation))

    fixes = {"clipped": 0, "dropped": 0, "area_from_box": 0}
    entries = [_entry(image, annotations_of[image["id"]], images_root, fixes) for image in coco["images"]]
    header = {key: value for key, value in coco.items() if key not in COCO_LISTS}
    return CocoSource(annotation_file=path, sha256=hashlib.sha256(raw).hexdigest(), categories=categories,
                      header=header, entries=entries, box_fixes=fixes)


def _entry(image: Dict[str, Any], positioned: List[Tuple[int, Dict[str, Any]]], images_root: Path,
           fixes: Dict[str, int]) -> ImageEntry:
    """One image's ``ImageEntry`` from its annotations and their positions in the file; updates ``fixes``."""
    annotations = [annotation for _, annotation in positioned]
    height, width = int(image["height"]), int(image["width"])
    boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    clean, keep, clipped = clean_boxes(boxes, height=height, width=width)
    fixes["clipped"] += clipped
    fixes["dropped"] += int((~keep).sum())
    kept = [a for a, k in zip(annotations, keep) if k]
    areas = []
    for annotation, box in zip(kept, clean):
        if _is_number(annotation.get("area")) and math.isfinite(annotation["area"]):
            areas.append(annotation["area"])
        else:
            fixes["area_from_box"] += 1
            areas.append(float(box[2]) * float(box[3]))
    return ImageEntry(
        image_id=int(image["id"]), file_name=str(image["file_name"]), path=images_root / image["file_name"],
        height=height, width=width, boxes=clean,
        category_ids=np.array([a["category_id"] for a in kept], dtype=np.int64),
        iscrowd=np.array([bool(a.get("iscrowd", 0)) for a in kept], dtype=bool),
        areas=np.array(areas, dtype=np.float32),
        annotation_ids=np.array([a["id"] for a in kept], dtype=np.int64),
        segmentations=tuple(json.dumps(a.get("segmentation", [])) for a in kept),
        source=json.dumps({"image": image, "annotations": annotations,
                           "annotation_positions": [position for position, _ in positioned]}))


def export_coco(dataset) -> Dict[str, Any]:
    """The annotation file behind ``dataset`` (an ``hpc.shards.ShardDataset``), rebuilt from the
    shards: its header, categories, and every packed image with its annotations as they were, in the
    file's order."""
    metadata = dataset.manifest["dataset"]
    images, positioned = [], []
    for index in range(len(dataset)):
        source = dataset.source(index)
        images.append(source["image"])
        positioned.extend(zip(source["annotation_positions"], source["annotations"]))
    annotations = [annotation for _, annotation in sorted(positioned, key=lambda pair: pair[0])]
    return {**metadata["header"], "categories": metadata["categories"], "images": images,
            "annotations": annotations}
