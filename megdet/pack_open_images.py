"""``megdet pack`` of Open Images: the official CSV files and image folder straight into HDF5 shards, in
one streaming pass, alone or on K ranks; ``--export-csv`` writes the CSV files back from the shards.

    megdet pack --boxes train-annotations-bbox.csv --labels train-annotations-human-imagelabels-boxable.csv \\
        --classes class-descriptions-boxable.csv --hierarchy bbox_labels_600_hierarchy.json \\
        --images train --out shards/oi_train
    mpirun -np 16 megdet pack ... --out shards/oi_train --images-per-shard 3000
    megdet pack ... --subset challenge-2019-classes-description-500.csv \\
        --hierarchy challenge-2019-label500-hierarchy.json          # the challenge's 500 classes
    megdet pack --out shards/oi_val --export-csv oi_val_csv          # boxes.csv, labels.csv, classes, hierarchy

Every rank reads both CSV files once, from the start, a chunk of rows at a time
(``megdet.data.open_images.stream_image_rows``: memory does not grow with the files), and numbers the
images as they come in ImageID order: image i goes to shard i // ``--images-per-shard``, and shard s is
packed by rank s % K. The shard count is known only at the end, so shards are named
``shard-00000.h5`` ...; the manifest, written by rank 0 once every rank is done, lists them. The
shards are the same, byte for byte, whatever K is.

Resume, locking, checksums, one line on every rank for any rank's error, and never a partial shard:
as for COCO (``megdet.pack``, docs/shards.md). A shard is kept on a rerun when its plan key matches:
the options, the classes, and its images' ImageIDs, file sizes and CSV rows with their line numbers.
A bad row names its file and line, an image without a readable file its ImageID; with ``--skip-bad``
they are left out and listed in the manifest (``skipped``, ``counts``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from pathlib import Path
from typing import List, Sequence

from hpc.errors import UserError
from hpc.files import file_sha256, os_error_reason
from hpc.shards import ShardDataset
from hpc.shards import manifest as manifest_mod
from hpc.shards import writer
from megdet.data.open_images import (BOX_COLUMNS, IMAGE_LABEL_COLUMNS, ClassHierarchy, ImageRows, csv_header,
                                     read_classes, read_hierarchy, stream_image_rows)
from megdet.data.open_images_shards import categories, export_open_images, image_entry, image_path
from megdet.pack_world import gathered_or_raise, log_line, on_rank0_first, prepare_out_dir

# About 1 GB of JPEG per shard at Open Images' ~300 KB per image (1.74M training images in ~513 GB).
DEFAULT_IMAGES_PER_SHARD = 3000
# option -> what it is
INPUTS = {"boxes": "the boxes CSV (ImageID, LabelName, XMin, XMax, YMin, YMax, IsGroupOf; IsOccluded, "
                   "IsTruncated, IsDepiction, IsInside when present)",
          "labels": "the verified image-level labels CSV (ImageID, LabelName, Confidence 1 or 0)",
          "classes": "the class descriptions CSV, LabelName,DisplayName without header",
          "hierarchy": "the class hierarchy JSON"}
STREAMED_SHARD = re.compile(r"shard-(\d{5})\.h5(\.json)?")


def add_arguments(group) -> None:
    for name, what in INPUTS.items():
        group.add_argument(f"--{name}", help=what)
    group.add_argument("--subset", help="class descriptions of the classes to keep (the challenge's 500): rows of "
                                        "other classes of --classes are left out and counted; --hierarchy is then "
                                        "the subset's")
    group.add_argument("--images-per-shard", type=int,
                       help=f"images per shard (default {DEFAULT_IMAGES_PER_SHARD}, about 1 GB of Open Images JPEGs)")
    group.add_argument("--export-csv", metavar="DIR", help="write the Open Images files back from the shards in "
                                                           "--out into DIR (boxes.csv, labels.csv, classes.csv, "
                                                           "hierarchy.json)")


def given(args) -> List[str]:
    """The Open Images packing options on the command line, as flags."""
    names = (*INPUTS, "subset", "images_per_shard")
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]


def pack(args, world) -> None:
    """Pack on every rank of ``world`` (``megdet.pack_world.packing_world``); every rank raises the same
    ``UserError`` if any rank fails. Rank 0 holds the output folder's lock until the manifest is written."""
    with contextlib.ExitStack() as held:
        _pack(args, world, held)


def _pack(args, world, held: contextlib.ExitStack) -> None:
    missing = [f"--{name} ({what})" for name, what in {**INPUTS, "images": "the image folder"}.items()
               if getattr(args, name) is None]
    if missing:
        raise UserError(f"Invalid arguments: packing Open Images needs {'; '.join(missing)}: give them")
    if args.shards is not None or args.shard_size is not None:
        raise UserError("Invalid arguments: Open Images is packed in one pass over its CSV files, so its shards are "
                        "cut by image count: use --images-per-shard N (default "
                        f"{DEFAULT_IMAGES_PER_SHARD}) instead of --shards and --shard-size")
    per_shard = DEFAULT_IMAGES_PER_SHARD if args.images_per_shard is None else args.images_per_shard
    if per_shard < 1:
        raise UserError(f"Invalid --images-per-shard: {per_shard}; use a positive count such as "
                        f"{DEFAULT_IMAGES_PER_SHARD}")
    fmt = args.format
    max_size = writer.DEFAULT_RAW_MAX_SIZE if fmt == "raw" and args.max_size is None else args.max_size
    writer.check_options(fmt=fmt, max_size=max_size)
    # every rank: the same small files, the same errors, no collective yet
    hierarchy = read_hierarchy(args.hierarchy, args.subset or args.classes)
    known = read_classes(args.classes)[0] if args.subset else ()
    headers = {"boxes": csv_header(args.boxes, "boxes", BOX_COLUMNS),
               "labels": csv_header(args.labels, "image labels", IMAGE_LABEL_COLUMNS)}
    out_dir, images_dir = Path(args.out), Path(args.images)
    started = time.perf_counter()
    on_rank0_first(world, lambda: prepare_out_dir(out_dir, held))

    digests = {"boxes": hashlib.sha256(), "labels": hashlib.sha256()} if world.rank == 0 else None
    plan = ShardPlan(out_dir=out_dir, images_dir=images_dir, per_shard=per_shard, fmt=fmt, max_size=max_size,
                     skip_bad=args.skip_bad, classes_key=_classes_key(hierarchy, known))
    stream = stream_image_rows(args.boxes, args.labels, hierarchy, known_classes=known, skip_bad=args.skip_bad,
                               digests=digests)
    results = gathered_or_raise(world, lambda: plan.pack_rank(stream, world))
    _, images_seen, outside = results[0]  # every rank read the same files
    if images_seen == 0:
        raise UserError(f"Invalid input: boxes file {args.boxes} and image labels file {args.labels} name no image; "
                        "give the files of a split")
    if world.rank != 0:
        return
    summaries = sorted((s for rank_summaries, _, _ in results for s in rank_summaries), key=lambda s: s.file)
    _remove_stale_shards(out_dir, len(summaries))
    skipped = [item for s in summaries for item in s.skipped]
    dataset = {
        "kind": "open-images", "categories": categories(hierarchy), "parents": [list(p) for p in hierarchy.parents],
        "hierarchy_json": json.loads(Path(args.hierarchy).read_bytes()),
        "files": {"boxes": {"name": Path(args.boxes).name, "sha256": digests["boxes"].hexdigest(),
                            "header": headers["boxes"]},
                  "labels": {"name": Path(args.labels).name, "sha256": digests["labels"].hexdigest(),
                             "header": headers["labels"]},
                  **{name: {"name": Path(path).name, "sha256": file_sha256(path)}
                     for name, path in (("classes", args.classes), ("hierarchy", args.hierarchy),
                                        ("subset", args.subset)) if path is not None}},
        "counts": {"images_in_files": images_seen, "outside_subset": outside,
                   "skipped_rows": sum("line" in item for item in skipped),
                   "skipped_images": sum("line" not in item for item in skipped)},
    }
    options = {"format": fmt, "max_size": max_size, "skip_bad": args.skip_bad, "images_per_shard": per_shard,
               "num_shards": len(summaries)}
    try:
        manifest = manifest_mod.write_manifest(out_dir, shards=summaries, options=options, dataset=dataset)
    except OSError as error:
        raise UserError(f"Invalid --out: writing {manifest_mod.MANIFEST_NAME} in {out_dir} failed "
                        f"({os_error_reason(error, out_dir)}); free space there, then run the same command "
                        f"again (every shard is done and will be kept)") from None
    seconds = time.perf_counter() - started
    counts = dataset["counts"]
    log_line(world, f"{manifest['num_images']} images, {manifest['num_annotations']} boxes in {len(summaries)} shards "
                    f"({counts['skipped_images']} images and {counts['skipped_rows']} rows skipped, "
                    f"{outside} rows outside the class subset) in {seconds:.1f} s, {images_seen / seconds:.1f} "
                    f"images/s -> {out_dir / manifest_mod.MANIFEST_NAME}")


class ShardPlan:
    """Which shard each image goes to, and how one rank packs its own: image ordinal i (its position in
    the files) to shard i // ``per_shard``, shard s to rank s % K."""

    def __init__(self, *, out_dir: Path, images_dir: Path, per_shard: int, fmt: str, max_size, skip_bad: bool,
                 classes_key: str):
        self.out_dir, self.images_dir, self.per_shard = out_dir, images_dir, per_shard
        self.fmt, self.max_size, self.skip_bad, self.classes_key = fmt, max_size, skip_bad, classes_key

    def pack_rank(self, stream, world):
        """Read the whole ``stream`` of ``ImageRows``; pack this rank's shards as they fill. Returns (their
        summaries, the images in the files, the rows left out of the class subset)."""
        summaries: List[manifest_mod.ShardSummary] = []
        own: List[ImageRows] = []
        images, outside = 0, 0
        for rows in stream:
            shard = images // self.per_shard
            images += 1
            outside += rows.outside_subset
            if shard % world.size != world.rank:
                continue
            own.append(rows)
            if images % self.per_shard == 0:
                summaries.append(self.pack_shard(shard, own, world))
                own = []
        if own:
            summaries.append(self.pack_shard((images - 1) // self.per_shard, own, world))
        return summaries, images, outside

    def pack_shard(self, index: int, images: Sequence[ImageRows], world) -> manifest_mod.ShardSummary:
        """Shard ``index``, holding ``images`` (ordinals from index * per_shard): kept when a previous
        run completed it for the same plan, else packed (image headers read only now)."""
        shard_path = self.out_dir / manifest_mod.shard_name(index, None)
        first = index * self.per_shard
        file_sizes = [_file_size(image_path(self.images_dir, rows.image_id)) for rows in images]
        key = self.key(index, images, file_sizes)

        def pack() -> manifest_mod.ShardSummary:
            entries, skipped = [], []
            for ordinal, rows in enumerate(images, start=first):
                skipped.extend(rows.skipped)
                try:
                    entries.append(image_entry(rows, ordinal, self.images_dir))
                except writer.BadImageError as error:
                    if not self.skip_bad:
                        raise
                    skipped.append({"image_id": rows.image_id,
                                    "file_name": str(image_path(self.images_dir, rows.image_id)),
                                    "reason": str(error)})
            sizes = writer.expected_bytes(entries, fmt=self.fmt, max_size=self.max_size)
            return writer.pack_shard(entries, sizes, shard_path=shard_path, index=index, num_shards=0, fmt=self.fmt,
                                     max_size=self.max_size, skip_bad=self.skip_bad, key=key, verify="header",
                                     skipped=skipped, image_labels=True)

        return writer.keep_or_pack(shard_path, key, pack=pack, log=lambda message: log_line(world, message))

    def key(self, index: int, images: Sequence[ImageRows], file_sizes: Sequence[int]) -> str:
        """Hash of everything that decides shard ``index``'s content."""
        digest = hashlib.sha256(json.dumps({
            "format_version": manifest_mod.FORMAT_VERSION, "kind": "open-images", "format": self.fmt,
            "max_size": self.max_size, "skip_bad": self.skip_bad, "index": index, "images_per_shard": self.per_shard,
            "classes": self.classes_key}, sort_keys=True).encode())
        for rows, size in zip(images, file_sizes):
            digest.update(json.dumps([rows.image_id, size, rows.box_lines.tolist(), rows.box_rows,
                                      rows.label_lines.tolist(), rows.label_rows, rows.skipped]).encode())
        return digest.hexdigest()


def _classes_key(hierarchy: ClassHierarchy, known: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([hierarchy.names, hierarchy.display_names, hierarchy.parents,
                                      list(known)]).encode()).hexdigest()


def _file_size(path: Path) -> int:
    """Bytes of the file at ``path``; -1 when it cannot be looked up (``image_entry`` says why)."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _remove_stale_shards(out_dir: Path, num_shards: int) -> None:
    """Remove shards numbered ``num_shards`` or more that an earlier run with more images left."""
    for path in out_dir.iterdir():
        match = STREAMED_SHARD.fullmatch(path.name)
        if match and int(match.group(1)) >= num_shards:
            path.unlink()


def export(shard_dir: Path, out_dir: Path) -> None:
    """Write the Open Images files packed in ``shard_dir`` into the folder ``out_dir``."""
    dataset = ShardDataset(str(shard_dir))
    paths = export_open_images(dataset, out_dir)
    dataset.close()
    print(f"megdet pack: {len(dataset)} images, {dataset.manifest['num_annotations']} boxes -> "
          f"{', '.join(str(path) for path in paths.values())}", flush=True)

