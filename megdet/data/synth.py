"""``megdet synth``: a synthetic COCO data set of shapes, deterministic from a seed.

    megdet synth --out data/shapes --train 1000 --val 200 --seed 0 --size 256

Writes ``OUT/train/*.jpg``, ``OUT/val/*.jpg`` and ``OUT/annotations/instances_{train,val}.json``.
Each image has a noise and/or gradient background and 0-6 rectangles, ellipses and triangles (one
class each, random rotation, size, aspect and colour) that may overlap; every object keeps at least
``MIN_VISIBLE_FRACTION`` of its pixels visible. Boxes are tight to the visible pixels of the drawn
shape: ``[x0, y0, x1 - x0 + 1, y1 - y0 + 1]`` over its pixels, ``area`` is its pixel count, and its
``segmentation`` is the polygons that outline those visible pixels (the 0.5 contour of its pixel
mask, in COCO's pixel coordinates: pixel (x, y) covers [x, x + 1) x [y, y + 1)). The data set is built
in a temporary folder next to OUT and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import contourpy
import numpy as np
from PIL import Image, ImageDraw

from hpc.errors import UserError

RECTANGLE, ELLIPSE, TRIANGLE = 1, 2, 3  # COCO category ids
CATEGORIES = ({"id": RECTANGLE, "name": "rectangle", "supercategory": "shape"},
              {"id": ELLIPSE, "name": "ellipse", "supercategory": "shape"},
              {"id": TRIANGLE, "name": "triangle", "supercategory": "shape"})
SPLITS = ("train", "val")
JPEG_QUALITY = 95
JPEG_CHROMA_SUBSAMPLING = 0       # 4:4:4: full-resolution colour keeps small shapes their colour
MIN_IMAGE_SIZE = 64
MAX_OBJECTS = 6
EMPTY_IMAGE_PROBABILITY = 0.05
SHORT_SIDE_RANGE = (0.75, 1.0)        # shorter image side as a fraction of --size (the longer side)
OBJECT_SIZE_RANGE = (0.08, 0.5)       # object extent as a fraction of the shorter image side
MIN_OBJECT_PIXELS = 64
MIN_VISIBLE_FRACTION = 0.6            # an object may lose at most 40% of its pixels to later ones
PLACEMENT_TRIES = 20
MIN_COLOUR_DISTANCE = 90.0            # Euclidean RGB distance between an object and the background under it
ELLIPSE_VERTICES = 48
ASPECT_RANGE = (0.5, 2.0)             # object width / height
RECTANGLE_MAX_TILT = math.pi / 6      # rectangles stay roughly upright; ellipses and triangles turn freely
BACKGROUND_GRADIENT_PROBABILITY = 0.6
BACKGROUND_NOISE_PROBABILITY = 0.7
BACKGROUND_NOISE_SIGMA = (4.0, 30.0)  # range of the Gaussian pixel noise's standard deviation
SHAPE_TEXTURE_SIGMA = (0.0, 8.0)


@dataclass
class SynthImage:
    """One rendered image. image: uint8 [H, W, 3] RGB. instances: int32 [H, W], k + 1 where object k is
    visible, 0 for background. annotations: COCO dicts (category_id, bbox xywh, area, iscrowd)."""

    image: np.ndarray
    instances: np.ndarray
    annotations: List[Dict]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 3]: a flat colour, a linear gradient between two colours, either with noise."""
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if rng.random() < BACKGROUND_GRADIENT_PROBABILITY:
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        image = start + t[..., None] * (end - start)
    else:
        image = np.broadcast_to(start, (height, width, 3)).copy()
    if rng.random() < BACKGROUND_NOISE_PROBABILITY:
        image = image + rng.normal(0.0, rng.uniform(*BACKGROUND_NOISE_SIGMA), (height, width, 3))
    return image.astype(np.float32)


def _polygon(rng: np.random.Generator, category_id: int, width: float, height: float) -> np.ndarray:
    """[P, 2] vertices (x, y) of a shape of about width x height, centred on (0, 0), randomly rotated."""
    if category_id == RECTANGLE:
        points = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif category_id == ELLIPSE:
        theta = np.linspace(0, 2 * math.pi, ELLIPSE_VERTICES, endpoint=False)
        points = 0.5 * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    else:
        points = np.array([[-0.5, 0.5], [0.5, 0.5], [rng.uniform(-0.5, 0.5), -0.5]])
    points = points * [width, height]
    tilt = RECTANGLE_MAX_TILT if category_id == RECTANGLE else math.pi
    angle = rng.uniform(-tilt, tilt)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return points @ rotation.T


def _shape_mask(polygon: np.ndarray, offset: Tuple[float, float], height: int, width: int) -> np.ndarray:
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x + offset[0]), float(y + offset[1])) for x, y in polygon], fill=1)
    return np.array(canvas, dtype=bool)


def outline_polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` of bool ``mask`` [H, W]: its 0.5 contours (marching
    squares), closed at the image border, shifted by half a pixel from pixel centres to COCO's pixel
    coordinates; parts of fewer than 3 points are left out."""
    padded = np.pad(mask.astype(np.float64), 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(0.5)
    # padded index (i, j) = pixel (i - 1, j - 1), whose centre is at COCO (j - 0.5, i - 0.5)
    return [[round(float(v), 2) for v in (line[:-1] - 0.5).ravel()] for line in lines if len(line) > 3]


def _colour_against(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB colour at least MIN_COLOUR_DISTANCE from the mean background colour ``under``."""
    for _ in range(PLACEMENT_TRIES):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) >= MIN_COLOUR_DISTANCE:
            return colour
    return np.where(under < 128, 255.0, 0.0)  # the farthest corner of the colour cube: >= 128 per channel


def render_image(rng: np.random.Generator, size: int, max_objects: int = MAX_OBJECTS,
                 object_size: Tuple[float, float] = OBJECT_SIZE_RANGE) -> SynthImage:
    """Draw one image whose longer side is ``size`` pixels, from ``rng`` alone: up to ``max_objects``
    shapes whose extent is drawn log-uniformly from ``object_size`` (fractions of the shorter side)."""
    short = int(round(size * rng.uniform(*SHORT_SIDE_RANGE)))
    height, width = (short, size) if rng.random() < 0.5 else (size, short)
    image = _background(rng, height, width)
    instances = np.zeros((height, width), dtype=np.int32)
    full_areas: List[int] = []
    categories: List[int] = []
    count = 0 if rng.random() < EMPTY_IMAGE_PROBABILITY else int(rng.integers(1, max_objects + 1))
    low, high = (fraction * min(height, width) for fraction in object_size)
    for _ in range(count):
        category_id = int(rng.choice([c["id"] for c in CATEGORIES]))
        for _ in range(PLACEMENT_TRIES):
            extent = math.exp(rng.uniform(math.log(low), math.log(high)))
            aspect = math.exp(rng.uniform(*(math.log(a) for a in ASPECT_RANGE)))
            polygon = _polygon(rng, category_id, extent * math.sqrt(aspect), extent / math.sqrt(aspect))
            offset = (rng.uniform(0, width), rng.uniform(0, height))
            mask = _shape_mask(polygon, offset, height, width)
            if mask.sum() < MIN_OBJECT_PIXELS:
                continue
            covered = np.bincount(instances[mask], minlength=len(full_areas) + 1)[1:]
            remaining = np.bincount(instances.ravel(), minlength=len(full_areas) + 1)[1:] - covered
            if np.all(remaining >= MIN_VISIBLE_FRACTION * np.asarray(full_areas, dtype=np.float64)):
                break
        else:
            continue  # no placement left every earlier object visible enough: skip this one
        colour = _colour_against(rng, image[mask].mean(axis=0))
        texture = rng.normal(0.0, rng.uniform(*SHAPE_TEXTURE_SIGMA), (int(mask.sum()), 3))
        image[mask] = colour + texture
        full_areas.append(int(mask.sum()))
        categories.append(category_id)
        instances[mask] = len(full_areas)
    annotations = []
    for index, category_id in enumerate(categories):
        visible = instances == index + 1
        ys, xs = np.nonzero(visible)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
        annotations.append({"category_id": category_id, "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                            "area": int(xs.size), "iscrowd": 0, "segmentation": outline_polygons(visible)})
    return SynthImage(np.clip(np.rint(image), 0, 255).astype(np.uint8), instances, annotations)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: each image depends on the seed and its position only."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def write_split(root: Path, split: str, count: int, seed: int, size: int, **layout) -> Dict:
    """Render ``count`` images into ``root/split/`` and return the COCO instances dict; ``layout``:
    ``render_image``'s max_objects and object_size."""
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        rendered = render_image(image_rng(seed, split, index), size, **layout)
        image_id = index + 1
        file_name = f"{image_id:06d}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(rendered.image).save(buffer, format="JPEG", quality=JPEG_QUALITY,
                                             subsampling=JPEG_CHROMA_SUBSAMPLING)
        (root / split / file_name).write_bytes(buffer.getvalue())
        height, width = rendered.image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for annotation in rendered.annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    return {"info": {"description": f"megdet synth shapes, split {split}, seed {seed}, size {size}"},
            "licenses": [], "images": images, "annotations": annotations, "categories": list(CATEGORIES)}


def synthesize(out: Path, counts: Dict[str, int], seed: int, size: int, max_objects: int = MAX_OBJECTS,
               object_size: Tuple[float, float] = OBJECT_SIZE_RANGE) -> Dict[str, Dict]:
    """Write the data set to ``out`` (which must not exist or be empty), atomically; the instances per split."""
    out = Path(out)
    if size < MIN_IMAGE_SIZE:
        raise UserError(f"--size {size} is too small: use at least {MIN_IMAGE_SIZE} pixels")
    if max_objects < 1:
        raise UserError(f"--max-objects {max_objects}: give at least 1")
    if len(object_size) != 2 or not 0 < object_size[0] <= object_size[1] <= 1:
        raise UserError(f"--object-size {','.join(map(str, object_size))}: give MIN,MAX fractions of the shorter "
                        "side with 0 < MIN <= MAX <= 1, e.g. 0.08,0.5")
    for split, count in counts.items():
        if count < 1:
            raise UserError(f"--{split} {count}: give at least 1 image")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty: remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (staging / "annotations").mkdir()
        datasets = {}
        for split, count in counts.items():
            datasets[split] = write_split(staging, split, count, seed, size, max_objects=max_objects,
                                          object_size=tuple(object_size))
            (staging / "annotations" / f"instances_{split}.json").write_text(json.dumps(datasets[split]))
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return datasets


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    parser.add_argument("--train", type=int, default=1000, help="training images (default: %(default)s)")
    parser.add_argument("--val", type=int, default=200, help="validation images (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="longer image side in pixels (default: %(default)s)")
    parser.add_argument("--max-objects", type=int, default=MAX_OBJECTS,
                        help="most shapes per image; each image draws 1 to this many (default: %(default)s)")
    parser.add_argument("--object-size", type=_fractions, default=OBJECT_SIZE_RANGE, metavar="MIN,MAX",
                        help="shape extent as fractions of the shorter image side (default: %s)"
                             % ",".join(map(str, OBJECT_SIZE_RANGE)))


def _fractions(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN,MAX (two numbers, e.g. 0.08,0.5)") from None


def run(args) -> int:
    datasets = synthesize(Path(args.out), {"train": args.train, "val": args.val}, args.seed, args.size,
                          max_objects=args.max_objects, object_size=args.object_size)
    for split, dataset in datasets.items():
        print(f"{split}: {len(dataset['images'])} images, {len(dataset['annotations'])} boxes -> "
              f"{Path(args.out) / 'annotations' / f'instances_{split}.json'}")
    return 0
