"""``megdet bench pack-open-images``: peak memory and images/s of packing Open Images, at two sizes side by
side, to show that memory does not grow with the CSV files.

    megdet bench pack-open-images --boxes 500000,2000000 --out runs/bench/pack-open-images

For each size, writes a synthetic set (``megdet.data.open_images_synth``: about 7.3 boxes per image, 5 %
group-of, 2 negative labels per image, every image a small JPEG: a link to one of a few) and runs
``megdet pack`` on it as one child process, timed. The child reports its own peak resident memory,
``VmHWM`` of ``/proc/self/status`` (Linux), as it exits: the kernel's ``ru_maxrss`` of a child also
counts the parent's pages at the fork, which here hold the set just generated. A first row runs
``megdet pack --help`` (the packer's imports): the floor that any run starts from. ``rss_vs_smallest``
divides each peak by the smallest set's: 1.0 means memory did not grow with the rows.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from hpc.errors import UserError
from megdet.bench import report
from megdet.data.open_images_synth import write_synthetic_open_images
from megdet.pack_open_images import DEFAULT_IMAGES_PER_SHARD

NAME = "pack_open_images"
COLUMNS = ("run", "boxes", "images", "csv_MiB", "wall_s", "images_per_s", "peak_rss_MiB", "rss_vs_smallest")
BOXES_PER_IMAGE = 7.3
MIB = 2 ** 20
# Runs ``megdet ARGS`` (argv: REPORT_FILE ARGS...) and writes its peak resident memory (KiB) to REPORT_FILE.
PEAK_REPORTING_MEGDET = """
import runpy, sys
report = sys.argv.pop(1)
try:
    runpy.run_module("megdet.cli", run_name="__main__", alter_sys=True)
finally:
    peak = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    open(report, "w").write(peak)
"""


def add_arguments(parser) -> None:
    parser.add_argument("--boxes", default="500000,2000000",
                        help="box rows of each synthetic set, comma-separated (default: %(default)s)")
    parser.add_argument("--images-per-shard", type=int, default=DEFAULT_IMAGES_PER_SHARD,
                        help="as megdet pack's (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic sets (default: %(default)s)")
    parser.add_argument("--data", help="folder to write the sets and shards into and keep (default: a temporary one)")


def run(args) -> int:
    try:
        sizes = [int(text) for text in args.boxes.split(",") if text]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UserError(f"Invalid --boxes: {args.boxes!r}; give box counts such as 500000,2000000")
    rows: List[Dict] = [dict(run="imports only (pack --help)", **_megdet(["pack", "--help"]))]
    with tempfile.TemporaryDirectory(prefix="oi-pack-bench-") as scratch:
        root = Path(args.data) if args.data else Path(scratch)
        for boxes in sorted(sizes):
            images = max(1, round(boxes / BOXES_PER_IMAGE))
            folder = root / f"set-{boxes}"
            paths = write_synthetic_open_images(folder, images, detections_per_image=0,
                                                boxes_per_image=BOXES_PER_IMAGE, seed=args.seed, with_images=True)
            measured = _megdet(["pack", "--boxes", str(paths["boxes"]), "--labels", str(paths["labels"]),
                                "--classes", str(paths["classes"]), "--hierarchy", str(paths["hierarchy"]),
                                "--images", str(paths["images"]), "--out", str(folder / "shards"),
                                "--images-per-shard", str(args.images_per_shard)])
            box_rows = sum(1 for _ in open(paths["boxes"])) - 1
            rows.append(dict(run=f"pack {box_rows:,} boxes", boxes=box_rows, images=images,
                             csv_MiB=(paths["boxes"].stat().st_size + paths["labels"].stat().st_size) / MIB,
                             images_per_s=images / measured["wall_s"], **measured))
    smallest = rows[1]["peak_rss_MiB"]
    for row in rows[1:]:
        row["rss_vs_smallest"] = row["peak_rss_MiB"] / smallest
    inputs = {"boxes": sizes, "images_per_shard": args.images_per_shard, "seed": args.seed,
              "boxes_per_image": BOXES_PER_IMAGE}
    table = report.write(args.out, NAME, rows, COLUMNS, inputs, report.machine(cuda=False))
    print(table)
    print(f"results in {args.out}")
    return 0


def _megdet(args: List[str]) -> Dict:
    """Run ``megdet ARGS`` in a child process; its wall seconds and peak resident memory (MiB).
    UserError when it fails."""
    with tempfile.TemporaryDirectory(prefix="peak-") as scratch, tempfile.TemporaryFile("w+") as errors:
        report = Path(scratch) / "peak_kib"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PEAK_REPORTING_MEGDET, str(report), *args],
                              stdout=subprocess.DEVNULL, stderr=errors)
        wall = time.perf_counter() - started
        if done.returncode or not report.exists():
            errors.seek(0)
            raise UserError(f"megdet {' '.join(args[:3])} ... failed ({done.returncode}): {errors.read().strip()[-500:]}")
        return {"wall_s": wall, "peak_rss_MiB": int(report.read_text()) * 1024 / MIB}
