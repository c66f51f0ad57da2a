"""``megdet pack``: pack one COCO split into HDF5 shards, alone or on K ranks; export it back. Open
Images (``--boxes --labels --classes --hierarchy``) packs in one streaming pass: ``megdet.pack_open_images``.

    megdet pack --coco-json annotations/instances_val2017.json --images val2017 --out shards/val2017
    mpirun -np 8 megdet pack --coco-json annotations/instances_train2017.json --images train2017 \\
        --out shards/train2017 --shards 64 --format raw --max-size 1333
    megdet pack --out shards/val2017 --export-json val2017_from_shards.json

Under ``mpirun`` each rank packs shards rank, rank + K, ... (mpi4py) and rank 0 writes the manifest;
the shards are the same, byte for byte, whatever K is. Running the same command again resumes:
shards that a previous run completed and that still match their checksum and plan are kept.
The manifest is removed when packing starts and written when every shard is done.
"""
from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

from hpc.errors import UserError
from hpc.files import os_error_reason, write_json_atomic
from hpc.shards import ShardDataset
from hpc.shards import manifest as manifest_mod
from hpc.shards import writer
from megdet import pack_open_images
from megdet.data.coco import export_coco, load_coco
from megdet.pack_world import gathered_or_raise, log_line, on_rank0_first, packing_world, prepare_out_dir

DEFAULT_SHARD_SIZE = "1GiB"
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def add_arguments(parser) -> None:
    parser.add_argument("--coco-json", help="COCO annotation file of the split to pack")
    parser.add_argument("--images", help="folder holding the split's image files")
    parser.add_argument("--out", required=True, help="shard folder (created; re-running resumes)")
    sizing = parser.add_mutually_exclusive_group()
    sizing.add_argument("--shard-size", help=f"largest shard, e.g. 512MiB or 1GiB (default: {DEFAULT_SHARD_SIZE})")
    sizing.add_argument("--shards", type=int,
                        help="number of shards of equal image counts (e.g. a multiple of the training ranks)")
    parser.add_argument("--format", choices=writer.FORMATS, default="jpeg",
                        help="jpeg: the encoded files as they are; raw: decoded RGB pixels (default: %(default)s)")
    parser.add_argument("--max-size", type=int,
                        help=f"raw only: longer image side in pixels (default: {writer.DEFAULT_RAW_MAX_SIZE})")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out images that cannot be decoded or do not match their size (counted "
                             "in the manifest) instead of stopping")
    parser.add_argument("--export-json", help="write the annotation file back from the shards in --out")
    pack_open_images.add_arguments(parser.add_argument_group(
        "Open Images", "pack the official CSV files and image folder (give --boxes, --labels, --classes, "
        "--hierarchy and --images instead of --coco-json)"))


def parse_size(text: str) -> int:
    """``"1GiB"`` -> 1073741824; decimal (KB, MB, GB) and binary (KiB, MiB, GiB) units."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if match is None or match.group(2) not in SIZE_UNITS:
        raise UserError(f"Invalid --shard-size: {text!r}; use a size such as 512MiB or 1GiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def run(args) -> int:
    open_images = pack_open_images.given(args)
    if args.coco_json is not None and open_images:
        raise UserError(f"Invalid arguments: --coco-json packs COCO, {' '.join(open_images)} Open Images: give one "
                        "of the two")
    if args.coco_json is None and not open_images and args.export_json is None and args.export_csv is None:
        raise UserError("Invalid arguments: give --coco-json and --images to pack COCO, --boxes --labels --classes "
                        "--hierarchy --images to pack Open Images, and/or --export-json (COCO) or --export-csv "
                        "(Open Images) to export")
    world = packing_world()
    if args.coco_json is not None:
        pack(args, world)
    elif open_images:
        pack_open_images.pack(args, world)
    if args.export_json is not None and world.rank == 0:
        export(Path(args.out), Path(args.export_json))
    if args.export_csv is not None and world.rank == 0:
        pack_open_images.export(Path(args.out), Path(args.export_csv))
    return 0


def pack(args, world) -> None:
    """Pack on every rank of ``world``; every rank raises the same ``UserError`` if any rank fails.
    Rank 0 holds the output folder's lock (``writer.pack_lock``) from before any rank writes until
    the manifest is written: a second job on the same folder stops at once, on every one of its ranks."""
    with contextlib.ExitStack() as held:
        _pack(args, world, held)


def _pack(args, world, held: contextlib.ExitStack) -> None:
    if args.images is None:
        raise UserError("Invalid arguments: --coco-json needs --images (the folder of the image files)")
    fmt = args.format
    max_size = writer.DEFAULT_RAW_MAX_SIZE if fmt == "raw" and args.max_size is None else args.max_size
    writer.check_options(fmt=fmt, max_size=max_size)
    shard_bytes = None if args.shards is not None else parse_size(args.shard_size or DEFAULT_SHARD_SIZE)
    source = load_coco(args.coco_json, args.images)  # every rank: same file, same errors, no collective yet
    out_dir = Path(args.out)
    started = time.perf_counter()

    def plan():  # one stat per image file
        prepare_out_dir(out_dir, held)
        sizes = writer.expected_bytes(source.entries, fmt=fmt, max_size=max_size)
        return sizes, writer.plan_shards(sizes, shard_bytes=shard_bytes, num_shards=args.shards)

    sizes, shard_ranges = on_rank0_first(world, plan)
    rank_summaries = gathered_or_raise(world, lambda: writer.pack_rank_shards(
        source.entries, sizes, shard_ranges, out_dir=out_dir, rank=world.rank, size=world.size, fmt=fmt,
        max_size=max_size, skip_bad=args.skip_bad, source_sha256=source.sha256,
        log=lambda message: log_line(world, message)))

    if world.rank == 0:
        shards = sorted((s for summaries in rank_summaries for s in summaries), key=lambda s: s.file)
        options = {"format": fmt, "max_size": max_size, "skip_bad": args.skip_bad,
                   "shard_bytes": shard_bytes, "num_shards": len(shard_ranges)}
        try:
            manifest = manifest_mod.write_manifest(out_dir, shards=shards, options=options,
                                                   dataset=source.dataset_metadata())
        except OSError as error:
            raise UserError(f"Invalid --out: writing {manifest_mod.MANIFEST_NAME} in {out_dir} failed "
                            f"({os_error_reason(error, out_dir)}); free space there, then run the same command "
                            f"again (every shard is done and will be kept)") from None
        seconds = time.perf_counter() - started
        log_line(world, f"{manifest['num_images']} images in {len(shards)} shards ({manifest['num_skipped']} skipped; "
                    f"boxes {source.box_fixes}) in {seconds:.1f} s, {len(source.entries) / seconds:.1f} images/s "
                    f"-> {out_dir / manifest_mod.MANIFEST_NAME}")


def export(shard_dir: Path, export_path: Path) -> None:
    """Write the annotation file packed in ``shard_dir`` to ``export_path``."""
    dataset = ShardDataset(str(shard_dir))
    if dataset.kind != "coco":
        raise UserError(f"Invalid --export-json: {shard_dir} holds {dataset.kind} shards; export them with "
                        "--export-csv DIR")
    coco = export_coco(dataset)
    dataset.close()
    try:
        export_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(export_path, coco)
    except OSError as error:
        raise UserError(f"Invalid --export-json: {export_path} cannot be written "
                        f"({os_error_reason(error, export_path.parent)}); choose a writable place") from None
    print(f"megdet pack: {len(coco['images'])} images, {len(coco['annotations'])} annotations -> {export_path}",
          flush=True)
