"""The whole detector learns: resnet18_fpn, trained from scratch on CPU on 2 real VOC photographs, must
detect their boxes again at box AP50 >= 0.9 (pycocotools). Catches most wiring bugs (targets, box
coding, level mapping, sampling, rescaling to original coordinates) that shape tests cannot."""
import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megdet.model import build_detector

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
VOC = REALDATA / "padilla_voc100"
# Two people in one photo; a person on a horse beside it in the other (VOC classes 1, 14, 15).
FILE_NAMES = ("2007_001583.jpg", "2007_001457.jpg")
SHORTER_SIDE = 224     # small, so that a step takes well under a second on 2 cores
STEPS = 100
WARMUP_STEPS = 20
LEARNING_RATE = 0.02
# Fewer proposals and sampled RoIs than the preset, for speed; 2 images hold 4 boxes.
SPEED_OVERRIDES = dict(rpn_pre_nms_topk=(500, 500), rpn_post_nms_topk=(200, 200), roi_batch_size_per_image=64)


def load_images():
    """Images resized to SHORTER_SIDE (Tensor[3, H, W] 0..255), their targets, original sizes, and the
    COCO ground truth of the two images."""
    dataset = json.loads((VOC / "instances_default.json").read_text())
    records = [image for image in dataset["images"] if image["file_name"] in FILE_NAMES]
    images, targets, original_sizes = [], [], []
    for record in records:
        photo = Image.open(VOC / "images" / record["file_name"]).convert("RGB")
        assert photo.size == (record["width"], record["height"])
        scale = SHORTER_SIDE / min(photo.size)
        resized = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BILINEAR)
        images.append(torch.from_numpy(np.array(resized)).permute(2, 0, 1).float())
        annotations = [a for a in dataset["annotations"] if a["image_id"] == record["id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)])
        targets.append({"boxes": boxes * scale,
                        "labels": torch.tensor([a["category_id"] for a in annotations]),
                        "iscrowd": torch.tensor([bool(a["iscrowd"]) for a in annotations])})
        original_sizes.append((record["height"], record["width"]))
    ids = {record["id"] for record in records}
    ground_truth = {"images": records, "categories": dataset["categories"],
                    "annotations": [a for a in dataset["annotations"] if a["image_id"] in ids]}
    return images, targets, original_sizes, ground_truth


def box_ap50(ground_truth, records, detections):
    """COCO box AP at IoU 0.5 of ``detections`` (our output, original coordinates) by pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = [{"image_id": record["id"], "category_id": int(label), "score": float(score),
                "bbox": [x1, y1, x2 - x1, y2 - y1]}
               for record, detection in zip(records, detections)
               for (x1, y1, x2, y2), score, label in zip(detection["boxes"].tolist(), detection["scores"],
                                                         detection["labels"])]
    assert results, "the trained detector found nothing"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = ground_truth
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats[1]


@pytest.mark.slow
@pytest.mark.skipif(not VOC.is_dir(), reason=f"real data not found at {VOC} (the shared realdata folder)")
def test_resnet18_fpn_overfits_two_real_images():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    torch.manual_seed(0)
    images, targets, original_sizes, ground_truth = load_images()
    assert len(images) == 2
    model = build_detector("resnet18_fpn", num_classes=len(ground_truth["categories"]), norm="bn",
                           **SPEED_OVERRIDES)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE,
                                momentum=0.9, weight_decay=1e-4)
    start = time.perf_counter()
    model.train()
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = LEARNING_RATE * min(1.0, (step + 1) / WARMUP_STEPS)
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model(images, original_sizes=original_sizes)
    ap50 = box_ap50(ground_truth, ground_truth["images"], detections)
    print(f"AP50 {ap50:.3f} after {STEPS} steps in {time.perf_counter() - start:.0f} s; final losses "
          + ", ".join(f"{k} {v.item():.3f}" for k, v in losses.items()))
    assert ap50 >= 0.9
