"""``megdet show``: what the model sees. Validation images with their ground truth (left) and the model's
detections (right) in one PNG grid: boxes, class names, scores, and masks for Mask R-CNN.

    megdet show runs/demo                       # the run folder's config and latest checkpoint
    megdet show runs/demo/model_0000950.pt --images 4 --out pictures.png

One process, on the run's device (``train.device``); detections below ``--score-threshold`` are not drawn.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from hpc import checkpoint
from hpc.errors import UserError
from megdet import config as config_mod
from megdet.data.segmentation import masks_for_image
from megdet.data.transforms import build_transform, collate, xywh_to_xyxy

SHOW_FILE = "show.png"
MASK_ALPHA = 0.45
PANEL_INCHES = 4.0


def find_run(path: Path):
    """(config, checkpoint state, checkpoint path) of a run folder (its newest checkpoint that loads, as
    ``megdet train --resume`` takes it) or a checkpoint file."""
    file, state = checkpoint.read(path, required_keys=("model", "config"))
    if file is None:
        raise UserError(f"{path} holds no checkpoint (model_*.pt): give a run folder of megdet train or a checkpoint")
    return config_mod.from_document(state["config"], f"the config in {file}"), state, file


def predictions(model, records: Sequence[Dict], cfg: config_mod.Config, categories, device: torch.device,
                autocast=contextlib.nullcontext) -> List[Dict[str, np.ndarray]]:
    """``model``'s detections of each record (eval transform, one batch), on the CPU as numpy arrays."""
    transform = build_transform(cfg, categories=categories, train=False)
    images, _, sizes, _ = collate([transform(record) for record in records])
    model.eval()
    with torch.no_grad(), autocast():
        outputs = model([image.to(device) for image in images], original_sizes=sizes)
    return [{key: value.cpu().numpy() for key, value in output.items()} for output in outputs]


def ground_truth(record: Dict, with_masks: bool) -> Dict[str, np.ndarray]:
    """A record's boxes (xyxy original pixels), category ids, and masks at the original size."""
    truth = {"boxes": xywh_to_xyxy(np.asarray(record["boxes"], dtype=np.float64).reshape(-1, 4)),
             "category_ids": np.asarray(record["category_ids"]).reshape(-1)}
    if with_masks:
        truth["masks"] = masks_for_image(record["segmentation"], image_id=int(record["image_id"]),
                                         annotation_ids=[int(i) for i in record["annotation_ids"]],
                                         height=int(record["height"]), width=int(record["width"]),
                                         out_height=int(record["height"]), out_width=int(record["width"])).astype(bool)
    return truth


def draw_grid(records: Sequence[Dict], truths: Sequence[Dict], outputs: Sequence[Dict], categories,
              out_path, score_threshold: float) -> Path:
    """One row per image: the ground truth, then the detections scoring above ``score_threshold``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.patches import Rectangle

    from megdet.engine.metrics import save_png

    names = {int(c["id"]): c["name"] for c in categories}
    label_ids = [int(c["id"]) for c in categories]
    colours = pyplot.get_cmap("tab10")
    figure, axes = pyplot.subplots(len(records), 2, figsize=(2 * PANEL_INCHES, PANEL_INCHES * len(records)),
                                   squeeze=False)
    for row, (record, truth, output) in enumerate(zip(records, truths, outputs)):
        keep = output["scores"] >= score_threshold
        panels = ((f"image {record['image_id']}: ground truth", truth["boxes"], truth["category_ids"], None,
                   truth.get("masks")),
                  (f"detections >= {score_threshold:g}", output["boxes"][keep],
                   np.asarray(label_ids)[output["labels"][keep] - 1], output["scores"][keep],
                   output["masks"][keep] if "masks" in output else None))
        for axis, (title, boxes, category_ids, scores, masks) in zip(axes[row], panels):
            picture = record["image"].astype(np.float32) / 255.0
            for index in range(len(boxes)):
                colour = np.asarray(colours(index % 10)[:3])
                if masks is not None:
                    picture[masks[index]] = (1 - MASK_ALPHA) * picture[masks[index]] + MASK_ALPHA * colour
            axis.imshow(picture)
            for index, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
                colour = colours(index % 10)
                axis.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
                text = names.get(int(category_ids[index]), str(category_ids[index]))
                if scores is not None:
                    text += f" {scores[index]:.2f}"
                axis.text(x1, y1, text, color="white", fontsize=7, va="bottom",
                          bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "linewidth": 0})
            axis.set_title(title, fontsize=9)
            axis.axis("off")
    figure.tight_layout()
    return save_png(figure, out_path)


def show(model, dataset, cfg: config_mod.Config, device: torch.device, out_path, *, images: int,
         score_threshold: float, autocast=contextlib.nullcontext) -> Path:
    """Draw the first ``images`` images of the shard set ``dataset`` with ``model``'s detections."""
    if images < 1:
        raise UserError(f"--images {images}: give at least 1")
    records = [dataset[index] for index in range(min(images, len(dataset)))]
    outputs = predictions(model, records, cfg, dataset.categories, device, autocast)
    truths = [ground_truth(record, cfg.model.with_masks) for record in records]
    return draw_grid(records, truths, outputs, dataset.categories, out_path, score_threshold)


def run_show(path: Path, out: Optional[str], images: int, score_threshold: float) -> int:
    """``megdet show PATH``: the picture of a run folder's latest checkpoint, or of a checkpoint file."""
    from hpc.shards import ShardDataset
    from megdet.engine.build import build_model, build_runtime

    cfg, state, file = find_run(path)
    if not cfg.data.val:
        raise UserError(f"the config in {file} has no data.val: megdet show draws validation images")
    runtime = build_runtime(cfg)
    model = build_model(cfg, inference=True).to(runtime.device)
    model.load_state_dict(state["model"])
    dataset = ShardDataset(cfg.data.val, with_segmentation=cfg.model.with_masks)
    png = show(model, dataset, cfg, runtime.device, out or (file.parent / SHOW_FILE), images=images,
               score_threshold=score_threshold, autocast=runtime.autocast)
    print(f"megdet show: {min(images, len(dataset))} images of {cfg.data.val} with {file.name}'s detections: {png}")
    return 0
