"""Synthetic Open Images files of any size, deterministic from a seed: for measuring the metric, the
reader and the packer at Open Images' scale without its data.

    paths = write_synthetic_open_images("data/oi_synth", images=41_620, detections_per_image=100)
    # {"classes": .../classes.csv, "hierarchy": ..., "boxes": ..., "labels": ..., "results": ...}

The files are those of ``megdet.data.open_images`` (official columns, official order) over a small
hierarchy of ``len(SYNTHETIC_CLASSES)`` classes: four groups of leaves, one leaf under two groups (a
DAG, as Open Images has) and one three-level branch. Per image: a Poisson number of boxes
(``boxes_per_image`` on average; Open Images' validation set has about 7), a fraction of them
group-of; a positive image-level label for each boxed class and ``negative_labels_per_image`` negative
ones of classes unrelated to them; exactly ``detections_per_image`` detections: a jittered copy of each
box (of its class or its parent's) with a high score, then random boxes of random classes with low scores.
ImageIDs are sorted, as in the official files. With ``with_images`` every image also gets a small JPEG
file (a link to one of a few), for packing (``megdet bench pack-open-images``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

from megdet.data.open_images import ClassHierarchy

# LabelName, DisplayName, parents (LabelNames; none: under the top node)
SYNTHETIC_CLASSES: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("/m/s_animal", "Animal", ()), ("/m/s_dog", "Dog", ("/m/s_animal", "/m/s_pet")),
    ("/m/s_cat", "Cat", ("/m/s_animal",)), ("/m/s_bird", "Bird", ("/m/s_animal",)),
    ("/m/s_duck", "Duck", ("/m/s_bird",)), ("/m/s_owl", "Owl", ("/m/s_bird",)),
    ("/m/s_pet", "Pet", ()), ("/m/s_hamster", "Hamster", ("/m/s_pet",)),
    ("/m/s_vehicle", "Vehicle", ()), ("/m/s_car", "Car", ("/m/s_vehicle",)),
    ("/m/s_bus", "Bus", ("/m/s_vehicle",)), ("/m/s_bicycle", "Bicycle", ("/m/s_vehicle",)),
    ("/m/s_food", "Food", ()), ("/m/s_apple", "Apple", ("/m/s_food",)), ("/m/s_bread", "Bread", ("/m/s_food",)),
    ("/m/s_cheese", "Cheese", ("/m/s_food",)), ("/m/s_person", "Person", ()),
)
ROOT = "/m/s_entity"
BOX_HEADER = ("ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,"
              "IsInside")  # the official boxes file's 13 columns
LABEL_HEADER = "ImageID,Source,LabelName,Confidence"
DETECTION_HEADER = "ImageID,LabelName,Score,XMin,XMax,YMin,YMax"
BOX_SIZE_RANGE = (0.05, 0.6)      # box width and height, as fractions of the image's
MATCHED_FRACTION = 0.8            # of the boxes, those that get a detection near them
JITTER = 0.05                     # of a matched detection's corners, in box widths or heights (std. dev.)
PARENT_CLASS_FRACTION = 0.2       # of the matched detections, those labelled with the box class's parent
MIN_SIDE = 1e-3                   # of a jittered detection
ID_MULTIPLIER = 0x9E3779B97F4A7C15
ROWS_PER_WRITE = 200_000
IMAGE_POOL_SIZES = ((64, 48), (48, 64), (80, 60), (60, 60))  # (width, height) of the shared JPEGs


def synthetic_hierarchy() -> ClassHierarchy:
    """The classes of ``SYNTHETIC_CLASSES`` and their hierarchy."""
    index = {name: i for i, (name, _, _) in enumerate(SYNTHETIC_CLASSES)}
    return ClassHierarchy([name for name, _, _ in SYNTHETIC_CLASSES],
                          [[index[p] for p in parents] for _, _, parents in SYNTHETIC_CLASSES],
                          [display for _, display, _ in SYNTHETIC_CLASSES])


def hierarchy_json() -> Dict:
    """``SYNTHETIC_CLASSES`` as the official nested JSON: a label with two parents appears under both."""
    def node(name: str) -> Dict:
        children = [child for child, _, parents in SYNTHETIC_CLASSES if name in parents]
        return {"LabelName": name, **({"Subcategory": [node(child) for child in children]} if children else {})}

    return {"LabelName": ROOT, "Subcategory": [node(name) for name, _, parents in SYNTHETIC_CLASSES if not parents]}


def write_synthetic_open_images(out, images: int, detections_per_image: int = 100, boxes_per_image: float = 7.3,
                                group_of_fraction: float = 0.05, negative_labels_per_image: int = 2,
                                seed: int = 0, with_images: bool = False) -> Dict[str, Path]:
    """Write the five files into the folder ``out`` (created); return their paths by CLI name. With
    ``with_images``, also "images": a folder of ``ImageID.jpg`` files (``_link_images``)."""
    if images < 1 or detections_per_image < 0 or boxes_per_image < 0 or not 0 <= group_of_fraction <= 1:
        raise ValueError(f"Invalid synthetic set: images={images}, detections_per_image={detections_per_image}, "
                         f"boxes_per_image={boxes_per_image}, group_of_fraction={group_of_fraction}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hierarchy = synthetic_hierarchy()
    # 16 hex digits, as Open Images ids; an odd multiplier is a bijection modulo 2**64, so they are distinct;
    # sorted, as the official files are
    image_ids = np.sort(np.array([f"{((i + 1) * ID_MULTIPLIER) % 2 ** 64:016x}" for i in range(images)]))
    paths = {name: out / file for name, file in (("classes", "classes.csv"), ("hierarchy", "hierarchy.json"),
                                                 ("boxes", "boxes.csv"), ("labels", "labels.csv"),
                                                 ("results", "detections.csv"))}
    paths["classes"].write_text("".join(f"{name},{display}\n" for name, display, _ in SYNTHETIC_CLASSES))
    paths["hierarchy"].write_text(json.dumps(hierarchy_json(), indent=1) + "\n")

    # boxes: image [N], class [N], corners [N, 4] (xmin, ymin, xmax, ymax), group-of [N]
    box_image = np.repeat(np.arange(images), rng.poisson(boxes_per_image, images))
    box_class = rng.integers(0, len(hierarchy), len(box_image))
    corners = _random_boxes(rng, len(box_image))
    group_of = rng.random(len(box_image)) < group_of_fraction
    _write_rows(paths["boxes"], BOX_HEADER, "{},xclick,{},1,{:.6f},{:.6f},{:.6f},{:.6f},0,0,{:d},0,0",
                [image_ids[box_image], np.array(hierarchy.names)[box_class], corners[:, 0], corners[:, 2],
                 corners[:, 1], corners[:, 3], group_of.astype(int)])

    label_image, label_class, label_confidence = _image_labels(rng, hierarchy, box_image, box_class, images,
                                                               negative_labels_per_image)
    _write_rows(paths["labels"], LABEL_HEADER, "{},verification,{},{:d}",
                [image_ids[label_image], np.array(hierarchy.names)[label_class], label_confidence])

    if with_images:
        paths["images"] = _link_images(out, image_ids, np.random.default_rng((seed, 1)))  # leaves rng alone

    det_image, det_class, det_corners, det_scores = _detections(rng, hierarchy, box_image, box_class, corners,
                                                                images, detections_per_image)
    _write_rows(paths["results"], DETECTION_HEADER, "{},{},{:.5f},{:.6f},{:.6f},{:.6f},{:.6f}",
                [image_ids[det_image], np.array(hierarchy.names)[det_class], det_scores, det_corners[:, 0],
                 det_corners[:, 2], det_corners[:, 1], det_corners[:, 3]])
    return paths


def _link_images(out: Path, image_ids: np.ndarray, rng: np.random.Generator) -> Path:
    """``out/images/<ImageID>.jpg`` for every image: a symbolic link to one of ``IMAGE_POOL_SIZES``'s
    small JPEGs in ``out/image_pool`` (landscape and portrait), so a set of any size costs a few files."""
    pool, folder = out / "image_pool", out / "images"
    pool.mkdir(exist_ok=True)
    folder.mkdir(exist_ok=True)
    targets = []
    for index, (width, height) in enumerate(IMAGE_POOL_SIZES):
        target = pool / f"{index}.jpg"
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(target, quality=75)
        targets.append(target.resolve())
    for image_id, choice in zip(image_ids.tolist(), rng.integers(0, len(targets), len(image_ids)).tolist()):
        link = folder / f"{image_id}.jpg"
        link.unlink(missing_ok=True)
        link.symlink_to(targets[choice])
    return folder


def _random_boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    """float64 [count, 4] boxes (xmin, ymin, xmax, ymax) inside the unit square, sides in ``BOX_SIZE_RANGE``."""
    size = rng.uniform(*BOX_SIZE_RANGE, (count, 2))
    low = rng.uniform(0, 1 - size)
    return np.concatenate([low, low + size], axis=1)


def _image_labels(rng, hierarchy: ClassHierarchy, box_image, box_class, images: int, negatives: int):
    """(image [L], class [L], confidence [L]): 1 for each boxed class, 0 for ``negatives`` classes per
    image that are neither boxed there nor an ancestor or descendant of a boxed class."""
    positive = np.unique(box_image * len(hierarchy) + box_class)
    related = [set(hierarchy.up.members[hierarchy.up.offsets[c]:hierarchy.up.offsets[c + 1]]) |
               set(hierarchy.down.members[hierarchy.down.offsets[c]:hierarchy.down.offsets[c + 1]])
               for c in range(len(hierarchy))]
    boxed: List[set] = [set() for _ in range(images)]
    for image, c in zip(positive // len(hierarchy), positive % len(hierarchy)):
        boxed[image] |= related[c]
    negative_keys = []
    for image, excluded in enumerate(boxed):
        allowed = [c for c in range(len(hierarchy)) if c not in excluded]
        chosen = rng.choice(allowed, size=min(negatives, len(allowed)), replace=False) if allowed else []
        negative_keys.extend(image * len(hierarchy) + int(c) for c in chosen)
    keys = np.r_[positive, np.array(negative_keys, np.int64)]
    order = np.argsort(keys // len(hierarchy), kind="stable")
    confidence = np.r_[np.ones(len(positive), int), np.zeros(len(negative_keys), int)][order]
    return keys[order] // len(hierarchy), keys[order] % len(hierarchy), confidence


def _detections(rng, hierarchy: ClassHierarchy, box_image, box_class, corners, images: int, per_image: int):
    """(image [D], class [D], corners [D, 4], score [D]) with exactly ``per_image`` rows per image."""
    matched = rng.random(len(box_image)) < MATCHED_FRACTION
    near_image, near_class, near = box_image[matched], box_class[matched].copy(), corners[matched]
    sides = np.tile(near[:, 2:] - near[:, :2], 2)  # [w, h, w, h]
    near = np.clip(near + rng.normal(0, JITTER, near.shape) * sides, 0, 1)
    near[:, 2:] = np.clip(np.maximum(near[:, 2:], near[:, :2] + MIN_SIDE), 0, 1)
    first_parent = np.array([ps[0] if ps else c for c, ps in enumerate(hierarchy.parents)])
    to_parent = rng.random(len(near_class)) < PARENT_CLASS_FRACTION
    near_class[to_parent] = first_parent[near_class[to_parent]]
    # keep at most per_image near detections per image: the first ones of each image
    starts = np.searchsorted(near_image, np.arange(images))
    keep = np.arange(len(near_image)) - starts[near_image] < per_image
    near_image, near_class, near = near_image[keep], near_class[keep], near[keep]
    fill = per_image - np.bincount(near_image, minlength=images)
    fill_image = np.repeat(np.arange(images), fill)
    image = np.r_[near_image, fill_image]
    classes = np.r_[near_class, rng.integers(0, len(hierarchy), len(fill_image))]
    boxes = np.concatenate([near, _random_boxes(rng, len(fill_image))])
    scores = np.r_[rng.uniform(0.3, 1.0, len(near_image)), rng.uniform(0.0, 0.5, len(fill_image))]
    order = np.argsort(image, kind="stable")
    return image[order], classes[order], boxes[order], scores[order]


def _write_rows(path: Path, header: str, row_format: str, columns: Sequence[np.ndarray]) -> None:
    """Write ``header`` and one ``row_format`` line per row of ``columns`` (equal lengths)."""
    with open(path, "w") as handle:
        handle.write(header + "\n")
        for start in range(0, len(columns[0]), ROWS_PER_WRITE):
            rows = zip(*(column[start:start + ROWS_PER_WRITE].tolist() for column in columns))
            handle.write("".join(row_format.format(*row) + "\n" for row in rows))
