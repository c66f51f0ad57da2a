"""COCO box and mask evaluation with pycocotools, of a results file or of detections spread over ranks,
the categories' scoring split over the ranks (``megdet.engine.coco_split``: the same numbers as one
process, bit for bit).

    megdet eval --gt annotations/instances_val2017.json --results dets.json --out runs/eval
    megdet eval --gt annotations/instances_val2017.json --results masks.json --iou-type segm   # mask AP
    horovodrun -np 4 -H localhost:4 megdet eval --gt annotations/instances_val2017.json --results dets.json
    horovodrun -np 8 -H localhost:8 megdet eval largedet_coco_12min --checkpoint runs/x/model_0003360.pt

In a run, each rank turns its detector outputs into per-image arrays; one allgather gives every rank
all of them, each rank scores its categories, rank 0 combines the scores and writes the COCO results
file and the metrics; every rank gets the metrics back:

    local[image_id] = detections_to_array(output, category_ids)        # per evaluated image
    metrics, table = evaluate_distributed(comm, coco_gt, local, out_dir="runs/x/eval")

Metrics are percentages (36.6 means AP 0.366), named as in ``METRIC_NAMES``: the 12 numbers of
``COCOeval.summarize``. By default every image of the ground truth is evaluated (an image without
detections counts as all misses), as the cocoapi demo does.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools.coco import COCO

from hpc.comm.local import LocalCommunicator
from hpc.errors import UserError
from megdet.data.coco import export_coco
from megdet.data.transforms import build_transform, collate
from megdet.engine import coco_split, open_images_eval
from megdet.engine.metrics import EVAL_METRICS_FILE, MASK_PREFIX
from megdet.model.mask_head import encode_masks
from hpc.files import write_json_atomic

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")
SEGM_RESULT_KEYS = ("image_id", "category_id", "segmentation", "score")
IOU_TYPES = ("bbox", "segm")
GT_KEYS = ("image_id", "category_id", "bbox", "area", "iscrowd")
RESULTS_FILE = "bbox_results.json"
SEGM_RESULTS_FILE = "segm_results.json"


def load_ground_truth(path) -> COCO:
    """The COCO ground truth in ``path`` (pycocotools' loading messages silenced)."""
    return ground_truth_from_dict(_read_json(path, "ground truth"), path)


def ground_truth_from_dict(dataset: Dict, path="the annotations") -> COCO:
    """A COCO ground truth from an instances dict (``path`` names it in errors)."""
    if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), list)
                                                for k in ("images", "annotations", "categories")):
        raise UserError(f"ground truth {path} is not a COCO instances file (needs images, annotations and "
                        "categories lists): give an instances_*.json")
    _check_ground_truth(dataset, path)
    ids = [annotation.get("id") for annotation in dataset["annotations"]]
    if any(not isinstance(i, int) or i <= 0 for i in ids) or len(set(ids)) != len(ids):
        # COCOeval records a match as the ground truth's id and treats id 0 as "no match"; the ids
        # serve nothing else here, so number them 1..N (data sets exported from 0 hit this).
        dataset["annotations"] = [{**a, "id": n} for n, a in enumerate(dataset["annotations"], start=1)]
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_results(path) -> List[Dict]:
    """The detections of a COCO results file (a list of {image_id, category_id, bbox, score})."""
    results = _read_json(path, "results")
    if not isinstance(results, list):
        raise UserError(f"results file {path} must hold a list of detections, not a {type(results).__name__}")
    _check_not_empty(results, path)
    for index, result in enumerate(results):
        if not isinstance(result, dict) or any(key not in result for key in RESULT_KEYS):
            raise UserError(f"detection {index} of {path} lacks one of {', '.join(RESULT_KEYS)}: write COCO "
                            "box results")
        where = f"detection {index} of {path}"
        for key in ("image_id", "category_id"):
            if not _is_whole(result[key]):
                raise UserError(f"{where} has {key} {_shown(result[key])}: ids are integers, as in the ground truth")
        box = result["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_finite(value) for value in box)
                and box[2] >= 0 and box[3] >= 0):
            raise UserError(f"{where} has bbox {_shown(box)}: a COCO box is [x, y, width, height] of finite "
                            "numbers, width and height >= 0")
        if not _is_finite(result["score"]):
            raise UserError(f"{where} has score {_shown(result['score'])}: a score is a finite number")
    return results


def _check_not_empty(results: List, path) -> None:
    """UserError for a results file that holds no detection (pycocotools' loadRes cannot read one)."""
    if not results:
        raise UserError(f"results file {path} holds no detections ([]): write the detector's results into it "
                        "(a model that found nothing has AP 0, no file to score)")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    """A number that is a finite float64 (not NaN, not infinite, not an integer beyond float range)."""
    return _is_number(value) and abs(value) <= sys.float_info.max


def _is_convertible(value) -> bool:
    """A number that converts to float64 (NaN and infinities included: pycocotools computes with them)."""
    return _is_number(value) and (isinstance(value, float) or abs(value) <= sys.float_info.max)


def _is_whole(value) -> bool:
    """An integer id, or a float holding one (42.0: pycocotools matches it to 42)."""
    return _is_number(value) and (isinstance(value, int) or value.is_integer())


def _shown(value) -> str:
    return json.dumps(value)[:100]


def _check_ground_truth(dataset: Dict, path) -> None:
    """UserError naming the first entry of an instances dict that pycocotools would fail on, or would
    quietly leave out of the evaluation (an annotation of an unknown image or category)."""
    known = {}
    for kind, one in (("images", "image"), ("categories", "category")):
        known[kind] = set()
        for index, entry in enumerate(dataset[kind]):
            if not isinstance(entry, dict) or not _is_integer_id(entry.get("id")):
                raise UserError(f"{one} {index} of {path} has no integer id ({_shown(entry)}): COCOeval "
                                f"indexes {kind} by id")
            if entry["id"] in known[kind]:
                raise UserError(f"{one} id {entry['id']} appears twice in {path}: give every {one} its own id")
            known[kind].add(entry["id"])
    for index, annotation in enumerate(dataset["annotations"]):
        missing = GT_KEYS if not isinstance(annotation, dict) else [key for key in GT_KEYS if key not in annotation]
        if missing:
            raise UserError(f"annotation {index} of {path} lacks {', '.join(missing)}: COCOeval needs "
                            f"{', '.join(GT_KEYS)} in every annotation")
        where = f"annotation {index} of {path}"
        for key, kind in (("image_id", "images"), ("category_id", "categories")):
            if not _is_integer_id(annotation[key]) or annotation[key] not in known[kind]:
                raise UserError(f"{where} has {key} {_shown(annotation[key])}, which is not in its {kind}: "
                                f"fix the annotation or add the missing entry")
        box = annotation["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_convertible(value) for value in box)):
            raise UserError(f"{where} has bbox {_shown(box)}: a COCO box is [x, y, width, height]")
        if not _is_convertible(annotation["area"]) or annotation["iscrowd"] not in (0, 1):
            raise UserError(f"{where} has area {_shown(annotation['area'])} and iscrowd "
                            f"{_shown(annotation['iscrowd'])}: the area is a number, iscrowd 0 or 1")


def _is_integer_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_segm_results(path) -> List[Dict]:
    """The detections of a COCO mask results file (a list of {image_id, category_id, segmentation, score},
    "segmentation" a compressed RLE; a "bbox" may be there and is not used)."""
    results = _read_json(path, "results")
    if not isinstance(results, list):
        raise UserError(f"results file {path} must hold a list of detections, not a {type(results).__name__}")
    _check_not_empty(results, path)
    check_segm_results(results, path)
    return results


def check_segm_results(results: Sequence[Dict], source="the results") -> None:
    """UserError naming ``source`` and the first detection that is not a dict with image_id, category_id,
    score and a compressed RLE "segmentation" (what pycocotools' loadRes reads for masks)."""
    for index, result in enumerate(results):
        if not isinstance(result, dict) or any(key not in result for key in SEGM_RESULT_KEYS):
            raise UserError(f"detection {index} of {source} lacks one of {', '.join(SEGM_RESULT_KEYS)}: segm "
                            "evaluation needs a mask per detection (write COCO segm results with an RLE "
                            "\"segmentation\"), or evaluate boxes with --iou-type bbox")
        rle = result["segmentation"]
        if not (isinstance(rle, dict) and isinstance(rle.get("counts"), (str, bytes))
                and isinstance(rle.get("size"), list) and len(rle["size"]) == 2):
            raise UserError(f"detection {index} of {source} has a \"segmentation\" that is not a compressed RLE "
                            "{\"size\": [h, w], \"counts\": str}: encode masks with pycocotools.mask.encode "
                            "(megdet.model.mask_head.encode_masks)")


def _read_json(path, what: str):
    try:
        data = Path(path).read_bytes()  # json.loads finds the encoding (UTF-8, -16 or -32), not the locale
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist: check the path") from None
    except OSError as error:
        raise UserError(f"cannot read {what} file {path} ({error.__class__.__name__}): check the file") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise UserError(f"{what} file {path} is not valid JSON ({error.msg} at line {error.lineno}): "
                        "check the file") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{what} file {path} is not UTF-8 text (byte {error.start}: {error.reason}): "
                        "check the file") from None
    except RecursionError:
        raise UserError(f"{what} file {path} nests lists or objects too deeply to be COCO JSON: "
                        "check the file") from None


def detections_to_array(output: Dict[str, torch.Tensor], category_ids: Sequence[int]) -> np.ndarray:
    """One image's detector output -> float64 [D, 6]: x, y, w, h (original pixels), score, COCO category id.

    output: {"boxes": [D, 4] xyxy original pixels, "scores": [D], "labels": [D] in 1..C}. category_ids:
    the data set's COCO ids in label order (label l is category_ids[l - 1]). float64 throughout: a
    float32 copy of a results file's boxes moves its AP in the third digit.
    """
    boxes = output["boxes"].detach().cpu().double().reshape(-1, 4).numpy()
    labels = output["labels"].detach().cpu().numpy().astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > len(category_ids)):
        raise ValueError(f"Invalid labels: {sorted(set(labels.tolist()))} (must be in 1..{len(category_ids)})")
    ids = np.asarray(category_ids, dtype=np.float64)[labels - 1]
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    scores = output["scores"].detach().cpu().double().reshape(-1, 1).numpy()
    return np.concatenate([xywh, scores, ids[:, None]], axis=1)


def arrays_to_results(per_image: Dict[int, np.ndarray], masks: Optional[Dict[int, List[Dict]]] = None) -> List[Dict]:
    """Per-image [D, 6] arrays -> COCO results list, images in ascending id order; with ``masks`` (each
    image's D RLEs) every detection also carries its "segmentation"."""
    results = []
    for image_id in sorted(per_image):
        for row, (x, y, w, h, score, category_id) in enumerate(per_image[image_id].tolist()):
            result = {"image_id": int(image_id), "category_id": int(category_id), "bbox": [x, y, w, h], "score": score}
            if masks is not None:
                result["segmentation"] = masks[image_id][row]
            results.append(result)
    return results


def share_detections(comm, local: Dict[int, Any], masks: Optional[Dict[int, List[Dict]]] = None
                     ) -> Tuple[Dict[int, Any], Optional[Dict[int, List[Dict]]]]:
    """Every rank's ``local`` {image id: its detections} and, for a model with masks, ``masks`` {image
    id: its RLEs}, merged on every rank in one allgather (collective): each rank scores some
    categories, whose detections come from every rank's images, and rank 0 writes them all. An image
    that several ranks evaluated (a sampler that pads the last round) counts once, from the lowest rank."""
    merged: Dict[int, Any] = {}
    merged_masks: Optional[Dict[int, List[Dict]]] = None if masks is None else {}
    for piece, piece_masks in comm.allgather_object((local, masks)):
        for image_id, detections in piece.items():
            if int(image_id) not in merged:
                merged[int(image_id)] = detections
                if merged_masks is not None:
                    merged_masks[int(image_id)] = piece_masks[image_id]
    return merged, merged_masks


def check_results(coco_gt: COCO, results: Sequence[Dict], iou_type: str = "bbox") -> None:
    """UserError naming the first problem of ``results`` (checked COCO results of ``iou_type``) against
    ``coco_gt``: image ids or category ids that the ground truth lacks, and for "segm" masks that do not
    fit (``check_segm_results``, ``_check_segm_inputs``)."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"Invalid iou_type: {iou_type!r} (use one of {', '.join(IOU_TYPES)})")
    if iou_type == "segm":
        check_segm_results(results)
    known = set(coco_gt.getImgIds())
    strangers = sorted({int(r["image_id"]) for r in results} - known)
    if strangers:
        raise UserError(f"the results have detections for {len(strangers)} image ids that the ground truth "
                        f"lacks (e.g. {strangers[:5]}): evaluate against the ground truth of the same images")
    categories = set(coco_gt.getCatIds())
    unknown = sorted({int(r["category_id"]) for r in results} - categories)
    if unknown:
        raise UserError(f"the results use category ids {unknown[:10]} that the ground truth lacks: map labels "
                        "to the ground truth's category ids")
    if iou_type == "segm":
        _check_segm_inputs(coco_gt, results)


def evaluate(coco_gt: COCO, results: List[Dict], image_ids: Optional[Sequence[int]] = None,
             iou_type: str = "bbox", comm=None) -> Tuple[Dict[str, float], str]:
    """(metrics in percent, the printed COCOeval summary) of ``results`` against ``coco_gt`` over
    ``image_ids`` (default: every ground-truth image). ``iou_type`` "bbox" matches boxes; "segm"
    matches the results' RLE masks with the ground truth's polygons and RLEs.

    comm: score the categories split over its ranks (``megdet.engine.coco_split``; collective, every
    rank passes the same ground truth and results and gets the metrics); default: this process alone.
    Bad results raise the same ``UserError`` on every rank, before any collective."""
    comm = LocalCommunicator() if comm is None else comm
    with comm.all_or_none():
        check_results(coco_gt, results, iou_type)
    evaluator = coco_split.score_on_ranks(comm, coco_gt, results, iou_type, image_ids)
    return comm.broadcast_object(summarized(evaluator) if comm.rank == 0 else (None, ""))


def summarized(evaluator) -> Tuple[Dict[str, float], str]:
    """(metrics in percent, the printed summary) of an accumulated ``COCOeval``."""
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluator.summarize()
    return {name: float(value) * 100.0 for name, value in zip(METRIC_NAMES, evaluator.stats)}, summary.getvalue()


def _check_segm_inputs(coco_gt: COCO, results: Sequence[Dict]) -> None:
    """UserError unless every ground-truth annotation has a segmentation and every detection's mask
    has its image's size (pycocotools fails on either without naming it)."""
    unmasked = next((a for a in coco_gt.dataset["annotations"] if not a.get("segmentation")), None)
    if unmasked is not None:
        raise UserError(f"ground-truth annotation {unmasked.get('id')} of image {unmasked['image_id']} has no "
                        "segmentation: segm evaluation needs instance masks in the ground truth; use --iou-type bbox")
    for index, result in enumerate(results):
        image = coco_gt.imgs[int(result["image_id"])]
        if list(result["segmentation"]["size"]) != [image["height"], image["width"]]:
            height, width = result["segmentation"]["size"]
            raise UserError(f"detection {index} has a {height}x{width} mask but image {result['image_id']} is "
                            f"{image['height']}x{image['width']} (h x w): paste masks at the original image size")


def write_evaluation(out_dir, results: List[Dict], metrics: Dict[str, float], extra: Optional[Dict] = None) -> None:
    """``out_dir/bbox_results.json`` (COCO box results), ``segm_results.json`` when the results carry
    masks, and ``out_dir/metrics.json``, each written atomically."""
    write_json_atomic(Path(out_dir) / RESULTS_FILE,
                      [{key: value for key, value in r.items() if key != "segmentation"} for r in results])
    if results and "segmentation" in results[0]:
        write_json_atomic(Path(out_dir) / SEGM_RESULTS_FILE, results)
    write_json_atomic(Path(out_dir) / EVAL_METRICS_FILE, {**metrics, **(extra or {})})


def evaluate_distributed(comm, coco_gt: COCO, local: Dict[int, np.ndarray], out_dir=None,
                         image_ids: Optional[Sequence[int]] = None,
                         masks: Optional[Dict[int, List[Dict]]] = None) -> Tuple[Dict[str, float], str]:
    """Share the ranks' per-image detections (and, for a model with masks, their RLEs) with every rank,
    score them with the categories split over the ranks (box AP, and mask AP as ``mask_AP``...;
    ``evaluate``), write the results and metrics files to ``out_dir`` on rank 0 (when given), and
    return (metrics, printed summary) on every rank. Collective; every rank holds ``coco_gt``. Bad
    results raise the same ``UserError`` on every rank.

    One allgather (``share_detections``, boxes and masks together) rather than a gather to rank 0 and
    a second exchange by category: rank 0 needs every detection anyway (it writes them), each other rank needs those of
    its categories, which every rank's images hold, and the deal of the categories needs every
    rank's counts. A ring allgather brings (N - 1)/N of the detections into each rank, about what the
    gather brought into rank 0, in about the same time; the cost is memory, the whole set on every
    rank (boxes of 5000 images x 100 detections: 24 MB as arrays)."""
    merged, merged_masks = share_detections(comm, local, masks)
    results = arrays_to_results(merged, merged_masks)
    metrics, table = evaluate(coco_gt, results, image_ids, comm=comm)
    if merged_masks is not None:
        segm, segm_table = evaluate(coco_gt, results, image_ids, iou_type="segm", comm=comm)
        metrics.update({MASK_PREFIX + name: value for name, value in segm.items()})
        table = f"bbox:\n{table}segm:\n{segm_table}"
    if out_dir is not None and comm.rank == 0:
        write_evaluation(out_dir, results, metrics, {"num_images": len(merged), "num_detections": len(results)})
    return metrics, table


def evaluate_files(gt_path, results_path, out_dir=None, iou_type: str = "bbox") -> int:
    """``megdet eval --gt --results [--iou-type segm]``, alone or on the ranks a launcher started: every
    rank reads both files and scores its share of the categories (``evaluate``); rank 0 prints the COCO
    table and writes the metrics when ``out_dir`` is set (only once the evaluation succeeded). A bad
    file is the same one-line error on every rank."""
    from hpc import comm as comm_mod

    comm = comm_mod.init()
    with comm.all_or_none():
        if iou_type not in IOU_TYPES:
            raise UserError(f"--iou-type {iou_type!r} is not one of {', '.join(IOU_TYPES)}: choose one of them")
        coco_gt = load_ground_truth(gt_path)
        results = load_segm_results(results_path) if iou_type == "segm" else load_results(results_path)
    metrics, table = evaluate(coco_gt, results, iou_type=iou_type, comm=comm)
    if comm.rank == 0:
        ranks = f" on {comm.size} ranks" if comm.size > 1 else ""
        print(f"{iou_type}: {len(results)} detections on {len(coco_gt.getImgIds())} images of {gt_path}{ranks}")
        print(table, end="")
        if out_dir is not None:
            path = write_json_atomic(Path(out_dir) / EVAL_METRICS_FILE,
                                     {**metrics, "num_images": len(coco_gt.getImgIds()), "num_detections": len(results)})
            print(f"metrics: {path}")
    return 0


class _EvaluationBatches(torch.utils.data.Dataset):
    """Batch ``i`` of this rank's share of ``dataset``, decoded and transformed (in a loader worker)."""

    def __init__(self, dataset, transform, indices: List[int], images_per_rank: int):
        self.dataset, self.transform = dataset, transform
        self.batches = [indices[start:start + images_per_rank] for start in range(0, len(indices), images_per_rank)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int):
        return collate([self.transform(self.dataset[i]) for i in self.batches[index]])


def infer_on_shards(model, dataset, transform, comm, images_per_rank: int, *, device: torch.device,
                    num_workers: int = 0, autocast=contextlib.nullcontext
                    ) -> Tuple[Dict[int, np.ndarray], Optional[Dict[int, List[Dict]]]]:
    """This rank's detections (``detections_to_array`` rows per image id) on its share of ``dataset``:
    images rank, rank + size, ... in batches of ``images_per_rank``, decoded by ``num_workers`` loader
    processes, inferred on ``device`` (``model`` is there) under ``autocast()``; and, when the model
    predicts masks, each image's RLEs (pasted and thresholded on the device, encoded on the host),
    else None. Puts ``model`` in eval mode."""
    model.eval()
    category_ids = [int(c["id"]) for c in dataset.categories]
    batches = _EvaluationBatches(dataset, transform, list(range(comm.rank, len(dataset), comm.size)), images_per_rank)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    local: Dict[int, np.ndarray] = {}
    masks: Dict[int, List[Dict]] = {}
    with torch.no_grad():
        for images, _, sizes, image_ids in loader:
            images = [image.to(device, non_blocking=True) for image in images]
            with autocast():
                outputs = model(images, original_sizes=sizes)
            for image_id, output in zip(image_ids, outputs):
                local[image_id] = detections_to_array(output, category_ids)
                if "masks" in output:
                    masks[image_id] = encode_masks(output["masks"])
    return local, (masks if model.roi_heads.mask_on else None)


def evaluate_on_shards(model, dataset, config, comm, runtime, *, workers: int = 0,
                       out_dir=None) -> Tuple[Dict[str, float], str]:
    """Box AP of ``model`` (on ``runtime.device``) on the shard set ``dataset`` with the ground truth
    packed in it, every rank inferring its share under ``runtime``'s autocast with ``workers`` loader
    processes (collective); (metrics in percent, printed table) on every rank. Open Images shards are
    scored by the Open Images mAP@0.5 (``megdet.engine.open_images_eval``), COCO's by pycocotools."""
    transform = build_transform(config, categories=dataset.categories, train=False)
    local, masks = infer_on_shards(model, dataset, transform, comm, config.eval.images_per_rank,
                                   device=runtime.device, num_workers=workers, autocast=runtime.autocast)
    if dataset.kind == "open-images":
        return open_images_eval.evaluate_distributed(comm, dataset, share_detections(comm, local)[0],
                                                     out_dir=out_dir)
    coco_gt = ground_truth_from_dict(export_coco(dataset), dataset.shard_dir)
    return evaluate_distributed(comm, coco_gt, local, out_dir=out_dir, masks=masks)


def evaluate_checkpoint(config, checkpoint_path: str, out_dir=None) -> int:
    """``megdet eval CONFIG --checkpoint CKPT``: distributed box AP (Open Images shards: the Open Images
    mAP@0.5) of a trained model on data.val, each rank on its own GPU (``train.device``) under ``train.amp``'s autocast; a checkpoint written on
    any device loads (onto the CPU first, then the model's device)."""
    from hpc.shards import ShardDataset
    from megdet.engine.banner import run_banner
    from megdet.engine.build import build_model, build_runtime, init_rank, loader_workers, run_dir
    from megdet.engine.model_checkpoint import read_for

    runtime = build_runtime(config)
    comm = init_rank(runtime.device)
    state, dataset = None, None
    with comm.all_or_none():
        if not config.data.val:
            raise UserError(f"{config.name} has no data.val: pass data.val=SHARDS_DIR")
        dataset = ShardDataset(config.data.val, with_segmentation=config.model.with_masks)
        config.fill_from_shards(num_classes=len(dataset.categories))
        _, state = read_for(config, checkpoint_path, ("model",), advice="evaluate it with the config that trained it")
    model = build_model(config, inference=True).to(runtime.device)
    model.load_state_dict(state["model"])
    workers = loader_workers(config, comm)
    banner = run_banner(config, comm, runtime, workers=workers, command="eval")
    if comm.rank == 0:
        print(banner, flush=True)
    out = Path(out_dir) if out_dir else run_dir(config) / "eval"
    metrics, table = evaluate_on_shards(model, dataset, config, comm, runtime, workers=workers,
                                        out_dir=out if comm.rank == 0 else None)
    if comm.rank == 0:
        kinds = "bbox and segm" if model.roi_heads.mask_on else "bbox"
        print(f"{kinds}: {len(dataset)} images of {config.data.val} on {comm.size} ranks, {checkpoint_path}")
        print(table, end="")
        print(f"metrics: {out / EVAL_METRICS_FILE}")
    return 0
