"""The Open Images files of the detection challenge -> validated arrays, and the class hierarchy.

    hierarchy = read_hierarchy("bbox_labels_600_hierarchy.json", "class-descriptions-boxable.csv")
    truth = read_ground_truth("validation-annotations-bbox.csv",
                              "validation-annotations-human-imagelabels-boxable.csv", hierarchy)
    detections = read_detections("detections.csv", truth, hierarchy)

Files (CSV with a header line unless said otherwise; only the columns named here are read, in any order):
  boxes         ImageID, LabelName, XMin, XMax, YMin, YMax (normalised to [0, 1]), IsGroupOf (0 or 1)
  image labels  ImageID, LabelName, Confidence (1: verified present, 0: verified absent)
  classes       LabelName, DisplayName; no header (class-descriptions-boxable.csv)
  hierarchy     JSON {"LabelName": ..., "Subcategory": [{"LabelName": ..., "Subcategory": [...]}, ...]}
  detections    ImageID, LabelName, Score (in [0, 1]), XMin, XMax, YMin, YMax
Boxes are kept as float64 [N, 4] (xmin, ymin, xmax, ymax), normalised. Images are numbered in the
sorted order of their ImageIDs over the boxes and image-label files (the images that have ground
truth); classes in the order of the classes file. Every problem in a file is a ``UserError`` that names
the file, the line and the fix.

The hierarchy's top node (Open Images' "Entity") stands above all classes and is not one of them. A
label may sit under several parents (the official 600-class hierarchy has 45 such labels): the
hierarchy is a directed acyclic graph, and a cycle is refused. "Part" lists (the parts of an object:
a human's face) are not kinds of it and expand nothing, as in the TF Object Detection API's expansion.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from hpc.errors import UserError

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")
IMAGE_LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")
DETECTION_COLUMNS = ("ImageID", "LabelName", "Score", "XMin", "XMax", "YMin", "YMax")
CORNERS = ("XMin", "YMin", "XMax", "YMax")  # the column of each box coordinate, in array order
CHUNK_ROWS = 1 << 19  # rows turned into arrays at a time: bounds the memory of reading a 4M-row file
STREAM_CHUNK_ROWS = 1 << 16  # the same for stream_image_rows, which also keeps every row's fields
# A box's flags, in array order (the boxes file's columns); IsGroupOf is required, the others may be absent.
FLAG_COLUMNS = ("IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside")
UNKNOWN_FLAG = -1
FLAG_MEANINGS = {
    "IsOccluded": "1 for an object occluded by another, 0 if not, -1 if unknown",
    "IsTruncated": "1 for an object that extends beyond the image, 0 if not, -1 if unknown",
    "IsGroupOf": "1 for a box around a group of objects, else 0",
    "IsDepiction": "1 for a depiction (a drawing, a toy), 0 for a real object, -1 if unknown",
    "IsInside": "1 for a picture taken from inside the object, 0 if not, -1 if unknown",
    "Confidence": "1 for a class verified present, 0 for one verified absent: give the human-verified labels file",
}


class ClassHierarchy:
    """The classes, in index order, and their is-a hierarchy (a directed acyclic graph).

    names: LabelName per class ("/m/01g317"). parents: the direct parents of each class, as class
    indices (the hierarchy's top node excluded). ``up`` lists each class with all its ancestors,
    ``down`` each class with all its descendants: the expansions of a positive and of a negative label.
    """

    def __init__(self, names: Sequence[str], parents: Sequence[Sequence[int]],
                 display_names: Optional[Sequence[str]] = None):
        self.names = tuple(names)
        self.display_names = tuple(display_names) if display_names is not None else self.names
        self.index: Dict[str, int] = {name: i for i, name in enumerate(self.names)}
        if len(self.index) != len(self.names) or len(self.display_names) != len(self.names) \
                or len(parents) != len(self.names):
            raise ValueError(f"Invalid classes: {len(self.names)} names ({len(self.index)} distinct), "
                             f"{len(self.display_names)} display names, {len(parents)} parent lists")
        self.parents = tuple(tuple(sorted(set(int(p) for p in ps))) for ps in parents)
        if any(p < 0 or p >= len(self.names) for ps in self.parents for p in ps):
            raise ValueError(f"Invalid parents: class indices must be in 0..{len(self.names) - 1}")
        cycle = find_cycle(self.parents)
        if cycle is not None:
            raise ValueError("Invalid hierarchy: a cycle " + " > ".join(self.names[c] for c in cycle))
        children: List[List[int]] = [[] for _ in self.names]
        for child, ps in enumerate(self.parents):
            for parent in ps:
                children[parent].append(child)
        self.up = Expansion.of(reachable(self.parents))
        self.down = Expansion.of(reachable(children))

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Expansion:
    """Class c -> c followed by the classes it expands to, as flat arrays: members[offsets[c]:offsets[c + 1]]."""

    offsets: np.ndarray  # int64 [C + 1]
    members: np.ndarray  # int64 [offsets[-1]]

    @classmethod
    def of(cls, extra: Sequence[Sequence[int]]) -> "Expansion":
        lists = [[c, *sorted(more)] for c, more in enumerate(extra)]
        offsets = np.zeros(len(lists) + 1, np.int64)
        offsets[1:] = np.cumsum([len(members) for members in lists])
        return cls(offsets, np.array([c for members in lists for c in members], np.int64))

    def expand(self, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(rows int64 [N'], labels int64 [N']): each of ``labels`` (int [N]) followed by the classes it
        expands to; ``rows`` says which input each output came from."""
        labels = np.asarray(labels, np.int64)
        counts = self.offsets[labels + 1] - self.offsets[labels]
        rows = np.repeat(np.arange(len(labels)), counts)
        # position of each output within its input's list: 0, 1, ..., counts[i] - 1
        within = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        return rows, self.members[self.offsets[labels][rows] + within]


def find_cycle(successors: Sequence[Sequence[int]]) -> Optional[List[int]]:
    """One cycle of the directed graph node -> ``successors[node]`` as [a, b, ..., a], or None."""
    state = [0] * len(successors)  # 0: not seen, 1: on the current path, 2: done
    for start in range(len(successors)):
        if state[start]:
            continue
        path, pending = [start], [iter(successors[start])]
        state[start] = 1
        while path:
            node = next(pending[-1], None)
            if node is None:
                state[path.pop()] = 2
                pending.pop()
            elif state[node] == 1:
                return path[path.index(node):] + [node]
            elif state[node] == 0:
                state[node] = 1
                path.append(node)
                pending.append(iter(successors[node]))
    return None


def reachable(successors: Sequence[Sequence[int]]) -> List[set]:
    """For each node of an acyclic graph, the set of nodes reachable from it (itself excluded)."""
    reach: List[Optional[set]] = [None] * len(successors)
    for start in range(len(successors)):
        stack = [start]
        while stack:
            node = stack[-1]
            waiting = [s for s in successors[node] if reach[s] is None]
            if waiting:
                stack.extend(waiting)
                continue
            reach[node] = set(successors[node]).union(*(reach[s] for s in successors[node]))
            stack.pop()
    return reach


@dataclass(frozen=True)
class BoxTable:
    """Ground-truth boxes of many images, one row each."""

    image: np.ndarray     # int64 [N]: image index
    label: np.ndarray     # int64 [N]: class index
    boxes: np.ndarray     # float64 [N, 4]: xmin, ymin, xmax, ymax, normalised
    group_of: np.ndarray  # bool [N]: the box covers a group of objects of its class


@dataclass(frozen=True)
class ImageLabelTable:
    """Verified image-level labels of many images, one row each."""

    image: np.ndarray     # int64 [L]
    label: np.ndarray     # int64 [L]
    positive: np.ndarray  # bool [L]: True: the class is in the image, False: it is not


@dataclass(frozen=True)
class GroundTruth:
    """The ground truth of the evaluated images: ``image_ids[i]`` is image i of the tables."""

    image_ids: Tuple[str, ...]
    boxes: BoxTable
    image_labels: ImageLabelTable


@dataclass(frozen=True)
class DetectionTable:
    """Detections of many images, one row each."""

    image: np.ndarray   # int64 [D]
    label: np.ndarray   # int64 [D]
    boxes: np.ndarray   # float64 [D, 4]: xmin, ymin, xmax, ymax, normalised
    scores: np.ndarray  # float64 [D]


def read_classes(path) -> Tuple[List[str], List[str]]:
    """(LabelNames, DisplayNames) of a class descriptions file (two columns, no header)."""
    names: List[str] = []
    displays: List[str] = []
    first_line: Dict[str, int] = {}
    with _reading(path, "classes") as reader:
        for row in reader:
            if not row:
                continue
            if len(row) != 2 or not row[0].strip():
                raise UserError(f"classes file {path} line {reader.line_num}: {len(row)} fields "
                                f"({','.join(row)[:80]!r}) where LabelName,DisplayName are expected: give "
                                "class-descriptions-boxable.csv (two columns, no header)")
            name = row[0].strip()
            if name in first_line:
                raise UserError(f"classes file {path} line {reader.line_num}: LabelName {name} again (first on "
                                f"line {first_line[name]}): keep one line per class")
            first_line[name] = reader.line_num
            names.append(name)
            displays.append(row[1])
    if not names:
        raise UserError(f"classes file {path} is empty: give class-descriptions-boxable.csv")
    return names, displays


def read_hierarchy(path, classes_path) -> ClassHierarchy:
    """The classes of ``classes_path`` and the hierarchy of the JSON file ``path`` over them."""
    names, displays = read_classes(classes_path)
    index = {name: i for i, name in enumerate(names)}
    tree = _read_json(path, "hierarchy")
    if not isinstance(tree, dict) or not isinstance(tree.get("LabelName"), str):
        raise UserError(f"hierarchy file {path} is not an Open Images hierarchy (its top level must be an object "
                        "with a LabelName and a Subcategory list): give bbox_labels_600_hierarchy.json")
    parents: List[set] = [set() for _ in names]
    stack = [(tree, None, tree["LabelName"])]  # (node, its parent's class index, the labels down to it)
    while stack:
        node, parent, where = stack.pop()
        label = node.get("LabelName") if isinstance(node, dict) else None
        if not isinstance(label, str):
            raise UserError(f"hierarchy file {path}: a node under {where} is not an object with a LabelName: "
                            "each entry of a Subcategory list is {\"LabelName\": ..., \"Subcategory\": [...]}")
        subcategories = node.get("Subcategory", [])
        if not isinstance(subcategories, list):
            raise UserError(f"hierarchy file {path}: the Subcategory of {where} is not a list: make it a list "
                            "of {\"LabelName\": ...} objects")
        this = None  # the top node stands above the classes and is none of them
        if node is not tree:
            if label not in index:
                raise UserError(f"hierarchy file {path}: LabelName {label} (at {where}) is not in the classes "
                                f"file {classes_path}: use the hierarchy and class descriptions of one release")
            this = index[label]
            if parent is not None:
                parents[this].add(parent)
        stack.extend((child, this, f"{where} > {child.get('LabelName') if isinstance(child, dict) else '?'}")
                     for child in subcategories)
    cycle = find_cycle([sorted(p) for p in parents])
    if cycle is not None:
        raise UserError(f"hierarchy file {path}: a cycle, each label the parent of the next: "
                        f"{' > '.join(names[c] for c in reversed(cycle))}: a label cannot be its own ancestor; "
                        "remove one of these Subcategory entries")
    return ClassHierarchy(names, [sorted(p) for p in parents], displays)


def read_ground_truth(boxes_path, labels_path, hierarchy: ClassHierarchy) -> GroundTruth:
    """The boxes and verified image-level labels of the evaluated images (those named in either file)."""
    box_ids, box_labels, box_corners, box_group_of = [], [], [], []
    for lines, columns, _ in _csv_chunks(boxes_path, "boxes", BOX_COLUMNS):
        box_ids.append(_image_ids(columns["ImageID"], lines, "boxes", boxes_path))
        box_labels.append(_class_indices(columns["LabelName"], lines, hierarchy, "boxes", boxes_path))
        box_corners.append(_corners(columns, lines, "boxes", boxes_path))
        box_group_of.append(_flags(columns["IsGroupOf"], lines, "boxes", boxes_path, "IsGroupOf",
                                   "1 for a box around a group of objects, else 0") == 1)
    label_ids, label_labels, label_positive = [], [], []
    for lines, columns, _ in _csv_chunks(labels_path, "image labels", IMAGE_LABEL_COLUMNS):
        label_ids.append(_image_ids(columns["ImageID"], lines, "image labels", labels_path))
        label_labels.append(_class_indices(columns["LabelName"], lines, hierarchy, "image labels", labels_path))
        label_positive.append(_flags(columns["Confidence"], lines, "image labels", labels_path, "Confidence",
                                     "1 for a class verified present, 0 for one verified absent: give the "
                                     "human-verified labels file") == 1)
    box_ids_all = np.concatenate(box_ids) if box_ids else np.zeros(0, str)
    label_ids_all = np.concatenate(label_ids) if label_ids else np.zeros(0, str)
    image_ids, images = np.unique(np.concatenate([box_ids_all, label_ids_all]), return_inverse=True)
    boxes = BoxTable(images[:len(box_ids_all)].astype(np.int64), _joined(box_labels, np.int64),
                     np.concatenate(box_corners) if box_corners else np.zeros((0, 4)), _joined(box_group_of, bool))
    labels = ImageLabelTable(images[len(box_ids_all):].astype(np.int64), _joined(label_labels, np.int64),
                             _joined(label_positive, bool))
    return GroundTruth(tuple(image_ids.tolist()), boxes, labels)


def read_detections(path, truth: GroundTruth, hierarchy: ClassHierarchy) -> DetectionTable:
    """The detections of a results CSV, on the images of ``truth``."""
    image_index = {image_id: i for i, image_id in enumerate(truth.image_ids)}
    images, labels, corners, scores = [], [], [], []
    for lines, columns, _ in _csv_chunks(path, "results", DETECTION_COLUMNS):
        chunk_images = np.array([image_index.get(image_id, -1) for image_id in columns["ImageID"]], np.int64)
        if (chunk_images < 0).any():
            row = int(np.argmax(chunk_images < 0))
            raise UserError(f"results file {path} line {lines[row]}: ImageID {columns['ImageID'][row]!r} has no "
                            "ground truth (no box and no image-level label): evaluate the detections of the "
                            "ground truth's images")
        images.append(chunk_images)
        labels.append(_class_indices(columns["LabelName"], lines, hierarchy, "results", path))
        corners.append(_corners(columns, lines, "results", path))
        chunk_scores = _numbers(columns["Score"], lines, "results", path, "Score")
        _refuse_first((chunk_scores < 0) | (chunk_scores > 1), lines, path, "results",
                      lambda row: f"Score {chunk_scores[row]!r} is outside [0, 1]: give the detector's confidence")
        scores.append(chunk_scores)
    return DetectionTable(_joined(images, np.int64), _joined(labels, np.int64),
                          np.concatenate(corners) if corners else np.zeros((0, 4)), _joined(scores, np.float64))


@dataclass(frozen=True)
class ImageRows:
    """One image's rows of the boxes and image-labels files, validated: K boxes and L image-level labels
    kept, in file order.

    boxes: float64 [K, 4] xmin, ymin, xmax, ymax, normalised. labels: int64 [K] class indices. flags: int8
    [K, 5], the ``FLAG_COLUMNS`` (1 yes, 0 no, -1 unknown or no such column). label_classes: int64 [L];
    label_present: bool [L] (Confidence 1: verified present, 0: verified absent). box_rows, label_rows:
    the kept rows as read, every column; box_lines, label_lines: int64 [K], [L], their lines in the files.
    skipped: the rows left out as bad (``skip_bad``), each {"image_id", "file_name", "line", "reason"}.
    outside_subset: rows left out because their class is not one of the classes kept (a class subset).
    """

    image_id: str
    boxes: np.ndarray
    labels: np.ndarray
    flags: np.ndarray
    label_classes: np.ndarray
    label_present: np.ndarray
    box_rows: List[List[str]]
    label_rows: List[List[str]]
    box_lines: np.ndarray
    label_lines: np.ndarray
    skipped: List[Dict[str, Any]]
    outside_subset: int


def stream_image_rows(boxes_path, labels_path, hierarchy: ClassHierarchy, *, known_classes: Sequence[str] = (),
                      skip_bad: bool = False, digests: Optional[Mapping[str, Any]] = None,
                      chunk_rows: int = STREAM_CHUNK_ROWS) -> Iterator[ImageRows]:
    """The images of the boxes and image-labels files, one at a time in ImageID order (the union of both
    files' images), each file read once, in order, ``chunk_rows`` rows at a time: memory does not grow
    with the files. Both must be sorted by ImageID, as the official files are (``UserError`` naming the
    first line out of order).

    Classes are ``hierarchy``'s; a row of a class in ``known_classes`` but not in ``hierarchy`` (the
    challenge's 500-class subset of the 600) is left out and counted. A bad row (a class of neither, a
    coordinate outside [0, 1] or out of order, a flag that is not 0 or 1, ...) is a ``UserError`` naming
    the file and line, or with ``skip_bad`` left out and listed. ``digests`` ({"boxes": hashlib object,
    "labels": ...}), when given, are fed each file's bytes.
    """
    known = frozenset(known_classes)
    digests = digests or {}
    boxes = _image_groups(boxes_path, "boxes", BOX_COLUMNS, lambda columns: _box_arrays(columns, hierarchy, known),
                          skip_bad=skip_bad, digest=digests.get("boxes"), chunk_rows=chunk_rows)
    labels = _image_groups(labels_path, "image labels", IMAGE_LABEL_COLUMNS,
                           lambda columns: _label_arrays(columns, hierarchy, known),
                           skip_bad=skip_bad, digest=digests.get("labels"), chunk_rows=chunk_rows)
    box, label = next(boxes, None), next(labels, None)
    while box is not None or label is not None:
        image_id = min(group.image_id for group in (box, label) if group is not None)
        box_here = box if box is not None and box.image_id == image_id else _RowGroup.empty(image_id, _BOX_EMPTY)
        label_here = label if label is not None and label.image_id == image_id \
            else _RowGroup.empty(image_id, _LABEL_EMPTY)
        yield ImageRows(image_id, box_here.arrays["boxes"], box_here.arrays["labels"], box_here.arrays["flags"],
                        label_here.arrays["classes"], label_here.arrays["present"], box_here.rows, label_here.rows,
                        box_here.lines, label_here.lines, box_here.skipped + label_here.skipped,
                        box_here.outside + label_here.outside)
        if box_here is box:
            box = next(boxes, None)
        if label_here is label:
            label = next(labels, None)


@dataclass(frozen=True)
class _RowGroup:
    """One image's kept rows of one file: ``arrays`` (one row each), rows as read, lines, skipped, outside."""

    image_id: str
    arrays: Dict[str, np.ndarray]
    rows: List[List[str]]
    lines: np.ndarray
    skipped: List[Dict[str, Any]]
    outside: int

    @classmethod
    def empty(cls, image_id: str, arrays: Dict[str, np.ndarray]) -> "_RowGroup":
        return cls(image_id, arrays, [], np.zeros(0, np.int64), [], 0)


_BOX_EMPTY = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64),
              "flags": np.zeros((0, len(FLAG_COLUMNS)), np.int8)}
_LABEL_EMPTY = {"classes": np.zeros(0, np.int64), "present": np.zeros(0, bool)}


@dataclass(frozen=True)
class _CheckedChunk:
    """A chunk with its rows' arrays, which rows are kept, and why the others are not."""

    chunk: CsvChunk
    arrays: Dict[str, np.ndarray]
    keep: np.ndarray            # bool [R]
    outside: np.ndarray         # bool [R]: of a class outside the subset
    reasons: Dict[int, str]     # row -> why it is bad


def _image_groups(path, what: str, required: Sequence[str], parse, *, skip_bad: bool, digest,
                  chunk_rows: int) -> Iterator[_RowGroup]:
    """The rows of one CSV file sorted by ImageID, one image at a time; ``parse(columns)`` gives a chunk's
    arrays, its rules (``RowCheck``) and which rows are of a class outside the subset."""
    pieces: List[Tuple[_CheckedChunk, int, int]] = []  # the last image's rows so far: (chunk, start, stop)
    last_id, last_line = None, 0
    for chunk in _csv_chunks(path, what, required, chunk_rows=chunk_rows, digest=digest):
        ids = chunk.columns["ImageID"]
        _refuse_first(np.array([not image_id.strip() for image_id in ids], bool), chunk.lines, path, what,
                      lambda row: "ImageID is empty: give each row its image's id")
        arrays, checks, outside = parse(chunk.columns)
        bad = np.zeros(len(ids), bool)
        reasons: Dict[int, str] = {}
        for failing, problem in checks:
            for row in np.flatnonzero(failing & ~bad).tolist():
                reasons[row] = problem(row)
            bad |= failing
        if reasons and not skip_bad:
            row = min(reasons)
            raise UserError(f"{what} file {path} line {chunk.lines[row]}: {reasons[row]} (or pass --skip-bad to leave "
                            "such rows out, counted in the manifest)")
        id_array = np.array(ids, dtype=str)
        previous = np.r_[np.array([last_id if last_id is not None else ""], dtype=str), id_array[:-1]]
        lines_before = np.r_[last_line, chunk.lines[:-1]]
        _refuse_first(id_array < previous, chunk.lines, path, what,
                      lambda row: f"ImageID {ids[row]!r} comes after {str(previous[row])!r} (line {lines_before[row]}): "
                                  "the file must be sorted by ImageID, as the official files are; sort it (keep the "
                                  "header line first, then LC_ALL=C sort -t, -k1,1 the rest)")
        checked = _CheckedChunk(chunk, arrays, ~bad & ~outside, outside & ~bad, reasons)
        starts = np.r_[0, np.flatnonzero(id_array[1:] != id_array[:-1]) + 1, len(ids)].tolist()
        for start, stop in zip(starts[:-1], starts[1:]):
            if pieces and ids[start] != last_id:  # a new image: the last one's rows are complete
                yield _assembled(pieces, path)
                pieces = []
            pieces.append((checked, start, stop))
            last_id = ids[start]
        last_line = int(chunk.lines[-1])
    if pieces:
        yield _assembled(pieces, path)


def _assembled(pieces: Sequence[Tuple[_CheckedChunk, int, int]], path) -> _RowGroup:
    """One image's group from its rows in one or two chunks."""
    first, start, _ = pieces[0]
    image_id = first.chunk.columns["ImageID"][start]
    parts: Dict[str, List[np.ndarray]] = {name: [] for name in first.arrays}
    rows: List[List[str]] = []
    lines, skipped, outside = [], [], 0
    for checked, start, stop in pieces:
        keep = checked.keep[start:stop]
        kept = slice(start, stop) if keep.all() else start + np.flatnonzero(keep)
        for name, array in checked.arrays.items():
            parts[name].append(array[kept])
        rows.extend(checked.chunk.rows[start:stop] if keep.all() else [checked.chunk.rows[i] for i in kept.tolist()])
        lines.append(checked.chunk.lines[kept])
        skipped.extend({"image_id": image_id, "file_name": str(path), "line": int(checked.chunk.lines[row]),
                        "reason": reason} for row, reason in sorted(checked.reasons.items()) if start <= row < stop)
        outside += int(checked.outside[start:stop].sum())
    arrays = {name: values[0] if len(values) == 1 else np.concatenate(values) for name, values in parts.items()}
    return _RowGroup(image_id, arrays, rows, lines[0] if len(lines) == 1 else np.concatenate(lines), skipped, outside)


def _subset_classes(values: tuple, hierarchy: ClassHierarchy,
                    known: frozenset) -> Tuple[np.ndarray, List[RowCheck], np.ndarray]:
    """Class indices int64 [R] (-1: not kept), the rule, and bool [R]: of a known class outside ``hierarchy``."""
    indices, checks = _class_checks(values, hierarchy)
    outside = np.array([index < 0 and name in known for name, index in zip(values, indices.tolist())], bool)
    return indices, [(checks[0][0] & ~outside, checks[0][1])], outside


def _box_arrays(columns: Mapping[str, tuple], hierarchy: ClassHierarchy, known: frozenset):
    """A boxes chunk's {"boxes", "labels", "flags"}, its rules and its rows outside the class subset."""
    labels, checks, outside = _subset_classes(columns["LabelName"], hierarchy, known)
    corners, corner_checks = _corner_checks(columns)
    checks += corner_checks
    flags = np.full((len(labels), len(FLAG_COLUMNS)), UNKNOWN_FLAG, np.int8)
    for position, name in enumerate(FLAG_COLUMNS):
        if name in columns:
            allowed = (0, 1) if name == "IsGroupOf" else (UNKNOWN_FLAG, 0, 1)
            values, flag_checks = _flag_checks(columns[name], name, FLAG_MEANINGS[name], allowed)
            checks += flag_checks
            flags[:, position] = np.where(np.isin(values, allowed), values, UNKNOWN_FLAG)
    return {"boxes": corners, "labels": labels, "flags": flags}, checks, outside


def _label_arrays(columns: Mapping[str, tuple], hierarchy: ClassHierarchy, known: frozenset):
    """An image-labels chunk's {"classes", "present"}, its rules and its rows outside the class subset."""
    classes, checks, outside = _subset_classes(columns["LabelName"], hierarchy, known)
    confidence, confidence_checks = _flag_checks(columns["Confidence"], "Confidence", FLAG_MEANINGS["Confidence"])
    return {"classes": classes, "present": confidence == 1}, checks + confidence_checks, outside


def _joined(pieces: List[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.zeros(0, dtype)


@contextlib.contextmanager
def _reading(path, what: str, digest=None) -> Iterator:
    """A csv reader of ``path``; a missing file, and format and encoding errors, as one-line ``UserError``s.
    ``digest`` (a hashlib object), when given, is fed the file's bytes as they are read."""
    try:
        handle = open(path, newline="", encoding="utf-8-sig") if digest is None else open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{what} file {path} does not exist: check the path") from None
    except OSError as error:
        raise UserError(f"cannot read {what} file {path} ({error.__class__.__name__}): check the file") from None
    with handle:
        reader = csv.reader(handle if digest is None else _hashed_lines(handle, digest))
        try:
            yield reader
        except csv.Error as error:
            raise UserError(f"{what} file {path} line {reader.line_num}: not CSV ({error}): fix the line") from None
        except UnicodeDecodeError as error:
            raise UserError(f"{what} file {path} is not UTF-8 text (after line {reader.line_num}: {error.reason}): "
                            "check the file") from None


def _hashed_lines(handle, digest) -> Iterator[str]:
    """The text lines of the binary file ``handle``, each fed to ``digest`` first (UTF-8; a byte-order
    mark is not part of the first line, as with the "utf-8-sig" codec)."""
    for number, line in enumerate(handle):
        digest.update(line)
        yield (line[len(codecs.BOM_UTF8):] if number == 0 and line.startswith(codecs.BOM_UTF8) else line).decode()


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while a large CSV is read: the millions of row lists set it
    off again and again (reading 4.2M detections took 3x the time), and they hold no cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def csv_header(path, what: str, required: Sequence[str]) -> List[str]:
    """The column names of a CSV file's header line; ``UserError`` when it lacks one of ``required``."""
    with _reading(path, what) as reader:
        header = [name.strip() for name in next(reader, [])]
    _check_header(header, path, what, required)
    return header


def _check_header(header: List[str], path, what: str, required: Sequence[str]) -> None:
    missing = [name for name in required if name not in header]
    if missing:
        raise UserError(f"{what} file {path} lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)} "
                        f"(header: {','.join(header)[:200] or 'none'}): give a CSV whose header line names "
                        f"{', '.join(required)}")


class CsvChunk(NamedTuple):
    """Up to ``chunk_rows`` rows of a CSV file with a header (R of them)."""

    lines: np.ndarray           # int64 [R]: the file line of each row
    columns: Dict[str, tuple]   # every column of the header: R strings
    rows: List[List[str]]       # the rows as read


def _csv_chunks(path, what: str, required: Sequence[str], *, chunk_rows: int = CHUNK_ROWS,
                digest=None) -> Iterator[CsvChunk]:
    """The rows of a CSV file with a header that names ``required`` (and maybe more columns), in chunks
    of up to ``chunk_rows`` rows; blank lines are skipped. ``digest``: see ``_reading``. The cyclic
    garbage collector is paused while a chunk is read, not while the caller works on it (a caller that
    makes cycles, as Pillow and h5py objects do, would otherwise grow with the file)."""
    with _reading(path, what, digest) as reader:
        header = [name.strip() for name in next(reader, [])]
        _check_header(header, path, what, required)
        while True:
            with _collector_paused():
                chunk = _read_chunk(reader, header, chunk_rows, path, what)
            if chunk is None:
                return
            yield chunk


def _read_chunk(reader, header: List[str], chunk_rows: int, path, what: str) -> Optional[CsvChunk]:
    """The next up to ``chunk_rows`` rows of ``reader`` (None at the end of the file)."""
    rows: List[List[str]] = []
    lines: List[int] = []
    for row in reader:
        if len(row) != len(header):
            if not row:
                continue
            raise UserError(f"{what} file {path} line {reader.line_num}: {len(row)} fields where the header "
                            f"has {len(header)}: fix or remove the line")
        rows.append(row)
        lines.append(reader.line_num)
        if len(rows) == chunk_rows:
            break
    return _chunk(header, rows, lines) if rows else None


def _chunk(header: List[str], rows: List[List[str]], lines: List[int]) -> CsvChunk:
    fields = list(zip(*rows))
    return CsvChunk(np.array(lines, np.int64), {name: fields[i] for i, name in enumerate(header)}, rows)


# A rule over the R rows of a chunk: (bad bool [R], row -> what is wrong with that row and the fix).
RowCheck = Tuple[np.ndarray, Callable[[int], str]]


def _refuse_first(bad: np.ndarray, lines: np.ndarray, path, what: str, problem) -> None:
    """A ``UserError`` for the first row where ``bad`` (bool [R]) holds:
    "<what> file <path> line <n>: <problem(row)>"."""
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(f"{what} file {path} line {lines[row]}: {problem(row)}")


def _refuse(checks: Sequence[RowCheck], lines: np.ndarray, path, what: str) -> None:
    """A ``UserError`` for the first row that breaks a rule, the rules taken in the order given."""
    for bad, problem in checks:
        _refuse_first(bad, lines, path, what, problem)


def _number_checks(values: tuple, column: str) -> Tuple[np.ndarray, List[RowCheck]]:
    """float64 [R] of a column's strings (NaN where a value is not a number), and the rules: a number, finite."""
    try:
        numbers = np.array(values, dtype=np.float64)
        unreadable = np.zeros(len(values), bool)
    except ValueError:
        parsed = [_float_or_none(value) for value in values]
        unreadable = np.array([number is None for number in parsed], bool)
        numbers = np.array([np.nan if number is None else number for number in parsed], np.float64)
    return numbers, [(unreadable, lambda row: f"{column} {values[row]!r} is not a number: fix the line"),
                     (~unreadable & ~np.isfinite(numbers),
                      lambda row: f"{column} {values[row]!r} is not a finite number: fix the line")]


def _float_or_none(value: str) -> Optional[float]:
    try:
        return float(value)
    except ValueError:
        return None


def _numbers(values: tuple, lines: np.ndarray, what: str, path, column: str) -> np.ndarray:
    numbers, checks = _number_checks(values, column)
    _refuse(checks, lines, path, what)
    return numbers


def _flag_checks(values: tuple, column: str, meaning: str,
                 allowed: Tuple[int, ...] = (0, 1)) -> Tuple[np.ndarray, List[RowCheck]]:
    """float64 [R] of a flag column (NaN where not a number) and its rules: a number of ``allowed``."""
    numbers, checks = _number_checks(values, column)
    words = "neither 0 nor 1" if allowed == (0, 1) else f"not one of {', '.join(map(str, allowed))}"
    checks.append((np.isfinite(numbers) & ~np.isin(numbers, allowed),
                   lambda row: f"{column} {values[row]!r} is {words}: write {meaning}"))
    return numbers, checks


def _flags(values: tuple, lines, what: str, path, column: str, meaning: str) -> np.ndarray:
    numbers, checks = _flag_checks(values, column, meaning)
    _refuse(checks, lines, path, what)
    return numbers


def _image_ids(values: tuple, lines, what: str, path) -> np.ndarray:
    ids = np.array(values, dtype=str)
    _refuse_first(np.char.str_len(np.char.strip(ids)) == 0, lines, path, what,
                  lambda row: "ImageID is empty: give each row its image's id")
    return ids


def _class_checks(values: tuple, hierarchy: ClassHierarchy) -> Tuple[np.ndarray, List[RowCheck]]:
    """int64 [R] class indices (-1 where unknown) and the rule: a class of the classes file."""
    indices = np.array([hierarchy.index.get(name, -1) for name in values], np.int64)
    return indices, [(indices < 0, lambda row: f"LabelName {values[row]!r} is not in the classes file: use the "
                                                "classes file of the same release, or leave out that class's rows")]


def _class_indices(values: tuple, lines, hierarchy: ClassHierarchy, what: str, path) -> np.ndarray:
    indices, checks = _class_checks(values, hierarchy)
    _refuse(checks, lines, path, what)
    return indices


def _corner_checks(columns: Mapping[str, tuple]) -> Tuple[np.ndarray, List[RowCheck]]:
    """float64 [R, 4] (xmin, ymin, xmax, ymax) of a chunk, and the rules: numbers, each in [0, 1], min <= max."""
    parsed = [_number_checks(columns[name], name) for name in CORNERS]
    corners = np.stack([numbers for numbers, _ in parsed], axis=1)
    checks = [check for _, column_checks in parsed for check in column_checks]
    for axis, name in enumerate(CORNERS):
        checks.append(((corners[:, axis] < 0) | (corners[:, axis] > 1),
                       lambda row, name=name: f"{name} {columns[name][row]} is outside [0, 1]: coordinates are "
                                              "fractions of the image's width and height; clip them to [0, 1]"))
    for low, high in ((0, 2), (1, 3)):
        checks.append((corners[:, low] > corners[:, high],
                       lambda row, low=low, high=high: f"{CORNERS[low]} {columns[CORNERS[low]][row]} > "
                       f"{CORNERS[high]} {columns[CORNERS[high]][row]}: the columns are XMin, XMax, YMin, YMax, in "
                       "that order in the official files; swap the two values"))
    return corners, checks


def _corners(columns: Mapping[str, tuple], lines, what: str, path) -> np.ndarray:
    """float64 [R, 4] (xmin, ymin, xmax, ymax) of a chunk; each in [0, 1], min <= max."""
    corners, checks = _corner_checks(columns)
    _refuse(checks, lines, path, what)
    return corners


def _read_json(path, what: str):
    try:
        data = Path(path).read_bytes()
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
        raise UserError(f"{what} file {path} nests objects too deeply to read: check the file") from None
