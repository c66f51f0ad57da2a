"""A small Open Images-format set made from real photographs: the 100 PASCAL VOC photos of
``../shared/realdata/padilla_voc100`` and their COCO boxes, written as the official Open Images files.

    paths = write_open_images_set(REALDATA, tmp_path / "oi")
    paths["train"]["boxes"], paths["train"]["labels"], paths["train"]["images"], paths["classes"], ...

What it holds, per split ("train": the first 70 images, "validation": the other 30):
- ``classes.csv``: VOC's 20 classes and 4 group classes above them (Animal, Vehicle, Furniture, Pet);
- ``hierarchy.json``: Entity > Animal > (bird, cat, cow, dog, horse, sheep), Vehicle > 7 vehicles,
  Furniture > (chair, diningtable, sofa), Pet > (cat, dog): cat and dog under two parents, as Open
  Images has labels under several;
- boxes in the official 13 columns, sorted by ImageID (16 hex digits from the file name): where an image
  has 3 or more boxes of one class, those are one group-of box around all of them (IsGroupOf 1);
  IsOccluded from VOC's "occluded" attribute, IsTruncated 1 for a box touching the image's border;
- verified image-level labels: every boxed class present (Confidence 1), and two classes verified
  absent (0) that are neither boxed there nor above or below a boxed class;
- ``images/<ImageID>.jpg``: symbolic links to the real photos (never copies).
"""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

VOC = "padilla_voc100"
TRAIN_IMAGES = 70
GROUP_OF_MIN_BOXES = 3
NEGATIVES_PER_IMAGE = 2
GROUPS = {"Animal": ("bird", "cat", "cow", "dog", "horse", "sheep"),
          "Vehicle": ("aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"),
          "Furniture": ("chair", "diningtable", "sofa"), "Pet": ("cat", "dog")}
BOX_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,"
              "IsDepiction,IsInside")
LABEL_HEADER = "ImageID,Source,LabelName,Confidence"


def label_name(name: str) -> str:
    return f"/m/voc_{name.lower()}"


def image_id(file_name: str) -> str:
    return hashlib.sha1(file_name.encode()).hexdigest()[:16]


def write_open_images_set(realdata: Path, out: Path) -> Dict:
    """Write the set into the folder ``out``; returns {"classes", "hierarchy", "train": {"boxes",
    "labels", "images"}, "validation": {...}} paths."""
    coco = json.loads((realdata / VOC / "instances_default.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    all_names = sorted(names.values()) + list(GROUPS)
    related = {name: {name} for name in all_names}  # a class, its ancestors and its descendants
    for group, members in GROUPS.items():
        for member in members:
            related[member].add(group)
            related[group].add(member)
    out.mkdir(parents=True, exist_ok=True)
    paths: Dict = {"classes": out / "classes.csv", "hierarchy": out / "hierarchy.json"}
    paths["classes"].write_text("".join(f"{label_name(n)},{n}\n" for n in all_names))
    top = [n for n in sorted(names.values()) if not any(n in members for members in GROUPS.values())]
    tree = {"LabelName": "/m/voc_entity", "Subcategory": [
        {"LabelName": label_name(group), "Subcategory": [{"LabelName": label_name(m)} for m in members]}
        for group, members in GROUPS.items()] + [{"LabelName": label_name(n)} for n in top]}
    paths["hierarchy"].write_text(json.dumps(tree, indent=1) + "\n")

    boxes_of = defaultdict(list)
    for annotation in coco["annotations"]:
        boxes_of[annotation["image_id"]].append(annotation)
    images = sorted(coco["images"], key=lambda image: image["id"])
    for split, chosen in (("train", images[:TRAIN_IMAGES]), ("validation", images[TRAIN_IMAGES:])):
        folder = out / split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        box_lines, label_lines = [], []
        for image in sorted(chosen, key=lambda image: image_id(image["file_name"])):
            key = image_id(image["file_name"])
            (folder / "images" / f"{key}.jpg").symlink_to(realdata / VOC / "images" / image["file_name"])
            by_class = defaultdict(list)
            for annotation in boxes_of[image["id"]]:
                by_class[names[annotation["category_id"]]].append(annotation)
            for name in sorted(by_class):
                box_lines += _box_lines(key, name, by_class[name], image["width"], image["height"])
            label_lines += [f"{key},verification,{label_name(n)},1" for n in sorted(by_class)]
            excluded = set().union(*(related[n] for n in by_class)) if by_class else set()
            allowed = [n for n in all_names if n not in excluded]
            start = int(key, 16) % len(allowed)
            negatives = sorted((allowed + allowed)[start:start + NEGATIVES_PER_IMAGE])
            label_lines += [f"{key},verification,{label_name(n)},0" for n in negatives]
        split_paths = {"boxes": folder / "boxes.csv", "labels": folder / "labels.csv", "images": folder / "images"}
        split_paths["boxes"].write_text("\n".join([BOX_HEADER, *box_lines]) + "\n")
        split_paths["labels"].write_text("\n".join([LABEL_HEADER, *label_lines]) + "\n")
        paths[split] = split_paths
    return paths


def _box_lines(key: str, name: str, annotations: List[Dict], width: int, height: int) -> List[str]:
    """The boxes of one class in one image as boxes-file lines: one group-of box around them all when
    they are ``GROUP_OF_MIN_BOXES`` or more."""
    corners = [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3])
               for a in annotations]
    occluded = [int(a.get("attributes", {}).get("occluded", False)) for a in annotations]
    group_of = len(corners) >= GROUP_OF_MIN_BOXES
    if group_of:
        corners = [(min(c[0] for c in corners), min(c[1] for c in corners),
                    max(c[2] for c in corners), max(c[3] for c in corners))]
        occluded = [1]
    lines = []
    for (x1, y1, x2, y2), is_occluded in zip(corners, occluded):
        xmin, xmax = max(x1, 0) / width, min(x2, width) / width
        ymin, ymax = max(y1, 0) / height, min(y2, height) / height
        truncated = int(x1 <= 0 or y1 <= 0 or x2 >= width or y2 >= height)
        lines.append(f"{key},xclick,{label_name(name)},1,{xmin:.6f},{xmax:.6f},{ymin:.6f},{ymax:.6f},"
                     f"{is_occluded},{truncated},{int(group_of)},0,0")
    return lines
