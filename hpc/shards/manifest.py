"""The shard set's manifest (``manifest.json``) and per-shard completion records, written atomically.

A shard set is a folder::

    manifest.json                 written last, by rank 0: the set is complete when it exists
    shard-00000-of-00004.h5       one HDF5 file per shard (layout: ``hpc.shards.writer``)
    shard-00000-of-00004.h5.json  the shard's completion record: checksum, byte size, plan key

The manifest lists every shard with its image count, byte size and SHA-256, the data set's
metadata (categories, source annotation hash, skipped images, box fixes) and the packing options.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from hpc.errors import UserError
from hpc.files import file_sha256, write_json_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ShardError(UserError):
    """A shard set is missing, incomplete or corrupt; the message names the file and the fix."""


@dataclass(frozen=True)
class ShardSummary:
    """One finished shard, as its completion record and the manifest list it.

    file: name inside the shard folder. num_images / num_annotations: records it holds.
    bytes: file size. sha256: of the whole file. plan_key: hash of what the shard was asked to hold
    (source, options, image ids), so a resumed run keeps it only for the same plan.
    skipped: ``{"image_id", "file_name", "reason"}`` for each source image left out (``--skip-bad``).
    """

    file: str
    num_images: int
    num_annotations: int
    bytes: int
    sha256: str
    plan_key: str
    skipped: List[Dict[str, Any]]


def shard_name(index: int, num_shards: Optional[int]) -> str:
    """``shard-00003-of-00064.h5``; ``shard-00003.h5`` where the count is not known while packing (a set
    streamed in one pass: the manifest lists its shards)."""
    return f"shard-{index:05d}.h5" if num_shards is None else f"shard-{index:05d}-of-{num_shards:05d}.h5"


def completion_path(shard_path: Path) -> Path:
    return shard_path.with_name(shard_path.name + ".json")


def write_completion(shard_path: Path, summary: ShardSummary) -> None:
    write_json_atomic(completion_path(shard_path), asdict(summary))


def read_verified_completion(shard_path: Path, plan_key: str) -> Optional[ShardSummary]:
    """The completion record of ``shard_path`` if the shard is complete, for ``plan_key``, and its
    size and SHA-256 match the record; None otherwise (the shard must be packed again)."""
    record_path = completion_path(shard_path)
    if not shard_path.exists() or not record_path.exists():
        return None
    try:
        summary = ShardSummary(**json.loads(record_path.read_text()))
    except (ValueError, TypeError):
        return None
    if (summary.plan_key != plan_key or shard_path.stat().st_size != summary.bytes
            or file_sha256(shard_path) != summary.sha256):
        return None
    return summary


def write_manifest(out_dir: Path, *, shards: List[ShardSummary], options: Dict[str, Any],
                   dataset: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``manifest.json``: the shard list, the packing ``options`` and ``dataset`` metadata."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "options": options,
        "num_images": sum(s.num_images for s in shards),
        "num_annotations": sum(s.num_annotations for s in shards),
        "num_skipped": sum(len(s.skipped) for s in shards),
        "skipped": [item for s in shards for item in s.skipped],
        "shards": [{"file": s.file, "num_images": s.num_images, "num_annotations": s.num_annotations,
                    "bytes": s.bytes, "sha256": s.sha256} for s in shards],
        "dataset": dataset,
    }
    write_json_atomic(Path(out_dir) / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(shard_dir: Path) -> Dict[str, Any]:
    """The manifest of the shard set in ``shard_dir``; ``ShardError`` when absent or unreadable."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.exists():
        raise ShardError(f"Invalid shard folder: {path} does not exist (packing did not finish); "
                         f"run 'megdet pack ... --out {shard_dir}' again to resume")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise ShardError(f"Invalid manifest {path}: {error}; run 'megdet pack' again") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"Invalid manifest {path}: format_version {manifest.get('format_version')!r}, "
                         f"this reader reads {FORMAT_VERSION}; pack the data set again")
    return manifest
