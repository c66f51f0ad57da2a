"""Open Images in shards: one image's validated CSV rows -> a shard record in pixels, and back again.

    entry = image_entry(rows, ordinal, images_dir)   # rows: megdet.data.open_images.ImageRows
    paths = export_open_images(ShardDataset("shards/oi_val"), "oi_val_csv")   # the CSV files again
    hierarchy = shard_hierarchy(dataset)             # the classes and hierarchy the shards were packed with

Image ``ImageID`` is the file ``<images_dir>/<ImageID>.jpg``; its size comes from its header (EXIF
orientation applied: the image as displayed), never from decoding it. Boxes become COCO xywh in
pixels (``XMin * width``, ...), as every shard holds them; category ids are class indices in the
order of the classes file (training label = index + 1); ``iscrowd`` is IsGroupOf, which training
ignores as a positive (``megdet.model.matching``); the five flags and the verified image-level labels
are kept beside them. The image's CSV rows are kept as they were read (``source/record``), so
exporting gives back exactly the rows that were packed.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
from PIL import Image

from hpc.errors import UserError
from hpc.files import os_error_reason, write_atomic
from hpc.shards.reader import ORIENTATION_TAG, SIDE_SWAPPING_ORIENTATIONS
from hpc.shards.writer import BadImageError, ImageEntry
from megdet.data.open_images import FLAG_COLUMNS, ClassHierarchy, ImageRows

IMAGE_SUFFIX = ".jpg"
GROUP_OF = FLAG_COLUMNS.index("IsGroupOf")
NO_SEGMENTATION = "[]"  # annotations/segmentation of a box without a mask, as COCO's without one
# What ``export_open_images`` writes: name -> file
EXPORTED_FILES = {"boxes": "boxes.csv", "labels": "labels.csv", "classes": "classes.csv",
                  "hierarchy": "hierarchy.json"}


def image_path(images_dir: Path, image_id: str) -> Path:
    return Path(images_dir) / f"{image_id}{IMAGE_SUFFIX}"


def read_image_header(path: Path, image_id: str) -> Tuple[int, int]:
    """(height, width) of the image as displayed (EXIF orientation applied), from its header alone;
    ``BadImageError`` naming the ImageID and the file when it is missing or not an image."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except FileNotFoundError:
        raise BadImageError(f"Invalid image: ImageID {image_id} has no image file {path}: put it there (the image "
                            "folder holds <ImageID>.jpg), or pass --skip-bad to leave the image out (counted in "
                            "the manifest)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(f"Invalid image: ImageID {image_id} ({path}) has no readable image header "
                            f"({os_error_reason(error, path.parent)}); "
                            "replace the file, or pass --skip-bad to leave the image out (counted in the "
                            "manifest)") from None
    return (width, height) if orientation in SIDE_SWAPPING_ORIENTATIONS else (height, width)


def image_entry(rows: ImageRows, ordinal: int, images_dir: Path) -> ImageEntry:
    """The shard record of one image: its header read, boxes in pixels. ``ordinal``: the image's
    position in the files (its ``image_id`` in the shards: the ImageID is a string)."""
    path = image_path(images_dir, rows.image_id)
    height, width = read_image_header(path, rows.image_id)
    xmin, ymin, xmax, ymax = rows.boxes.T
    # (K, 4) normalised corners -> (K, 4) COCO xywh in pixels
    boxes = np.stack([xmin * width, ymin * height, (xmax - xmin) * width, (ymax - ymin) * height], axis=1)
    count = len(rows.labels)
    return ImageEntry(
        image_id=ordinal, file_name=path.name, path=path, height=height, width=width,
        boxes=boxes.astype(np.float32), category_ids=rows.labels.astype(np.int64),
        iscrowd=rows.flags[:, GROUP_OF] == 1, areas=(boxes[:, 2] * boxes[:, 3]).astype(np.float32),
        annotation_ids=np.arange(count, dtype=np.int64), segmentations=(NO_SEGMENTATION,) * count,
        source=json.dumps({"image_id": rows.image_id, "boxes": rows.box_rows, "labels": rows.label_rows}),
        flags=rows.flags.astype(np.int8), label_category_ids=rows.label_classes.astype(np.int64),
        label_present=rows.label_present.astype(bool))


def categories(hierarchy: ClassHierarchy) -> list:
    """The manifest's categories: {"id": class index, "name": DisplayName, "label_name": LabelName}."""
    return [{"id": index, "name": display, "label_name": name}
            for index, (name, display) in enumerate(zip(hierarchy.names, hierarchy.display_names))]


def shard_hierarchy(dataset) -> ClassHierarchy:
    """The classes and hierarchy that the Open Images shard set ``dataset`` was packed with."""
    metadata = _open_images_metadata(dataset)
    ordered = sorted(metadata["categories"], key=lambda category: category["id"])
    return ClassHierarchy([c["label_name"] for c in ordered], metadata["parents"], [c["name"] for c in ordered])


def export_open_images(dataset, out_dir) -> Dict[str, Path]:
    """Write the Open Images files packed in ``dataset`` (an ``hpc.shards.ShardDataset``) into the
    folder ``out_dir``: the boxes and image-labels CSVs (the packed rows, as read, in file order),
    the classes kept and the hierarchy file; returns their paths by name (``EXPORTED_FILES``)."""
    metadata = _open_images_metadata(dataset)
    out = Path(out_dir)
    paths = {name: out / file_name for name, file_name in EXPORTED_FILES.items()}
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(paths["boxes"], "w", newline="") as boxes, open(paths["labels"], "w", newline="") as labels:
            box_writer, label_writer = csv.writer(boxes, lineterminator="\n"), csv.writer(labels, lineterminator="\n")
            box_writer.writerow(metadata["files"]["boxes"]["header"])
            label_writer.writerow(metadata["files"]["labels"]["header"])
            for index in range(len(dataset)):
                source = dataset.source(index)
                box_writer.writerows(source["boxes"])
                label_writer.writerows(source["labels"])
        ordered = sorted(metadata["categories"], key=lambda category: category["id"])
        with open(paths["classes"], "w", newline="") as classes:
            csv.writer(classes, lineterminator="\n").writerows([c["label_name"], c["name"]] for c in ordered)
        write_atomic(paths["hierarchy"], json.dumps(metadata["hierarchy_json"], indent=1) + "\n")
    except OSError as error:
        raise UserError(f"Invalid --export-csv: {out} cannot be written ({os_error_reason(error, out)}); choose a "
                        "writable folder") from None
    return paths


def _open_images_metadata(dataset) -> Dict[str, Any]:
    if dataset.kind != "open-images":
        raise UserError(f"{dataset.shard_dir} holds {dataset.kind} shards, not Open Images: pack Open Images with "
                        "megdet pack --boxes --labels --classes --hierarchy --images")
    return dataset.manifest["dataset"]
