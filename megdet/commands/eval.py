"""``megdet eval``: COCO AP of a trained model on shards, or of a results file (see
``megdet.engine.evaluate``); the Open Images challenge mAP@0.5 of a results CSV (see
``megdet.engine.open_images_metric``), and of a trained model on Open Images shards (the shards decide:
``megdet.engine.open_images_eval``).

    megdet eval --gt annotations/instances_val2017.json --results dets.json [--iou-type segm]
    horovodrun -np 8 -H localhost:8 megdet eval largedet_coco_12min --checkpoint runs/x/model_0003360.pt
    megdet eval --metric open-images --boxes validation-annotations-bbox.csv \\
        --labels validation-annotations-human-imagelabels-boxable.csv --hierarchy bbox_labels_600_hierarchy.json \\
        --classes class-descriptions-boxable.csv --results detections.csv
"""
from __future__ import annotations

from hpc.errors import UserError
from megdet.commands import load_config

METRICS = ("coco", "open-images")
# the files of --metric open-images: option -> what it is
OPEN_IMAGES_FILES = {"boxes": "the boxes CSV (ImageID, LabelName, XMin, XMax, YMin, YMax, IsGroupOf)",
                     "labels": "the verified image-level labels CSV (ImageID, LabelName, Confidence 1 or 0)",
                     "hierarchy": "the class hierarchy JSON (bbox_labels_600_hierarchy.json)",
                     "classes": "the class descriptions CSV, LabelName,DisplayName without header"}


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="a preset or YAML file, with --checkpoint: evaluate a trained model")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.val=DIR")
    parser.add_argument("--checkpoint", help="a checkpoint written by megdet train")
    parser.add_argument("--metric", choices=METRICS, default="coco",
                        help="coco (pycocotools AP, the default) or open-images (the Open Images challenge mAP@0.5 "
                             "of a results CSV, with --boxes --labels --hierarchy --classes)")
    parser.add_argument("--gt", help="COCO instances json (ground truth)")
    parser.add_argument("--results", help="COCO box results json: [{image_id, category_id, bbox, score}, ...]; "
                                          "with --metric open-images a CSV: ImageID, LabelName, Score, XMin, XMax, "
                                          "YMin, YMax")
    for name, what in OPEN_IMAGES_FILES.items():
        parser.add_argument(f"--{name}", help=f"with --metric open-images: {what}")
    parser.add_argument("--out", help="folder for the metrics JSON (written atomically, only when the evaluation succeeds)")
    parser.add_argument("--iou-type", default="bbox",
                        help="with --results: bbox (box AP) or segm (mask AP; the detections carry RLE masks)")


def run(args) -> int:
    if args.metric == "open-images":
        return _run_open_images(args)
    given = [f"--{name}" for name in OPEN_IMAGES_FILES if getattr(args, name) is not None]
    if given:
        raise UserError(f"{' '.join(given)} belong{'s' * (len(given) == 1)} to the Open Images metric: add "
                        "--metric open-images, or drop them for COCO")
    if args.config is not None or args.checkpoint is not None:
        if args.config is None or args.checkpoint is None:
            raise UserError("give both CONFIG and --checkpoint CKPT to evaluate a trained model")
        if args.iou_type != "bbox":
            raise UserError(f"--iou-type {args.iou_type} applies to a results file (--gt --results); a checkpoint "
                            "is evaluated by box AP: drop --iou-type")
        cfg = load_config(args.config, args.overrides)
        from megdet.engine import evaluate

        return evaluate.evaluate_checkpoint(cfg, args.checkpoint, args.out)
    if args.gt is None or args.results is None:
        raise UserError("give both --gt ANNOTATIONS.json and --results DETECTIONS.json, or CONFIG --checkpoint CKPT")
    from megdet.engine import evaluate

    return evaluate.evaluate_files(args.gt, args.results, args.out, iou_type=args.iou_type)


def _run_open_images(args) -> int:
    if args.config is not None or args.checkpoint is not None:
        raise UserError("--metric open-images evaluates a results CSV against the Open Images files; a checkpoint "
                        "on Open Images shards (megdet pack --boxes ...) is scored by that metric without it: drop "
                        "--metric open-images")
    if args.gt is not None or args.iou_type != "bbox":
        raise UserError("--metric open-images evaluates a results CSV against the Open Images files: drop --gt and "
                        "--iou-type")
    missing = [f"--{name} ({what})" for name, what in {**OPEN_IMAGES_FILES, "results": "the detections CSV"}.items()
               if getattr(args, name) is None]
    if missing:
        raise UserError(f"--metric open-images needs {'; '.join(missing)}: give them")
    from megdet.engine import open_images_metric

    return open_images_metric.run_files(args.boxes, args.labels, args.hierarchy, args.classes, args.results,
                                        args.out)
