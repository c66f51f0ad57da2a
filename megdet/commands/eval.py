"""``megdet eval``: COCO AP of a trained model on shards, or of a results file (see
``megdet.engine.evaluate``).

    megdet eval --gt annotations/instances_val2017.json --results dets.json [--iou-type segm]
    horovodrun -np 8 -H localhost:8 megdet eval largedet_coco_12min --checkpoint runs/x/model_0003360.pt
"""
from __future__ import annotations

from hpc.errors import UserError
from megdet.commands import load_config


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", help="a preset or YAML file, with --checkpoint: evaluate a trained model")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.val=DIR")
    parser.add_argument("--checkpoint", help="a checkpoint written by megdet train")
    parser.add_argument("--gt", help="COCO instances json (ground truth)")
    parser.add_argument("--results", help="COCO box results json: [{image_id, category_id, bbox, score}, ...]")
    parser.add_argument("--out", help="folder for the metrics JSON (written atomically, only when the evaluation succeeds)")
    parser.add_argument("--iou-type", default="bbox",
                        help="with --results: bbox (box AP) or segm (mask AP; the detections carry RLE masks)")


def run(args) -> int:
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
