"""Record -> detector input: sizes, boxes, flips, labels, crowds, empty images and degenerate boxes,
on real COCO-format photographs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hpc.errors import UserError
from megdet import config
from megdet.data.transforms import DetectionTransform, build_transform, collate, resized_shape


@pytest.fixture(scope="module")
def icevision(realdata):
    """COCO's icevision_coco6 folder (6 photos): annotations.json and images/."""
    return realdata / "icevision_coco6"


@pytest.fixture(scope="module")
def chess(realdata):
    """The chess set's validation folder: _annotations.coco.json beside its photos."""
    return realdata / "roboflow_chess_v23" / "valid"


def coco_records(annotation_file, image_dir, downscale=1.0, limit=None):
    """Records in the shard format (interface of megdet/data/coco.py), from a COCO json and its images;
    the stored image is shrunk by ``downscale`` while boxes stay in original pixels."""
    if not annotation_file.exists():
        pytest.skip(f"{annotation_file} is absent (the shared real data)")
    dataset = json.loads(annotation_file.read_text())
    categories = sorted(({"id": c["id"], "name": c["name"]} for c in dataset["categories"]), key=lambda c: c["id"])
    records = []
    for image in sorted(dataset["images"], key=lambda i: i["id"])[:limit]:
        pixels = Image.open(image_dir / image["file_name"]).convert("RGB")
        if downscale != 1.0:
            pixels = pixels.resize((round(pixels.width * downscale), round(pixels.height * downscale)), Image.BILINEAR)
        annotations = [a for a in dataset["annotations"] if a["image_id"] == image["id"]]
        records.append({"image": np.asarray(pixels), "image_id": image["id"], "file_name": image["file_name"],
                        "height": image["height"], "width": image["width"],
                        "boxes": np.array([a["bbox"] for a in annotations], dtype=np.float32).reshape(-1, 4),
                        "category_ids": np.array([a["category_id"] for a in annotations], dtype=np.int64),
                        "iscrowd": np.array([bool(a["iscrowd"]) for a in annotations], dtype=bool),
                        "areas": np.array([a["area"] for a in annotations], dtype=np.float32)})
    return records, categories


def test_resized_shape_follows_resize_shortest_edge():
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)    # 640 * 800/480 = 1066.7
    assert resized_shape(2000, 500, 800, 1333) == (1333, 333)   # capped: 500 * 1333/2000 = 333.25
    assert resized_shape(1371, 2048, 800, 1333) == (800, 1195)  # 2048 * 800/1371 = 1195.04


def test_real_photos_boxes_labels_and_a_downscaled_copy_agree(chess):
    full, categories = coco_records(chess / "_annotations.coco.json", chess, limit=2)
    half, _ = coco_records(chess / "_annotations.coco.json", chess, downscale=0.5, limit=2)
    category_ids = [c["id"] for c in categories]
    assert category_ids[0] == 0, "the chess set has a category id 0: label 1"
    transform = DetectionTransform(min_sizes=(600,), max_size=1000, flip_prob=0.0, category_ids=category_ids)
    for record, small in zip(full, half):
        sample, from_small = transform(record), transform(small)
        height, width = record["height"], record["width"]
        new_height, new_width = resized_shape(height, width, 600, 1000)
        assert sample.image.shape == from_small.image.shape == (3, new_height, new_width)
        assert sample.image.dtype == torch.uint8
        assert (sample.image.float() - from_small.image.float()).abs().mean() < 6, "the same picture from a downscaled copy"
        x, y, w, h = record["boxes"].astype(np.float64).T
        sx, sy = new_width / width, new_height / height
        expected = np.stack([x * sx, y * sy, (x + w) * sx, (y + h) * sy], axis=1)
        assert np.allclose(sample.target["boxes"].numpy(), expected, atol=1e-3)
        assert torch.equal(sample.target["boxes"], from_small.target["boxes"])
        assert sample.target["labels"].tolist() == [category_ids.index(c) + 1 for c in record["category_ids"]]
        assert sample.target["labels"].dtype == torch.int64 and sample.original_size == (height, width)
        assert sample.num_degenerate == 0


def test_flip_moves_pixels_and_boxes_together():
    """A white rectangle at x 40..80, y 20..50 of a 100 x 200 image; shorter side 200 doubles it."""
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    image[20:50, 40:80] = 255
    record = {"image": image, "image_id": 7, "file_name": "r.png", "height": 100, "width": 200,
              "boxes": np.array([[40, 20, 40, 30]], dtype=np.float32), "category_ids": np.array([5]),
              "iscrowd": np.array([False]), "areas": np.array([1200.0], dtype=np.float32)}
    transform = DetectionTransform(min_sizes=(200,), max_size=1000, flip_prob=1.0, category_ids=[3, 5])
    sample = transform(record, np.random.default_rng(0))
    assert sample.target["boxes"].tolist() == [[400 - 160, 40, 400 - 80, 100]]
    assert sample.target["labels"].tolist() == [2]
    ys, xs = np.nonzero(sample.image[0].numpy() > 128)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (240, 320, 40, 100)


def test_random_sizes_and_flips_come_from_the_rng(icevision):
    records, categories = coco_records(icevision / "annotations.json", icevision / "images")
    record = next(r for r in records if len(r["boxes"]))
    transform = DetectionTransform(min_sizes=(320, 480), max_size=1333, flip_prob=0.5,
                                   category_ids=[c["id"] for c in categories])
    with pytest.raises(ValueError, match="needs an rng"):
        transform(record)
    draws = [transform(record, np.random.default_rng(seed)) for seed in range(12)]
    assert {min(d.image.shape[1:]) for d in draws} == {320, 480}
    small = [d for d in draws if min(d.image.shape[1:]) == 320]
    assert len({tuple(d.target["boxes"][0].tolist()) for d in small}) == 2, "flipped and unflipped boxes"
    plain = small[0]
    mirror = next(d for d in small if not torch.equal(d.image, plain.image))
    assert torch.equal(mirror.image, plain.image.flip(-1))
    width = plain.image.shape[-1]
    assert torch.allclose(mirror.target["boxes"], torch.stack([width - plain.target["boxes"][:, 2],
                                                               plain.target["boxes"][:, 1],
                                                               width - plain.target["boxes"][:, 0],
                                                               plain.target["boxes"][:, 3]], dim=1))
    again = transform(record, np.random.default_rng(3))
    assert torch.equal(again.image, draws[3].image) and torch.equal(again.target["boxes"], draws[3].target["boxes"])


def test_crowds_are_kept_flagged_and_images_without_annotations_are_empty(icevision):
    records, categories = coco_records(icevision / "annotations.json", icevision / "images")
    transform = DetectionTransform(min_sizes=(400,), max_size=666, flip_prob=0.0,
                                   category_ids=[c["id"] for c in categories])
    samples = [transform(r) for r in records]
    crowded = [s for s, r in zip(samples, records) if r["iscrowd"].any()]
    assert len(crowded) == 1 and crowded[0].target["iscrowd"].sum() == 1
    assert crowded[0].target["iscrowd"].dtype == torch.bool
    empty = [s for s, r in zip(samples, records) if len(r["boxes"]) == 0]
    assert len(empty) == 1
    assert empty[0].target["boxes"].shape == (0, 4) and empty[0].target["labels"].shape == (0,)
    assert empty[0].target["boxes"].dtype == torch.float32 and empty[0].target["labels"].dtype == torch.int64
    images, targets, sizes, ids = collate(samples)
    assert len(images) == len(targets) == 6 and ids == [r["image_id"] for r in records]
    assert sizes == [(r["height"], r["width"]) for r in records]


def test_degenerate_boxes_are_dropped_and_counted_and_unknown_categories_named():
    record = {"image": np.zeros((50, 80, 3), dtype=np.uint8), "image_id": 3, "file_name": "d.jpg", "height": 100,
              "width": 160, "boxes": np.array([[10, 10, 20, 20], [30, 30, 0, 5], [200, 10, 5, 5], [5, 5, 5, np.nan]],
                                              dtype=np.float32),
              "category_ids": np.array([1, 1, 2, 2]), "iscrowd": np.zeros(4, dtype=bool),
              "areas": np.ones(4, dtype=np.float32)}
    transform = DetectionTransform(min_sizes=(100,), max_size=1000, flip_prob=0.0, category_ids=[1, 2])
    sample = transform(record)
    assert sample.image.shape == (3, 100, 160), "output size from the original size, not the stored one"
    assert sample.target["boxes"].tolist() == [[10, 10, 30, 30]] and sample.num_degenerate == 3
    record["category_ids"] = np.array([1, 1, 9, 2])
    with pytest.raises(UserError, match=r"image 3 \(d.jpg\) has category ids \[9\]"):
        transform(record)


def test_build_transform_reads_the_config_and_checks_the_class_count():
    cfg = config.load("shapes_r18_cpu")
    categories = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}, {"id": 3, "name": "triangle"}]
    train, test = build_transform(cfg, categories=categories, train=True), build_transform(cfg, categories=categories,
                                                                                           train=False)
    assert train.min_sizes == tuple(cfg.data.min_sizes) and train.flip_prob == cfg.data.flip_prob
    assert test.min_sizes == (cfg.data.test_min_size,) and not test.is_random
    with pytest.raises(UserError, match="the data set has 2 categories but model.num_classes=3"):
        build_transform(cfg, categories=categories[:2], train=True)
