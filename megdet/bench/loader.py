"""``megdet bench loader``: images/s into a DataLoader from loose files, jpeg shards, raw shards, and the
JPEG decode limit, side by side on the same images; plus packing speed.

    megdet bench loader --coco-json ../shared/realdata/roboflow_chess_v23/valid/_annotations.coco.json \\
        --images ../shared/realdata/roboflow_chess_v23/valid --workers 0 1 2

Sources, each yielding the image as a uint8 [H, W, 3] tensor with its boxes:
  loose        the COCO json and one Pillow decode per image file (as torchvision's CocoDetection)
  jpeg_shards  ``hpc.shards.ShardDataset`` on ``megdet pack --format jpeg`` shards
  raw_shards   the same on ``--format raw`` shards (decoded at pack time, longer side <= --max-size)
  decode_limit the JPEG bytes already in memory, decoded as the shard reader does: the ceiling for jpeg
  train_sample jpeg shards through the training transform (resize to --train-size, random flip) into the
               uint8 tensor a training worker sends: what one loader worker costs per training image,
               which sizes the CPUs per GPU of the job scripts
Every (source, workers) pair runs one untimed pass (page cache, lazy opening), then ``--passes`` timed
passes, each starting its workers afresh; the figures are medians over ``--repeats`` such measurements,
taken round-robin over the sources. Two figures per row:
  images_per_s      wall clock, worker start included: what a loader delivers on this machine now
  cpu_ms_per_image  CPU time of this process and its workers (getrusage) per image: the cost, which
                    other processes' load on a shared machine does not change
The ratios (vs_decode_limit, vs_loose) divide CPU costs: throughput per core, other things equal.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.utils.data
from PIL import Image

from hpc.shards import ShardDataset, decode_image
from megdet.bench import report

SOURCES = ("loose", "jpeg_shards", "raw_shards", "decode_limit", "train_sample")


class LooseFiles(torch.utils.data.Dataset):
    """One image file per item, read through the annotation file: uint8 [H, W, 3] and boxes [K, 4]."""

    def __init__(self, coco_json: str, images_dir: str):
        coco = json.loads(Path(coco_json).read_text())
        self.images = coco["images"]
        self.images_dir = Path(images_dir)
        self.boxes: Dict[int, list] = {image["id"]: [] for image in self.images}
        for annotation in coco["annotations"]:
            self.boxes[annotation["image_id"]].append(annotation["bbox"])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        pixels = np.array(Image.open(self.images_dir / image["file_name"]).convert("RGB"))
        return torch.from_numpy(pixels), np.array(self.boxes[image["id"]], np.float32).reshape(-1, 4)


class InMemoryJpeg(torch.utils.data.Dataset):
    """The encoded files already in memory; decoding is all that is left: the jpeg shards' ceiling."""

    def __init__(self, shards: ShardDataset):
        self.records = [shards.raw_record(i) for i in range(len(shards))]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        return torch.from_numpy(decode_image(record["image_bytes"], record["orientation"])), record["boxes"]


class TrainingSamples(torch.utils.data.Dataset):
    """A shard record through the training transform (COCO's shorter-side sizes, flips): the uint8
    image tensor and boxes a training loader worker produces."""

    def __init__(self, shards: ShardDataset, min_size: int, max_size: int):
        from megdet.data.transforms import DetectionTransform

        self.shards = shards
        self.transform = DetectionTransform(min_sizes=(min_size,), max_size=max_size, flip_prob=0.5,
                                            category_ids=[int(c["id"]) for c in shards.categories])

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int):
        sample = self.transform(self.shards[index], np.random.default_rng(index))
        return sample.image, sample.target["boxes"]


class AsTensors(torch.utils.data.Dataset):
    """A shard record as (image tensor, boxes), the shape the other sources return."""

    def __init__(self, shards: ShardDataset):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int):
        record = self.shards[index]
        return torch.from_numpy(record["image"]), record["boxes"]


def add_arguments(parser) -> None:
    parser.add_argument("--coco-json", required=True, help="COCO annotation file of the images to read")
    parser.add_argument("--images", required=True, help="folder of the image files")
    parser.add_argument("--limit", type=int, help="use the first N images only (default: all)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--passes", type=int, default=2, help="timed passes over the images per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per (source, workers); median reported")
    parser.add_argument("--max-size", type=int, default=1333, help="longer side of the raw shards (pixels)")
    parser.add_argument("--train-size", type=int, nargs=2, default=[800, 1333], metavar=("MIN", "MAX"),
                        help="shorter side and cap of the training transform of train_sample (default: 800 1333)")


def _subset(coco_json: str, limit: int, out: Path) -> Path:
    coco = json.loads(Path(coco_json).read_text())
    coco["images"] = coco["images"][:limit]
    kept = {image["id"] for image in coco["images"]}
    coco["annotations"] = [a for a in coco.get("annotations", []) if a["image_id"] in kept]
    path = out / "subset.json"
    path.write_text(json.dumps(coco))
    return path


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and by its children that have exited."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _pack_seconds(coco_json: Path, images: str, out: Path, fmt: str, max_size: int) -> Tuple[float, float]:
    """Pack serially into ``out``; (wall seconds, CPU seconds)."""
    from megdet import pack, pack_world

    parser = argparse.ArgumentParser()
    pack.add_arguments(parser)
    argv = ["--coco-json", str(coco_json), "--images", images, "--out", str(out), "--format", fmt]
    args = parser.parse_args(argv + (["--max-size", str(max_size)] if fmt == "raw" else []))
    started, cpu = time.perf_counter(), _cpu_seconds()
    pack.pack(args, pack_world.OneProcess())
    return time.perf_counter() - started, _cpu_seconds() - cpu


def _measure(dataset: torch.utils.data.Dataset, workers: int, passes: int) -> Tuple[float, float]:
    """(images/s, CPU ms per image) over ``passes`` passes; workers are joined after each pass, so
    their CPU time is counted."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         multiprocessing_context="fork" if workers else None)
    for _ in loader:  # untimed: page cache, lazy shard opening
        pass
    started, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(passes):
        for _ in loader:
            pass
    images = passes * len(dataset)
    return images / (time.perf_counter() - started), 1000 * (_cpu_seconds() - cpu) / images


def run(args) -> int:
    with tempfile.TemporaryDirectory(prefix="megdet-bench-loader-") as work:
        work_dir = Path(work)
        coco_json = Path(args.coco_json) if args.limit is None else _subset(args.coco_json, args.limit, work_dir)
        seconds = {fmt: _pack_seconds(coco_json, args.images, work_dir / fmt, fmt, args.max_size)
                   for fmt in ("jpeg", "raw")}
        jpeg_shards, raw_shards = ShardDataset(str(work_dir / "jpeg")), ShardDataset(str(work_dir / "raw"))
        count = len(jpeg_shards)
        rows: List[Dict] = [{"source": f"pack --format {fmt}", "workers": 0, "images_per_s": count / wall,
                             "cpu_ms_per_image": 1000 * cpu / count} for fmt, (wall, cpu) in seconds.items()]
        datasets = {"loose": LooseFiles(str(coco_json), args.images), "jpeg_shards": AsTensors(jpeg_shards),
                    "raw_shards": AsTensors(raw_shards), "decode_limit": InMemoryJpeg(jpeg_shards),
                    "train_sample": TrainingSamples(jpeg_shards, *args.train_size)}
        for workers in args.workers:
            samples: Dict[str, List[Tuple[float, float]]] = {name: [] for name in SOURCES}
            for _ in range(args.repeats):
                for name in SOURCES:
                    samples[name].append(_measure(datasets[name], workers, args.passes))
            speed = {name: statistics.median(s for s, _ in values) for name, values in samples.items()}
            cost = {name: statistics.median(c for _, c in values) for name, values in samples.items()}
            for name in SOURCES:
                rows.append({"source": name, "workers": workers, "images_per_s": speed[name],
                             "cpu_ms_per_image": cost[name], "vs_decode_limit": cost["decode_limit"] / cost[name],
                             "vs_loose": cost["loose"] / cost[name]})
        inputs = {"coco_json": str(args.coco_json), "images": str(args.images), "num_images": len(jpeg_shards),
                  "passes": args.passes, "repeats": args.repeats, "raw_max_size": args.max_size,
                  "train_size": args.train_size,
                  "jpeg_shard_bytes": sum(s["bytes"] for s in jpeg_shards.manifest["shards"]),
                  "raw_shard_bytes": sum(s["bytes"] for s in raw_shards.manifest["shards"])}
        jpeg_shards.close()
        raw_shards.close()
    columns = ["source", "workers", "images_per_s", "cpu_ms_per_image", "vs_decode_limit", "vs_loose"]
    table = report.write(args.out, "loader", rows, columns, inputs)
    print(table, flush=True)
    return 0
