"""Pack images and their annotations into HDF5 shards: one large file per few thousand images.

Layout of one shard (N images, M annotations; one HDF5 file, no compression anywhere)::

    attrs        format_version, format ("jpeg" | "raw"), max_size (0: none), shard_index,
                 num_shards, num_images, plan_key
    images/data          uint8 [total bytes]  contiguous: every image's bytes back to back (an image
                                      left out by skip_bad leaves its expected bytes unused)
    images/offset        int64 [N]    where image i starts in images/data
    images/length        int64 [N]    its byte count (one read of data[offset:offset+length])
    images/crc32         uint32 [N]   of those bytes, checked on every read
    images/image_id      int64 [N]    as in the annotation file
    images/file_name     str [N]
    images/height, width int32 [N]    as in the annotation file (the image as displayed)
    images/stored_height, stored_width int32 [N]  of the stored pixels (raw may be downscaled)
    images/orientation   uint8 [N]    EXIF orientation the reader applies (1: none; raw: always 1)
    images/annotation_start int64 [N+1]  annotations of image i: rows start[i]:start[i+1]
    annotations/box      float32 [M, 4]  COCO xywh in original image pixels, clipped to the image
    annotations/category_id int64 [M], iscrowd bool [M], area float32 [M], id int64 [M]
    annotations/segmentation str [M]  JSON (polygons or RLE), as in the source
    source/record        str [N]      JSON {"image": {...}, "annotations": [...], "annotation_positions":
                                      [...]}: the annotation file's entries as they were, and their
                                      positions in it, for exporting it back (Open Images: the rows of
                                      its CSV files, ``megdet.data.open_images_pack``)

With image-level labels (Open Images; L labels), also::

    annotations/flags    int8 [M, 5]  IsOccluded, IsTruncated, IsGroupOf, IsDepiction, IsInside (-1: unknown)
    images/label_start   int64 [N+1]  image-level labels of image i: rows start[i]:start[i+1]
    labels/category_id   int64 [L]    a category verified on the image...
    labels/present       bool [L]     ...as present (True) or absent (False)

``format="jpeg"`` stores each file's encoded bytes as they are (JPEG, PNG...); ``"raw"`` stores the
decoded RGB pixels, EXIF orientation applied, downscaled so the longer side is at most ``max_size``.
The image bytes are one contiguous dataset so that reading a record is one read of its bytes: no
chunk index, no chunk cache, nothing to decompress.

``verify="decode"`` decodes every byte of every image (a truncated file is a ``BadImageError``);
``verify="header"`` reads only the header (size and EXIF orientation), for sets too large to decode
at packing time (the stored bytes are still CRC-checked on every read).

A shard is written under a temporary name, fsync'ed, renamed, and only then given its completion
record (``hpc.shards.manifest``): a crash leaves no file under a shard's name that is not complete.
One packing job at a time writes a folder: ``pack_lock`` (held by rank 0 for the whole job).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import h5py
import numpy as np
from PIL import Image

from hpc.errors import UserError, write_line
from hpc.files import LockBusy, exclusive_lock, file_sha256, os_error_reason
from hpc.shards import manifest as manifest_mod
from hpc.shards.reader import FORMATS, ORIENTATION_TAG, SIDE_SWAPPING_ORIENTATIONS, apply_orientation

DEFAULT_RAW_MAX_SIZE = 1333
JPEG_VERIFY_SCALE = 8  # verify JPEGs by decoding every byte at 1/8 scale (libjpeg DCT scaling)
VERIFY_MODES = ("decode", "header")  # what encode_image reads of a jpeg-format image (raw always decodes)
FLAG_COUNT = 5  # annotations/flags columns
RGB_CHANNELS = 3
LOCK_NAME = ".megdet-pack.lock"  # in the shard folder while a packing job writes it


class BadImageError(UserError):
    """A source image cannot be decoded or does not match its annotation entry."""


@dataclass(frozen=True)
class ImageEntry:
    """One source image and its annotations, ready to pack.

    image_id, file_name, height, width: as in the annotation file (height and width of the image as
    displayed, i.e. after EXIF orientation). path: the image file.
    boxes: float32 [K, 4] COCO xywh in original pixels; category_ids: int64 [K]; iscrowd: bool [K];
    areas: float32 [K]; annotation_ids: int64 [K]; segmentations: K JSON strings.
    source: JSON text ``{"image": {...}, "annotations": [...], "annotation_positions": [...]}``: the
    entries exactly as in the annotation file, and the annotations' positions in its list.
    With image-level labels (Open Images), all three or none: flags: int8 [K, 5] (see the module
    docstring); label_category_ids: int64 [L]; label_present: bool [L].
    """

    image_id: int
    file_name: str
    path: Path
    height: int
    width: int
    boxes: np.ndarray
    category_ids: np.ndarray
    iscrowd: np.ndarray
    areas: np.ndarray
    annotation_ids: np.ndarray
    segmentations: Tuple[str, ...]
    source: str
    flags: Optional[np.ndarray] = None
    label_category_ids: Optional[np.ndarray] = None
    label_present: Optional[np.ndarray] = None


def check_options(*, fmt: str, max_size: Optional[int]) -> None:
    if fmt not in FORMATS:
        raise UserError(f"Invalid format: {fmt!r}; use one of {', '.join(FORMATS)}")
    if max_size is not None and (fmt != "raw" or max_size < 1):
        raise UserError(f"Invalid max size: {max_size}; it is a positive pixel count and applies "
                        f"to --format raw only (jpeg keeps the files as they are)")


def stored_size(height: int, width: int, *, fmt: str, max_size: Optional[int]) -> Tuple[int, int]:
    """(height, width) of the stored pixels: unchanged for jpeg, longer side <= max_size for raw."""
    if fmt == "jpeg" or max_size is None or max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def expected_bytes(entries: Sequence[ImageEntry], *, fmt: str, max_size: Optional[int]) -> List[int]:
    """Bytes each image will take in a shard; ``UserError`` naming the first missing file."""
    sizes = []
    for entry in entries:
        try:
            file_bytes = entry.path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"Invalid image file: {entry.path} (image id {entry.image_id}) does not "
                            f"exist; check --images or the file_name in the annotation file") from None
        except OSError as error:  # a name too long, a file used as a folder, no permission
            raise UserError(f"Invalid image file: {entry.path} (image id {entry.image_id}) cannot be looked up "
                            f"({os_error_reason(error, entry.path.parent)}); check --images or the file_name "
                            f"in the annotation file") from None
        if fmt == "jpeg":
            sizes.append(file_bytes)
        else:
            height, width = stored_size(entry.height, entry.width, fmt=fmt, max_size=max_size)
            sizes.append(height * width * RGB_CHANNELS)
    return sizes


def plan_shards(sizes: Sequence[int], *, shard_bytes: Optional[int] = None,
                num_shards: Optional[int] = None) -> List[range]:
    """Split images 0..N-1, in order, into contiguous shards: ``num_shards`` of equal image counts,
    or as few as possible of at most ``shard_bytes`` each (an image larger than that gets its own)."""
    if (shard_bytes is None) == (num_shards is None):
        raise ValueError("Invalid shard plan: give exactly one of shard_bytes and num_shards")
    count = len(sizes)
    if num_shards is not None:
        if not 1 <= num_shards <= max(count, 1):
            raise UserError(f"Invalid --shards: {num_shards}; use 1 to {count} for {count} images")
        bounds = np.linspace(0, count, num_shards + 1).round().astype(int)
        return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    if shard_bytes < 1:
        raise UserError(f"Invalid --shard-size: {shard_bytes} bytes; use a positive size such as 1GiB")
    shards, start, filled = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and filled + size > shard_bytes:
            shards.append(range(start, index))
            start, filled = index, 0
        filled += size
    shards.append(range(start, count))
    return shards


def plan_key(entries: Sequence[ImageEntry], *, index: int, num_shards: int, fmt: str,
             max_size: Optional[int], skip_bad: bool, source_sha256: str) -> str:
    """Hash of everything that decides a shard's content."""
    plan = {"format_version": manifest_mod.FORMAT_VERSION, "source_sha256": source_sha256, "format": fmt,
            "max_size": max_size, "skip_bad": skip_bad, "index": index, "num_shards": num_shards,
            "image_ids": [entry.image_id for entry in entries]}
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def encode_image(entry: ImageEntry, data: bytes, *, fmt: str, max_size: Optional[int],
                 verify: str = "decode") -> Tuple[bytes, int, int, int]:
    """Check one source file and return (stored bytes, stored height, stored width, orientation).

    Decodes every byte (``verify="decode"``: a truncated or corrupt file raises ``BadImageError``
    naming the image; ``"header"``: a jpeg-format image's header only) and checks the size after EXIF
    orientation against the annotation entry.
    """
    where = f"image id {entry.image_id} ({entry.path})"
    try:
        image = Image.open(io.BytesIO(data))
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
        file_width, file_height = image.size
        if fmt == "jpeg":
            image.draft("RGB", (file_width // JPEG_VERIFY_SCALE, file_height // JPEG_VERIFY_SCALE))
        if fmt == "raw" or verify == "decode":
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImageError(f"Invalid image: {where} cannot be decoded ({error}); replace the file, or "
                            f"pass --skip-bad to leave it out (counted in the manifest)") from None
    swapped = orientation in SIDE_SWAPPING_ORIENTATIONS
    shown_width, shown_height = (file_height, file_width) if swapped else (file_width, file_height)
    if (shown_height, shown_width) != (entry.height, entry.width):
        turned = f" after EXIF orientation {orientation}" if swapped else ""
        raise BadImageError(f"Invalid image size: {where} is {shown_width}x{shown_height}{turned} but the "
                            f"annotation file says {entry.width}x{entry.height} (width x height); fix the "
                            f"annotation file, or pass --skip-bad to leave the image out")
    if fmt == "jpeg":
        return data, file_height, file_width, orientation
    height, width = stored_size(entry.height, entry.width, fmt=fmt, max_size=max_size)
    image = apply_orientation(image, orientation).convert("RGB")
    if (height, width) != (entry.height, entry.width):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return image.tobytes(), height, width, 1


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def partial_path(shard_path: Path) -> Path:
    """Where a shard is written before it is complete."""
    return shard_path.with_name(f".{shard_path.name}.partial")


def pack_shard(entries: Sequence[ImageEntry], sizes: Sequence[int], *, shard_path: Path, index: int,
               num_shards: int, fmt: str, max_size: Optional[int], skip_bad: bool,
               key: str, verify: str = "decode", skipped: Sequence[Dict[str, Any]] = (),
               image_labels: bool = False) -> manifest_mod.ShardSummary:
    """Write one shard holding ``entries`` (``sizes``: their expected bytes) and its completion record.
    A failure (a bad image, a full disk) removes what it wrote; a killed process leaves only the
    partial file, which the next run overwrites. ``num_shards`` 0: not known when the shard is written
    (streamed packing: the manifest counts them). ``skipped``: what the caller left out of this shard
    before (rows, missing files), listed first among its skipped entries. ``image_labels``: the shard
    has the flags and image-level labels of the module docstring (Open Images), even with no image."""
    partial = partial_path(shard_path)
    try:
        summary = _write_partial(entries, sizes, partial=partial, shard_name=shard_path.name, index=index,
                                 num_shards=num_shards, fmt=fmt, max_size=max_size, skip_bad=skip_bad, key=key,
                                 verify=verify, skipped=list(skipped), image_labels=image_labels)
        os.replace(partial, shard_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    try:
        manifest_mod.write_completion(shard_path, summary)
    except BaseException:
        shard_path.unlink(missing_ok=True)  # without its record it would be packed again: free its space now
        raise
    return summary


def _write_partial(entries: Sequence[ImageEntry], sizes: Sequence[int], *, partial: Path, shard_name: str,
                   index: int, num_shards: int, fmt: str, max_size: Optional[int], skip_bad: bool,
                   key: str, verify: str, skipped: List[Dict[str, Any]],
                   image_labels: bool) -> manifest_mod.ShardSummary:
    """Write the shard file ``partial`` (fsync'ed) and return its summary."""
    images: Dict[str, list] = {name: [] for name in (
        "offset", "length", "crc32", "image_id", "file_name", "height", "width", "stored_height",
        "stored_width", "orientation", "source")}
    kept: List[ImageEntry] = []
    with h5py.File(partial, "w") as shard:
        data = shard.create_dataset("images/data", shape=(sum(sizes),), dtype=np.uint8)
        offset = 0
        for entry, size in zip(entries, sizes):
            try:
                source_bytes = entry.path.read_bytes()
            except OSError as error:
                raise UserError(f"Invalid image file: {entry.path} (image id {entry.image_id}) cannot be read "
                                f"({os_error_reason(error, entry.path.parent)}); check the file_name in the "
                                f"annotation file and the file's permissions") from None
            try:
                stored, height, width, orientation = encode_image(entry, source_bytes, fmt=fmt, max_size=max_size,
                                                                  verify=verify)
            except BadImageError as error:
                if not skip_bad:
                    raise
                skipped.append({"image_id": entry.image_id, "file_name": entry.file_name, "reason": str(error)})
                offset += size  # its space stays unused: the data set is allocated once, contiguous
                continue
            if len(stored) != size:
                raise UserError(f"Invalid image file: {entry.path} changed while packing "
                                f"({size} bytes expected, {len(stored)} read); pack again")
            data[offset:offset + size] = np.frombuffer(stored, dtype=np.uint8)
            for name, value in (("offset", offset), ("length", size), ("crc32", zlib.crc32(stored)),
                                ("image_id", entry.image_id), ("file_name", entry.file_name),
                                ("height", entry.height), ("width", entry.width), ("stored_height", height),
                                ("stored_width", width), ("orientation", orientation), ("source", entry.source)):
                images[name].append(value)
            kept.append(entry)
            offset += size
        _write_index(shard, images, kept, with_image_labels=image_labels)
        shard.attrs.update({"format_version": manifest_mod.FORMAT_VERSION, "format": fmt,
                            "max_size": max_size or 0, "shard_index": index, "num_shards": num_shards,
                            "num_images": len(kept), "plan_key": key})
    _fsync(partial)
    return manifest_mod.ShardSummary(
        file=shard_name, num_images=len(kept), num_annotations=sum(len(e.category_ids) for e in kept),
        bytes=partial.stat().st_size, sha256=file_sha256(partial), plan_key=key, skipped=skipped)


def _write_index(shard: h5py.File, images: Dict[str, list], kept: Sequence[ImageEntry], *,
                 with_image_labels: bool) -> None:
    """The per-image and per-annotation arrays of the layout in the module docstring."""
    text = h5py.string_dtype()
    dtypes = {"offset": np.int64, "length": np.int64, "crc32": np.uint32, "image_id": np.int64,
              "file_name": text, "height": np.int32, "width": np.int32, "stored_height": np.int32,
              "stored_width": np.int32, "orientation": np.uint8}
    for name, dtype in dtypes.items():
        values = np.array(images[name], dtype=object if dtype is text else dtype)
        shard.create_dataset(f"images/{name}", data=values, dtype=dtype)
    shard.create_dataset("source/record", data=np.array(images["source"], dtype=object), dtype=text)
    counts = [len(entry.category_ids) for entry in kept]
    shard.create_dataset("images/annotation_start", data=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))

    def joined(field: str, dtype, tail: Tuple[int, ...] = ()) -> np.ndarray:
        parts = [np.asarray(getattr(entry, field), dtype=dtype).reshape(-1, *tail) for entry in kept]
        return np.concatenate(parts) if parts else np.zeros((0, *tail), dtype=dtype)

    shard.create_dataset("annotations/box", data=joined("boxes", np.float32, (4,)))
    shard.create_dataset("annotations/category_id", data=joined("category_ids", np.int64))
    shard.create_dataset("annotations/iscrowd", data=joined("iscrowd", bool))
    shard.create_dataset("annotations/area", data=joined("areas", np.float32))
    shard.create_dataset("annotations/id", data=joined("annotation_ids", np.int64))
    segmentations = [text_ for entry in kept for text_ in entry.segmentations]
    shard.create_dataset("annotations/segmentation", data=np.array(segmentations, dtype=object), dtype=text)
    if with_image_labels:
        shard.create_dataset("annotations/flags", data=joined("flags", np.int8, (FLAG_COUNT,)))
        label_counts = [len(entry.label_category_ids) for entry in kept]
        shard.create_dataset("images/label_start",
                             data=np.concatenate([[0], np.cumsum(label_counts)]).astype(np.int64))
        shard.create_dataset("labels/category_id", data=joined("label_category_ids", np.int64))
        shard.create_dataset("labels/present", data=joined("label_present", bool))


def pack_rank_shards(entries: Sequence[ImageEntry], sizes: Sequence[int], plan: Sequence[range], *,
                     out_dir: Path, rank: int, size: int, fmt: str, max_size: Optional[int], skip_bad: bool,
                     source_sha256: str, log=print) -> List[manifest_mod.ShardSummary]:
    """Pack the shards of ``plan`` that belong to ``rank`` (index % size == rank), keeping those a
    previous run completed for the same plan. Returns their summaries, in shard order."""
    out_dir = Path(out_dir)
    summaries = []
    for index in range(rank, len(plan), size):
        part = [entries[i] for i in plan[index]]
        shard_path = out_dir / manifest_mod.shard_name(index, len(plan))
        key = plan_key(part, index=index, num_shards=len(plan), fmt=fmt, max_size=max_size,
                       skip_bad=skip_bad, source_sha256=source_sha256)
        summaries.append(keep_or_pack(shard_path, key, log=log, pack=lambda: pack_shard(
            part, [sizes[i] for i in plan[index]], shard_path=shard_path, index=index, num_shards=len(plan),
            fmt=fmt, max_size=max_size, skip_bad=skip_bad, key=key)))
    return summaries


def keep_or_pack(shard_path: Path, key: str, *, pack: Callable[[], manifest_mod.ShardSummary],
                 log=print) -> manifest_mod.ShardSummary:
    """The summary of the shard at ``shard_path``: kept when a previous run completed it for plan
    ``key`` and it still matches its checksum, else written by ``pack()`` (``pack_shard``)."""
    summary = manifest_mod.read_verified_completion(shard_path, key)
    if summary is not None:
        partial_path(shard_path).unlink(missing_ok=True)  # left by a crash in a run with another plan
        log(f"kept {shard_path.name}: complete and verified ({summary.num_images} images)")
        return summary
    out_dir = shard_path.parent
    try:
        summary = pack()
    except OSError as error:  # image files are read inside with their own message: this is the shard
        raise UserError(f"Invalid --out: writing {shard_path.name} in {out_dir} failed "
                        f"({os_error_reason(error, out_dir)}); free space there or choose another --out, "
                        f"then run the same command again (finished shards are kept)") from None
    log(f"packed {shard_path.name}: {summary.num_images} images, {summary.bytes / 2**20:.1f} MiB")
    return summary


def _warn(line: str) -> None:
    write_line(f"warning: {line}")


@contextlib.contextmanager
def pack_lock(out_dir: Path, warn=_warn) -> Iterator[None]:
    """Hold the packing lock of the shard folder ``out_dir`` for the block: ``UserError`` naming the
    holder at once if another packing job holds it. One process per job takes it (``megdet pack``:
    rank 0, before any rank writes, until the manifest is written); the kernel releases it if that
    process dies. A file system without locks gets a warning and no lock."""
    owner = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    try:
        with exclusive_lock(Path(out_dir) / LOCK_NAME, owner) as locked:
            if not locked:
                warn(f"{out_dir} does not support file locks: nothing stops another megdet pack from "
                     f"writing into it at the same time")
            yield
    except LockBusy as busy:
        holder = busy.owner or "it has just started"
        raise UserError(f"Invalid --out: {out_dir} is being packed by another megdet pack ({holder}); wait for "
                        f"it to finish, or choose another --out") from None
