"""The synthetic shapes data set: deterministic from the seed, tight boxes, written atomically."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from hpc.errors import UserError
from megdet.data import synth

COUNTS = {"train": 12, "val": 4}
SIZE = 128


def files_of(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    first = synth.synthesize(tmp_path / "a", COUNTS, seed=3, size=SIZE)
    synth.synthesize(tmp_path / "b", COUNTS, seed=3, size=SIZE)
    synth.synthesize(tmp_path / "c", COUNTS, seed=4, size=SIZE)
    a, b, c = (files_of(tmp_path / name) for name in "abc")
    assert len(a) == 2 + sum(COUNTS.values()) and a == b
    assert a.keys() == c.keys() and a != c
    # Every image depends on (seed, split, index) alone: a longer split starts with the same images.
    longer = synth.synthesize(tmp_path / "d", {"train": 14, "val": 4}, seed=3, size=SIZE)
    assert longer["train"]["images"][:12] == first["train"]["images"]
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c", "d"], "no staging folders left behind"


def test_json_is_coco_and_matches_the_written_images(tmp_path):
    datasets = synth.synthesize(tmp_path / "shapes", {"train": 40, "val": 4}, seed=0, size=SIZE)
    coco = COCO(str(tmp_path / "shapes" / "annotations" / "instances_train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["rectangle", "ellipse", "triangle"]
    annotations = datasets["train"]["annotations"]
    assert {a["category_id"] for a in annotations} == {1, 2, 3}
    assert min(a["id"] for a in annotations) == 1 and min(i["id"] for i in datasets["train"]["images"]) == 1
    shapes = set()
    for image in datasets["train"]["images"]:
        decoded = np.asarray(Image.open(tmp_path / "shapes" / "train" / image["file_name"]))
        assert decoded.shape == (image["height"], image["width"], 3) and max(decoded.shape[:2]) == SIZE
        shapes.add(decoded.shape)
        rendered = synth.render_image(synth.image_rng(0, "train", image["id"] - 1), SIZE)
        for k in range(1, len(rendered.annotations) + 1):  # JPEG keeps each shape's colour where it was drawn
            mask = rendered.instances == k
            assert np.abs(decoded[mask].mean(axis=0) - rendered.image[mask].mean(axis=0)).max() < 6
        written = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert [{key: a[key] for key in ("category_id", "bbox", "area", "iscrowd", "segmentation")} for a in written] == \
            rendered.annotations
    assert len(shapes) > 1, "image sizes vary"


def test_boxes_are_tight_to_the_visible_pixels_of_each_shape():
    objects = overlapping = empty = 0
    for index in range(60):
        rendered = synth.render_image(synth.image_rng(7, "train", index), SIZE)
        height, width = rendered.instances.shape
        empty += not rendered.annotations
        for k, annotation in enumerate(rendered.annotations, start=1):
            mask = rendered.instances == k
            x, y, w, h = annotation["bbox"]
            assert w > 0 and h > 0 and x + w <= width and y + h <= height
            inside = np.zeros_like(mask)
            inside[y:y + h, x:x + w] = True
            assert not (mask & ~inside).any(), "no pixel of the shape outside its box"
            assert mask[y, x:x + w].any() and mask[y + h - 1, x:x + w].any(), "top and bottom rows touch it"
            assert mask[y:y + h, x].any() and mask[y:y + h, x + w - 1].any(), "left and right columns touch it"
            assert annotation["area"] == mask.sum() >= synth.MIN_VISIBLE_FRACTION * synth.MIN_OBJECT_PIXELS
            objects += 1
            overlapping += bool(np.any(rendered.instances[inside & ~mask] > 0))
    assert objects > 100 and overlapping > 5 and empty >= 1


def test_object_count_and_size_follow_the_layout_options():
    """--max-objects caps the shapes per image; --object-size bounds their extent (a shape's box side
    lies within its drawn extent times the rotation and aspect spread, so check the box's geometric
    mean side against the range with that slack)."""
    sides = []
    for index in range(30):
        rendered = synth.render_image(synth.image_rng(5, "train", index), SIZE, max_objects=2, object_size=(0.3, 0.4))
        assert len(rendered.annotations) <= 2
        short = min(rendered.image.shape[:2])
        sides += [np.sqrt(a["bbox"][2] * a["bbox"][3]) / short for a in rendered.annotations]
    default = [np.sqrt(a["bbox"][2] * a["bbox"][3]) / min(r.image.shape[:2])
               for r in (synth.render_image(synth.image_rng(5, "train", i), SIZE) for i in range(30))
               for a in r.annotations]
    assert len(sides) >= 30 and 0.15 < min(sides) and max(sides) < 0.7
    assert min(default) < 0.12, "the default range reaches much smaller shapes"


def test_bad_arguments_and_existing_output_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--size 16 is too small: use at least 64 pixels"):
        synth.synthesize(tmp_path / "x", COUNTS, seed=0, size=16)
    with pytest.raises(UserError, match="--val 0: give at least 1 image"):
        synth.synthesize(tmp_path / "x", {"train": 1, "val": 0}, seed=0, size=SIZE)
    with pytest.raises(UserError, match="--max-objects 0: give at least 1"):
        synth.synthesize(tmp_path / "x", COUNTS, seed=0, size=SIZE, max_objects=0)
    with pytest.raises(UserError, match="--object-size 0.5,0.1: give MIN,MAX fractions"):
        synth.synthesize(tmp_path / "x", COUNTS, seed=0, size=SIZE, object_size=(0.5, 0.1))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        synth.synthesize(tmp_path / "taken", COUNTS, seed=0, size=SIZE)
    assert sorted(os.listdir(tmp_path)) == ["taken"] and os.listdir(tmp_path / "taken") == ["keep.txt"]


def test_cli_writes_the_data_set_and_reports_errors_in_one_line(run_megdet, tmp_path):
    done = run_megdet(["synth", "--out", str(tmp_path / "s"), "--train", "3", "--val", "2", "--size", "64",
                       "--seed", "1"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "s" / "annotations" / "instances_val.json").read_text())["images"]) == 2
    again = run_megdet(["synth", "--out", str(tmp_path / "s")], timeout=120)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr


def test_segmentation_polygons_outline_the_visible_pixels_of_each_shape():
    """The polygons rasterise (pycocotools) back to exactly the visible pixels, occluded shapes included."""
    from pycocotools import mask as mask_utils

    checked = 0
    for index in range(12):
        rendered = synth.render_image(synth.image_rng(3, "train", index), 96)
        height, width = rendered.instances.shape
        for k, annotation in enumerate(rendered.annotations):
            visible = rendered.instances == k + 1
            polygons = annotation["segmentation"]
            assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
            mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))).astype(bool)
            assert np.array_equal(mask, visible), (index, k)
            checked += 1
    assert checked > 20
