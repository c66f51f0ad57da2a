"""Read a packed shard set as a ``torch.utils.data.Dataset``.

    dataset = ShardDataset("shards/train2017")
    record = dataset[0]   # {"image": uint8 [H, W, 3] RGB, "image_id", "file_name", "height", "width",
                          #  "boxes": float32 [K, 4] xywh, "category_ids": int64 [K], "iscrowd": bool [K],
                          #  "areas": float32 [K]} (+ "segmentation" with with_segmentation=True)
                          # Open Images shards (dataset.kind "open-images") add "flags": int8 [K, 5] and
                          # "positive_labels", "negative_labels": int64 verified category ids

Opening checks the manifest against the files: a missing shard, a shard of the wrong size (truncated
or replaced) or, with ``verify_checksums=True``, a SHA-256 mismatch raises ``ShardError`` naming the
file. Every record's bytes are checked against their CRC-32 when read, so a corrupt record fails the
epoch loudly (``CorruptRecordError`` naming the shard, the record and the image id) instead of
shortening it; with ``skip_corrupt=True`` such a record reads as None (with a warning on stderr)
and the consumer counts it.

The small per-image and per-annotation arrays are read once, at construction, into memory (they are
shared copy-on-write with DataLoader workers). Image bytes are read through an h5py handle that each
process opens on first use: an HDF5 handle does not survive ``fork``, so a handle inherited from the
parent is never used.
"""
from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import h5py
import numpy as np
import torch.utils.data
from PIL import Image

from hpc.errors import write_line
from hpc.files import os_error_reason
from hpc.files import file_sha256
from hpc.shards.manifest import FORMAT_VERSION, ShardError, read_manifest

FORMATS = ("jpeg", "raw")
ORIENTATION_TAG = 0x0112  # EXIF "Orientation"
# EXIF orientation -> the transpose that shows the image upright (as PIL.ImageOps.exif_transpose)
TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SIDE_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
LANDSCAPE, PORTRAIT = 0, 1


class CorruptRecordError(ShardError):
    """A record's stored bytes differ from their CRC-32, or its image does not decode; the message names
    the shard, record and image id, ``reason`` says what is wrong in a few words."""

    def __init__(self, message: str, *, reason: str = "it is corrupt"):  # one argument: it survives pickling
        super().__init__(message)
        self.reason = reason


def apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    """``image`` turned upright for EXIF ``orientation`` (1 or an unknown value: unchanged)."""
    method = TRANSPOSE_FOR_ORIENTATION.get(int(orientation))
    return image if method is None else image.transpose(method)


def decode_image(encoded: bytes, orientation: int = 1) -> np.ndarray:
    """Decode JPEG/PNG/... bytes to a writable uint8 [H, W, 3] RGB array, upright."""
    image = apply_orientation(Image.open(io.BytesIO(encoded)), orientation)
    # np.array, not np.asarray: Pillow's buffer is read-only, and torch.from_numpy warns on it
    return np.array(image if image.mode == "RGB" else image.convert("RGB"))


class ShardDataset(torch.utils.data.Dataset):
    """Images and annotations from the shard set in ``shard_dir`` (written by ``megdet pack``).

    Index order is shard order, then the annotation file's image order. Attributes (no decoding):
    categories: [{"id", "name"}] sorted by id (training labels 1..C in this order, 0 = background).
    image_ids: int64 [N]. image_sizes: int32 [N, 2] original (height, width).
    aspect_groups: int8 [N], LANDSCAPE (width >= height) or PORTRAIT. shard_of: int32 [N] shard index.
    skip_corrupt: ``dataset[i]`` of a record that fails its CRC-32 is None instead of raising
    ``CorruptRecordError``; ``corrupt_skipped`` counts them in this process (DataLoader workers each
    keep their own count: count the None records in the batches instead).
    """

    def __init__(self, shard_dir: str, *, with_segmentation: bool = False, verify_checksums: bool = False,
                 skip_corrupt: bool = False):
        self.shard_dir = Path(shard_dir)
        self.manifest = read_manifest(self.shard_dir)
        self.with_segmentation = with_segmentation
        self.skip_corrupt = skip_corrupt
        self.corrupt_skipped = 0
        self.format = self.manifest["options"]["format"]
        self.kind = self.manifest["dataset"].get("kind", "coco")
        self.has_image_labels = self.kind == "open-images"
        self.categories = [{"id": c["id"], "name": c["name"]}
                           for c in sorted(self.manifest["dataset"]["categories"], key=lambda c: c["id"])]
        self.shard_paths = [self.shard_dir / shard["file"] for shard in self.manifest["shards"]]
        per_shard = [self._load_index(path, shard, verify_checksums)
                     for path, shard in zip(self.shard_paths, self.manifest["shards"])]

        def joined(name: str) -> np.ndarray:
            return np.concatenate([index[name] for index in per_shard])

        self.image_ids = joined("image_id")
        self.file_names = joined("file_name")
        self.image_sizes = np.stack([joined("height"), joined("width")], axis=1).astype(np.int32)
        self.stored_sizes = np.stack([joined("stored_height"), joined("stored_width")], axis=1).astype(np.int32)
        landscape = self.image_sizes[:, 1] >= self.image_sizes[:, 0]
        self.aspect_groups = np.where(landscape, LANDSCAPE, PORTRAIT).astype(np.int8)
        self.shard_of = np.concatenate([np.full(len(index["image_id"]), s, dtype=np.int32)
                                        for s, index in enumerate(per_shard)])
        self.local_index = np.concatenate([np.arange(len(index["image_id"])) for index in per_shard])
        self._offset, self._length = joined("offset"), joined("length")
        self._crc32, self._orientation = joined("crc32"), joined("orientation")
        # annotation rows of image i: annotation_start[i]:annotation_start[i + 1] in the joined arrays
        counts = np.concatenate([np.diff(index["annotation_start"]) for index in per_shard])
        self._annotation_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        first_image = np.concatenate([[0], np.cumsum([len(index["image_id"]) for index in per_shard])])
        self._local_annotation_row = self._annotation_start[:-1] - self._annotation_start[first_image[self.shard_of]]
        self._boxes, self._category_ids = joined("box"), joined("category_id")
        self._iscrowd, self._areas, self._annotation_ids = joined("iscrowd"), joined("area"), joined("id")
        if self.has_image_labels:
            self._flags = joined("flags")
            label_counts = np.concatenate([np.diff(index["label_start"]) for index in per_shard])
            self._label_start = np.concatenate([[0], np.cumsum(label_counts)]).astype(np.int64)
            self._label_category_ids, self._label_present = joined("label_category_id"), joined("label_present")
        self._pid: Optional[int] = None
        self._handles: Dict[int, h5py.File] = {}
        self._image_data: Dict[int, h5py.Dataset] = {}  # images/data of each open shard (a lookup costs)

    def _load_index(self, path: Path, shard: Dict[str, Any], verify_checksums: bool) -> Dict[str, np.ndarray]:
        """The small arrays of one shard, after checking it against its manifest entry."""
        if not path.exists():
            raise ShardError(f"Missing shard: {path} is listed in the manifest but does not exist; "
                             f"restore it or run 'megdet pack' again to repack it")
        if path.stat().st_size != shard["bytes"]:
            raise ShardError(f"Truncated or changed shard: {path} is {path.stat().st_size} bytes, the "
                             f"manifest says {shard['bytes']}; run 'megdet pack' again to repack it")
        if verify_checksums and file_sha256(path) != shard["sha256"]:
            raise ShardError(f"Checksum mismatch: {path} does not match the SHA-256 in the manifest; "
                             f"run 'megdet pack' again to repack it")
        try:
            with h5py.File(path, "r") as handle:
                attrs = handle.attrs
                if attrs["format_version"] != FORMAT_VERSION or attrs["num_images"] != shard["num_images"]:
                    raise ShardError(f"Invalid shard: {path} does not hold what the manifest lists; "
                                     f"run 'megdet pack' again to repack it")
                index = {name: handle[f"images/{name}"][()] for name in (
                    "image_id", "height", "width", "stored_height", "stored_width", "offset", "length",
                    "crc32", "orientation", "annotation_start")}
                index["file_name"] = handle["images/file_name"].asstr()[()]
                for name in ("box", "category_id", "iscrowd", "area", "id"):
                    index[name] = handle[f"annotations/{name}"][()]
                if self.has_image_labels:
                    index["flags"] = handle["annotations/flags"][()]
                    index["label_start"] = handle["images/label_start"][()]
                    index["label_category_id"] = handle["labels/category_id"][()]
                    index["label_present"] = handle["labels/present"][()]
        except (OSError, KeyError) as error:
            raise ShardError(f"Unreadable shard: {path} ({os_error_reason(error, path.parent)}); run 'megdet pack' "
                             f"again to repack it") from None
        return index

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self):
        return {**self.__dict__, "_pid": None, "_handles": {}, "_image_data": {}}

    def _shard(self, shard: int) -> h5py.File:
        """This process's handle on shard ``shard``, opened on first use (never one from before a fork)."""
        if self._pid != os.getpid():
            self._pid, self._handles, self._image_data = os.getpid(), {}, {}
        if shard not in self._handles:
            self._handles[shard] = h5py.File(self.shard_paths[shard], "r")
            self._image_data[shard] = self._handles[shard]["images/data"]
        return self._handles[shard]

    def close(self) -> None:
        if self._pid == os.getpid():
            for handle in self._handles.values():
                handle.close()
        self._handles, self._image_data = {}, {}

    def read_bytes(self, index: int) -> np.ndarray:
        """The stored bytes of image ``index`` (uint8 [length]): one read, CRC-checked
        (``CorruptRecordError`` when they do not match)."""
        shard = int(self.shard_of[index])
        start, length = int(self._offset[index]), int(self._length[index])
        try:
            self._shard(shard)
            stored = self._image_data[shard][start:start + length]
        except OSError as error:
            raise ShardError(f"Unreadable shard: {self.shard_paths[shard]} "
                             f"({os_error_reason(error, self.shard_dir)}); run 'megdet pack' again to repack it") from None
        if zlib.crc32(stored) != int(self._crc32[index]):
            raise CorruptRecordError(
                f"Checksum mismatch: {self._record_name(index)} is corrupt; run the same 'megdet pack' command "
                f"again (it repacks shards that fail their checksum), or leave such records out (megdet train "
                f"data.skip_corrupt=true; ShardDataset(skip_corrupt=True))",
                reason="its bytes do not match their CRC-32")
        return stored

    def _record_name(self, index: int) -> str:
        start, length = int(self._offset[index]), int(self._length[index])
        return (f"image id {int(self.image_ids[index])} in {self.shard_paths[int(self.shard_of[index])]} (record "
                f"{int(self.local_index[index])} of that shard, index {index} of the data set, bytes "
                f"{start}..{start + length})")

    def decode(self, index: int, stored: np.ndarray) -> np.ndarray:
        """Stored bytes of image ``index`` -> uint8 [H, W, 3] RGB, upright (raw: the stored pixels)."""
        if self.format == "raw":
            height, width = self.stored_sizes[index]
            return stored.reshape(int(height), int(width), 3)
        return decode_image(stored.tobytes(), int(self._orientation[index]))

    def _decoded(self, index: int, stored: np.ndarray) -> np.ndarray:
        """``decode``, a file that does not decode (packed verified by its header only: Open Images) as a
        ``CorruptRecordError`` naming it."""
        try:
            return self.decode(index, stored)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            reason = f"its image does not decode ({os_error_reason(error, self.shard_dir)})"
            raise CorruptRecordError(f"Undecodable image: {self._record_name(index)}: {reason}; replace the image file "
                                     "and pack again, or leave such records out (megdet train data.skip_corrupt=true; "
                                     "ShardDataset(skip_corrupt=True))", reason=reason) from None

    def annotations(self, index: int) -> Dict[str, Any]:
        """Record ``index`` without its image (nothing is read from the shard files)."""
        rows = slice(self._annotation_start[index], self._annotation_start[index + 1])
        return {"image_id": int(self.image_ids[index]), "file_name": str(self.file_names[index]),
                "height": int(self.image_sizes[index, 0]), "width": int(self.image_sizes[index, 1]),
                "boxes": self._boxes[rows].copy(), "category_ids": self._category_ids[rows].copy(),
                "iscrowd": self._iscrowd[rows].copy(), "areas": self._areas[rows].copy(), **self._image_labels(index)}

    def _image_labels(self, index: int) -> Dict[str, np.ndarray]:
        """Open Images shards: {"flags": int8 [K, 5], "positive_labels", "negative_labels": int64 category
        ids verified present and absent}; other shards: {}."""
        if not self.has_image_labels:
            return {}
        rows = slice(self._annotation_start[index], self._annotation_start[index + 1])
        labels = slice(self._label_start[index], self._label_start[index + 1])
        present = self._label_present[labels]
        return {"flags": self._flags[rows].copy(), "positive_labels": self._label_category_ids[labels][present],
                "negative_labels": self._label_category_ids[labels][~present]}

    def segmentations(self, index: int) -> List[Any]:
        """Image ``index``'s K COCO segmentations (polygons or RLE), without decoding its pixels."""
        start = int(self._local_annotation_row[index])
        count = int(self._annotation_start[index + 1] - self._annotation_start[index])
        texts = self._shard(int(self.shard_of[index]))["annotations/segmentation"].asstr()[start:start + count]
        return [json.loads(text) for text in texts]

    def __getitem__(self, index: int) -> Optional[Dict[str, Any]]:
        try:
            stored = self.read_bytes(index)
            image = self._decoded(index, stored)
        except CorruptRecordError as error:
            if not self.skip_corrupt:
                raise
            self.corrupt_skipped += 1
            write_line(f"warning: skipped {self._record_name(index)}: {error.reason}")
            return None
        record = self.annotations(index)
        record["image"] = image
        if self.with_segmentation:
            rows = slice(self._annotation_start[index], self._annotation_start[index + 1])
            record.update(segmentation=self.segmentations(index), annotation_ids=self._annotation_ids[rows].copy())
        return record

    def raw_record(self, index: int) -> Dict[str, Any]:
        """Record ``index`` without decoding: the annotations of ``dataset[index]`` plus
        "image_bytes" (bytes as stored: the source file for jpeg, RGB pixels for raw),
        "stored_size" (height, width), "orientation", "annotation_ids": int64 [K], "segmentation"
        and "source" (``source(index)``)."""
        record = self.annotations(index)
        rows = slice(self._annotation_start[index], self._annotation_start[index + 1])
        record.update(image_bytes=self.read_bytes(index).tobytes(),
                      stored_size=tuple(int(v) for v in self.stored_sizes[index]),
                      orientation=int(self._orientation[index]),
                      annotation_ids=self._annotation_ids[rows].copy(),
                      segmentation=self.segmentations(index), source=self.source(index))
        return record

    def source(self, index: int) -> Dict[str, Any]:
        """{"image": {...}, "annotations": [...], "annotation_positions": [...]}: image ``index``'s
        entries in the annotation file, as they were, and where its annotations stood in that file."""
        shard = self._shard(int(self.shard_of[index]))
        return json.loads(shard["source/record"].asstr()[self.local_index[index]])
