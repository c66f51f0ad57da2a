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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from hpc.errors import UserError
from hpc.files import os_error_reason
from hpc.shards.writer import ImageEntry
from megdet.data.segmentation import check_segmentation

COCO_LISTS = ("images", "annotations", "categories")
ID_RANGE = (int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max))  # ids are stored as int64
MAX_SIDE = int(np.iinfo(np.int32).max)  # image sizes are stored as int32
MAX_AREA = float(np.finfo(np.float32).max)  # areas are stored as float32


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
    with np.errstate(over="ignore", invalid="ignore"):  # huge boxes overflow to inf: clipped or dropped below
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


def _is_id(value: Any) -> bool:
    """An integer that fits the shards' int64 id arrays."""
    return _is_integer(value) and ID_RANGE[0] <= value <= ID_RANGE[1]


def _is_side(value: Any) -> bool:
    """A positive whole number of pixels (480 or 480.0) that fits the shards' int32 size arrays."""
    return _is_number(value) and 0 < value <= MAX_SIDE and value == int(value)


def _is_coordinate(value: Any) -> bool:
    """A number that converts to float64 (NaN and infinities included: such boxes are dropped)."""
    return _is_number(value) and (isinstance(value, float) or abs(value) <= sys.float_info.max)


def _require(entry: Dict[str, Any], keys: Sequence[str], what: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"Invalid annotation file {path}: {what} entry {json.dumps(entry)[:200]} is not an "
                        f"object; every COCO {what} is an object with {', '.join(keys)}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise UserError(f"Invalid annotation file {path}: {what} {json.dumps(entry)[:200]} lacks "
                        f"{', '.join(missing)}; every COCO {what} needs {', '.join(keys)}")


def load_coco(annotation_file: str, images_dir: str) -> CocoSource:
    """Read and validate ``annotation_file``; image files are looked up under ``images_dir``."""
    path = Path(annotation_file)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"Invalid --coco-json: {path} does not exist") from None
    except OSError as error:
        raise UserError(f"Invalid --coco-json: {path} cannot be read ({os_error_reason(error, path.parent)}); "
                        f"give a readable annotation file") from None
    try:
        coco = json.loads(raw)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise UserError(f"Invalid annotation file {path}: not JSON ({error})") from None
    except RecursionError:
        raise UserError(f"Invalid annotation file {path}: not JSON that can be read (nested too deeply)") from None
    if not (isinstance(coco, dict) and isinstance(coco.get("images"), list)
            and isinstance(coco.get("categories"), list) and isinstance(coco.get("annotations", []), list)):
        raise UserError(f"Invalid annotation file {path}: a COCO file is an object with 'images', "
                        f"'categories' and (except for test splits) 'annotations' lists")
    images_root = Path(images_dir)
    if not images_root.is_dir():
        raise UserError(f"Invalid --images: {images_root} is not a folder")

    categories = coco["categories"]
    _check_categories(categories, path)
    annotations_of: Dict[Any, List[Tuple[int, Dict[str, Any]]]] = {}  # image id -> [(position, annotation)]
    for image in coco["images"]:
        _check_image(image, path)
        if image["id"] in annotations_of:
            raise UserError(f"Invalid annotation file {path}: image id {image['id']} appears twice; give every "
                            f"image its own id")
        annotations_of[image["id"]] = []
    known_categories = {c["id"] for c in categories}
    position_of_id: Dict[int, int] = {}
    for position, annotation in enumerate(coco.get("annotations", [])):
        _check_annotation(annotation, path, annotations_of, known_categories)
        if annotation["id"] in position_of_id:
            raise UserError(f"Invalid annotation file {path}: annotation id {annotation['id']} appears twice "
                            f"(entries {position_of_id[annotation['id']]} and {position} of 'annotations'); "
                            f"give every annotation its own id")
        position_of_id[annotation["id"]] = position
        annotations_of[annotation["image_id"]].append((position, annotation))

    fixes = {"clipped": 0, "dropped": 0, "area_from_box": 0}
    entries = [_entry(image, annotations_of[image["id"]], images_root, fixes) for image in coco["images"]]
    header = {key: value for key, value in coco.items() if key not in COCO_LISTS}
    return CocoSource(annotation_file=path, sha256=hashlib.sha256(raw).hexdigest(), categories=categories,
                      header=header, entries=entries, box_fixes=fixes)


def _check_categories(categories: List[Any], path: Path) -> None:
    seen = set()
    for category in categories:
        _require(category, ("id", "name"), "category", path)
        if not _is_id(category["id"]) or not isinstance(category["name"], str):
            raise UserError(f"Invalid annotation file {path}: category {json.dumps(category)[:200]} needs an "
                            f"integer id and a string name")
        if category["id"] in seen:
            raise UserError(f"Invalid annotation file {path}: category id {category['id']} appears twice; "
                            f"give every category its own id")
        seen.add(category["id"])


def _check_image(image: Any, path: Path) -> None:
    _require(image, ("id", "file_name", "height", "width"), "image", path)
    if not _is_id(image["id"]):
        raise UserError(f"Invalid annotation file {path}: image id {image['id']!r} is not an integer; "
                        f"COCO image ids are (64-bit) integers")
    if not (_is_side(image["height"]) and _is_side(image["width"])):
        raise UserError(f"Invalid annotation file {path}: image id {image['id']} has size "
                        f"{image['width']!r}x{image['height']!r}; width and height must be positive whole "
                        f"numbers of pixels (those of the image file)")
    name = image["file_name"]
    if not isinstance(name, str) or not name or "\0" in name:
        raise UserError(f"Invalid annotation file {path}: image id {image['id']} has file_name {name!r}; "
                        f"it must be the image file's path under --images")


def _check_annotation(annotation: Any, path: Path, annotations_of: Dict[Any, list], known_categories: set) -> None:
    _require(annotation, ("id", "image_id", "category_id", "bbox"), "annotation", path)
    if not _is_id(annotation["id"]):
        raise UserError(f"Invalid annotation file {path}: annotation id {annotation['id']!r} is not an "
                        f"integer; COCO annotation ids are (64-bit) integers")
    where = f"Invalid annotation file {path}: annotation id {annotation['id']}"
    if not _is_id(annotation["image_id"]) or annotation["image_id"] not in annotations_of:
        raise UserError(f"{where} refers to image id {annotation['image_id']!r}, which is not in 'images'")
    if not _is_id(annotation["category_id"]) or annotation["category_id"] not in known_categories:
        raise UserError(f"{where} has category id {annotation['category_id']!r}, which is not in 'categories'")
    if not (isinstance(annotation["bbox"], list) and len(annotation["bbox"]) == 4
            and all(_is_coordinate(value) for value in annotation["bbox"])):
        raise UserError(f"{where} has bbox {json.dumps(annotation['bbox'])[:200]}; a COCO bbox is "
                        f"[x, y, width, height]")
    if annotation.get("iscrowd", 0) not in (0, 1):
        raise UserError(f"{where} has iscrowd {json.dumps(annotation['iscrowd'])[:200]}; it is 0 or 1")


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
    for annotation in kept:
        if annotation.get("segmentation"):  # [] or absent: a data set without masks
            check_segmentation(annotation["segmentation"], f"Invalid annotation file: annotation {annotation['id']} "
                               f"of image {image['id']} ({image['file_name']})", height, width)
    areas = []
    for annotation, box in zip(kept, clean):
        if _is_number(annotation.get("area")) and 0 <= annotation["area"] <= MAX_AREA:
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
