"""Fuzzed input: ``megdet pack`` and ``megdet eval --gt --results`` on mutated copies of the real COCO
files in ../shared/realdata, from a fixed seed.

Mutations: dropped keys and values of the wrong type; negative, NaN, infinite and huge boxes; image
sizes that disagree with the file; duplicate image and annotation ids, unknown categories and
images; bad file names and structures; truncated files, non-UTF-8 bytes and flipped bytes. Every
run must end with exit 0 or exit 2 and one line ``megdet CMD: error: ...``: never a traceback, a
warning, a partial shard or a half-written output. Most cases run ``megdet.cli.main`` in this
process (fast); a few run the real command in a subprocess. A failure names the case and what was
mutated; its file stays under pytest's tmp_path as ``pack-case-N.json`` / ``eval-case-N-*.json``.
"""
from __future__ import annotations

import copy
import json
import random
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from hpc.shards import ShardDataset
from hpc.files import file_sha256
from hpc.shards.manifest import completion_path, read_manifest
from megdet import cli
from tests.conftest import REALDATA
from tests.test_pack import subset

SEED = 20260601
PACK_CASES = 240
EVAL_CASES = 200
SUBPROCESS_CASES = 2  # of each command: the first cases also run as a real `megdet` process
IMAGES_PER_SET = 3
PACK_SETS = ("voc100", "coco6", "coco4", "chess_test")
# (ground truth, results, images kept) under REALDATA
EVAL_SETS = (
    ("mmpose_coco4/test_coco.json", "mmpose_coco4/test_coco_det_AP_H_56.json", 4),
    ("padilla_voc100/instances_default.json",
     "padilla_voc100/coco_dets_as_results_remapped_to_instances_default.json", 8),
    ("cocoapi_val2014_100/instances_val2014_100.json",
     "cocoapi_val2014_100/instances_val2014_fakebbox100_results.json", 5),
)
WRONG_VALUES = (None, True, False, "12", "", -1, 0, 1.5, 2**63, 10**30, [], {}, [1, 2], {"a": 1},
                float("nan"), float("inf"), -float("inf"))
BAD_NUMBERS = (-50.0, -1e9, float("nan"), float("inf"), -float("inf"), 1e308, 1e30, 0.0, 2**64, -0.5, 10**400)
BAD_FILE_NAMES = ("", "missing.jpg", "../ann.json", "no/such/dir/x.jpg", "a\u0000b.jpg", ".", 42, None,
                  "x" * 300 + ".jpg")
NON_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\x80", b"\xed\xa0\x80")


# ---- mutations: each takes the document and a random generator, returns (document, description) ----

def _entries(doc: Any, rng: random.Random) -> List[Tuple[str, Dict]]:
    """(name, dict) of the document and some of its images, annotations and categories."""
    found = [("document", doc)] if isinstance(doc, dict) else []
    items = doc if isinstance(doc, list) else []
    if isinstance(doc, dict):
        for key in ("images", "annotations", "categories"):
            if isinstance(doc.get(key), list) and doc[key]:
                position = rng.randrange(len(doc[key]))
                if isinstance(doc[key][position], dict):
                    found.append((f"{key}[{position}]", doc[key][position]))
    for position, item in enumerate(items[:20]):
        if isinstance(item, dict):
            found.append((f"[{position}]", item))
    return found


def drop_key(doc, rng):
    entries = [(name, entry) for name, entry in _entries(doc, rng) if entry]
    if not entries:
        return doc, "nothing to drop"
    name, entry = rng.choice(entries)
    key = rng.choice(sorted(entry))
    del entry[key]
    return doc, f"dropped {name}.{key}"


def wrong_type(doc, rng):
    entries = [(name, entry) for name, entry in _entries(doc, rng) if entry]
    if not entries:
        return doc, "nothing to retype"
    name, entry = rng.choice(entries)
    key = rng.choice(sorted(entry))
    entry[key] = copy.deepcopy(rng.choice(WRONG_VALUES))
    return doc, f"{name}.{key} = {entry[key]!r}"


def _annotations(doc) -> List[Dict]:
    items = doc.get("annotations") if isinstance(doc, dict) else doc
    return [a for a in items if isinstance(a, dict)] if isinstance(items, list) else []


def _images(doc) -> List[Dict]:
    items = doc.get("images") if isinstance(doc, dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def bad_box(doc, rng):
    annotations = _annotations(doc)
    if not annotations:
        return doc, "no box"
    annotation = rng.choice(annotations)
    box = list(annotation.get("bbox") or [10.0, 10.0, 20.0, 20.0])
    kind = rng.randrange(4)
    if kind == 0 and len(box) == 4:
        box[rng.randrange(4)] = rng.choice(BAD_NUMBERS)
    elif kind == 1:
        box = [box[0] if box else 0, box[1] if len(box) > 1 else 0, rng.choice((-30.0, -1.0)), rng.choice((-30.0, 5.0))]
    elif kind == 2:
        box = [1.0, 1.0, 1e12, 1e12]
    else:
        box = box[:rng.randrange(4)] + [rng.choice(BAD_NUMBERS)] * rng.randrange(3)
    annotation["bbox"] = box
    return doc, f"annotation bbox = {box}"


def bad_image_size(doc, rng):
    images = _images(doc)
    if not images:
        return doc, "no image"
    image = rng.choice(images)
    side = rng.choice(("height", "width"))
    value = image.get(side, 100)
    value = value if isinstance(value, (int, float)) and not isinstance(value, bool) else 100
    if rng.random() < 0.5:  # plausible: the packer finds out only by decoding the file
        image[side] = rng.choice((value + 1, value - 1, image.get("width" if side == "height" else "height")))
    else:
        image[side] = rng.choice((0, -5, 10**9, 2**31, 2**70, float("nan"), float("inf"), value + 0.5, float(value),
                                  str(value)))
    return doc, f"image {image.get('id')} {side} = {image[side]!r}"


def duplicate_ids(doc, rng):
    kind = rng.choice(("images", "annotations", "categories"))
    items = doc.get(kind) if isinstance(doc, dict) else None
    items = [item for item in items if isinstance(item, dict)] if isinstance(items, list) else []
    if not items:
        return doc, f"no {kind}"
    if len(items) > 1 and rng.random() < 0.5:
        first, second = rng.sample(items, 2)
        second["id"] = first.get("id")
        return doc, f"{kind}: two entries with id {first.get('id')!r}"
    doc[kind].append(copy.deepcopy(rng.choice(items)))
    return doc, f"{kind}: an entry appended twice"


def unknown_reference(doc, rng):
    annotations = _annotations(doc)
    if isinstance(doc, dict) and isinstance(doc.get("categories"), list) and doc["categories"] and rng.random() < 0.3:
        removed = doc["categories"].pop(rng.randrange(len(doc["categories"])))
        return doc, f"category removed: {removed!r}"[:200]
    if not annotations:
        return doc, "no annotation"
    annotation = rng.choice(annotations)
    key = rng.choice(("category_id", "image_id"))
    annotation[key] = rng.choice((123456789, -1, 0, 7.5, "1"))
    return doc, f"annotation {key} = {annotation[key]!r}"


def bad_file_name(doc, rng):
    images = _images(doc)
    if not images:
        return doc, "no image"
    image = rng.choice(images)
    image["file_name"] = rng.choice(BAD_FILE_NAMES)
    return doc, f"image {image.get('id')} file_name = {image['file_name']!r}"[:200]


def bad_structure(doc, rng):
    if not isinstance(doc, dict) or rng.random() < 0.15:
        replacement = rng.choice(([], 7, "text", None, [doc], {"images": []}))
        return replacement, f"document = {type(replacement).__name__}"
    key = rng.choice(("images", "annotations", "categories"))
    doc[key] = copy.deepcopy(rng.choice(({}, None, "x", [1, 2], [None], [[1]], [], [{}])))
    return doc, f"{key} = {doc[key]!r}"


def bad_annotation_field(doc, rng):
    annotations = _annotations(doc)
    if not annotations:
        return doc, "no annotation"
    annotation = rng.choice(annotations)
    key = rng.choice(("segmentation", "iscrowd", "area", "id"))
    annotation[key] = copy.deepcopy(rng.choice((*WRONG_VALUES, -3.0, 2, {"counts": 5, "size": [1]}, [[1, 2, 3]])))
    return doc, f"annotation {key} = {annotation[key]!r}"


def bad_detection(doc, rng):
    """Results only: a detection's score, ids or box made wrong."""
    if not isinstance(doc, list) or not doc:
        return doc, "no detection"
    detection = rng.choice(doc)
    if not isinstance(detection, dict):
        return doc, "not a detection"
    key = rng.choice(("score", "image_id", "category_id", "bbox"))
    detection[key] = copy.deepcopy(rng.choice((*WRONG_VALUES, *BAD_NUMBERS, [1.0, 2.0, -3.0, 4.0],
                                               [0.0, 0.0, float("nan"), 1.0], 999999)))
    return doc, f"detection {key} = {detection[key]!r}"


DOCUMENT_MUTATIONS = (drop_key, wrong_type, bad_box, bad_box, bad_image_size, bad_image_size, duplicate_ids,
                      unknown_reference, bad_file_name, bad_structure, bad_annotation_field)
RESULT_MUTATIONS = (drop_key, wrong_type, bad_detection, bad_detection, bad_structure)


def mutate_bytes(data: bytes, rng: random.Random) -> Tuple[bytes, str]:
    kind = rng.randrange(4)
    if kind == 0:
        cut = rng.randrange(len(data))
        return data[:cut], f"truncated at byte {cut} of {len(data)}"
    if kind == 1:
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data))
            data = data[:at] + rng.choice(NON_UTF8) + data[at:]
        return data, "non-UTF-8 bytes inserted"
    if kind == 2:
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        return bytes(flipped), "bits flipped"
    return b"", "empty file"


def mutated(doc: Any, rng: random.Random, mutations) -> Tuple[bytes, str]:
    """The bytes of a mutated copy of ``doc`` and what was done to it."""
    doc = copy.deepcopy(doc)
    if rng.random() < 0.2:
        return mutate_bytes(json.dumps(doc).encode(), rng)
    done = []
    for _ in range(rng.randint(1, 3)):
        doc, what = rng.choice(mutations)(doc, rng)
        done.append(what)
    return json.dumps(doc).encode(), "; ".join(done)


# ---- running and checking ----

def run_cli(argv: List[str], capfd) -> Tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``megdet ARGV`` in this process; any exception but the CLI's own
    handling of a UserError is a crash and fails the test with its traceback."""
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            status = cli.main(argv)
        except BaseException:  # SystemExit included: argparse must not reject what the tests pass
            out, err = capfd.readouterr()
            return -1, out, err + traceback.format_exc()
    out, err = capfd.readouterr()
    for warning in caught:
        err += f"{warning.category.__name__}: {warning.message} ({warning.filename}:{warning.lineno})\n"
    return status, out, err


@pytest.fixture
def run_subprocess(run_megdet):
    """``run_subprocess(argv)``: (exit status, stdout, stderr) of ``megdet ARGV`` in a fresh process."""
    def run_subprocess(argv: List[str]) -> Tuple[int, str, str]:
        done = run_megdet(argv, timeout=240)
        return done.returncode, done.stdout, done.stderr
    return run_subprocess


def check_outcome(command: str, case: str, status: int, err: str) -> None:
    """Exit 0 with nothing on stderr, or exit 2 with one line ``megdet COMMAND: error: ...``."""
    if status == 0:
        assert err == "", f"{case}: exit 0 but stderr:\n{err}"
    else:
        assert status == 2 and "Traceback" not in err, f"{case}: exit {status}:\n{err}"
        assert err.count("\n") == 1 and err.startswith(f"megdet {command}: error: "), f"{case}: not one line:\n{err}"


def check_shard_folder(out: Path, case: str, num_images: Optional[int]) -> None:
    """No partial, temporary or lock file; every shard has a completion record it matches; when the
    pack succeeded (``num_images``: the images in its annotation file), a complete, verified set."""
    if not out.exists():
        return
    names = sorted(path.name for path in out.iterdir())
    assert not [n for n in names if n.startswith(".")], f"{case}: left {names}"
    for shard in out.glob("shard-*.h5"):
        record_path = completion_path(shard)
        assert record_path.exists(), f"{case}: {shard.name} has no completion record"
        record = json.loads(record_path.read_text())
        assert record["bytes"] == shard.stat().st_size and record["sha256"] == file_sha256(shard), case
    if num_images is not None:
        manifest = read_manifest(out)
        dataset = ShardDataset(str(out), verify_checksums=True)
        assert len(dataset) + manifest["num_skipped"] == num_images, case


def pack_sources(tmp_path: Path) -> List[Tuple[str, Path, Path, Dict]]:
    """(name, annotation file, image folder, json) of the first images of each real set."""
    return [(name, *subset(tmp_path, name, count=IMAGES_PER_SET, folder=name)) for name in PACK_SETS]


def pack_case(number: int, sources, tmp_path: Path) -> Tuple[str, List[str], Optional[int]]:
    """Case ``number``: (description, argv, images in its annotation file or None if not a list of
    them). Writes the mutated annotation file; each case draws from its own seeded generator."""
    rng = random.Random(f"{SEED}-pack-{number}")
    name, annotation, images, coco = sources[number % len(sources)]
    data, what = mutated(coco, rng, DOCUMENT_MUTATIONS)
    mutated_file = tmp_path / f"pack-case-{number}.json"
    mutated_file.write_bytes(data)
    argv = ["pack", "--coco-json", str(mutated_file), "--images", str(images), "--out", str(tmp_path / f"out-{name}")]
    shards = rng.choice((None, 1, 2, 3))
    argv += ["--shards", str(shards)] if shards else ["--shard-size", rng.choice(("200KB", "1GiB"))]
    if rng.random() < 0.3:
        argv.append("--skip-bad")
    if rng.random() < 0.15:
        argv += ["--format", "raw", "--max-size", "64"]
    try:
        parsed = json.loads(data)
        images_listed = isinstance(parsed, dict) and isinstance(parsed.get("images"), list)
        num_images = len(parsed["images"]) if images_listed else None
    except ValueError:
        num_images = None
    return f"pack case {number} ({name}: {what}; {' '.join(argv[7:])})", argv, num_images


@pytest.mark.slow
def test_fuzzed_annotation_files_pack_or_fail_in_one_line(run_subprocess, tmp_path, capfd):
    sources = pack_sources(tmp_path)
    outcomes = {0: 0, 2: 0}
    for number in range(PACK_CASES):
        case, argv, num_images = pack_case(number, sources, tmp_path)
        status, _, err = run_subprocess(argv) if number < SUBPROCESS_CASES else run_cli(argv, capfd)
        check_outcome("pack", case, status, err)
        check_shard_folder(Path(argv[6]), case, num_images if status == 0 else None)
        outcomes[status] += 1
    # the mutations reach both ends: some files still pack, most are refused
    assert outcomes[0] >= PACK_CASES // 20 and outcomes[2] >= PACK_CASES // 2, outcomes


def eval_sources(tmp_path: Path) -> List[Tuple[str, Dict, List[Dict]]]:
    """(name, ground truth, results) of the first images of each real evaluation set."""
    sources = []
    for gt_name, results_name, count in EVAL_SETS:
        gt_path, results_path = REALDATA / gt_name, REALDATA / results_name
        if not gt_path.exists():
            pytest.skip(f"real data {gt_path} is absent: the tests read ../shared/realdata beside the repository")
        gt = json.loads(gt_path.read_text())
        gt["images"] = gt["images"][:count]
        kept = {image["id"] for image in gt["images"]}
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in kept]
        results = [r for r in json.loads(results_path.read_text()) if r["image_id"] in kept]
        sources.append((gt_name.split("/")[0], gt, results))
    return sources


def eval_case(number: int, sources, tmp_path: Path) -> Tuple[str, List[str]]:
    rng = random.Random(f"{SEED}-eval-{number}")
    name, gt, results = sources[number % len(sources)]
    gt_file, results_file = tmp_path / f"eval-case-{number}-gt.json", tmp_path / f"eval-case-{number}-dets.json"
    if rng.random() < 0.35:
        data, what = mutated(gt, rng, DOCUMENT_MUTATIONS)
        gt_file.write_bytes(data)
        results_file.write_text(json.dumps(results))
        what = f"ground truth: {what}"
    else:
        data, what = mutated(results, rng, RESULT_MUTATIONS)
        results_file.write_bytes(data)
        gt_file.write_text(json.dumps(gt))
        what = f"results: {what}"
    argv = ["eval", "--gt", str(gt_file), "--results", str(results_file), "--out", str(tmp_path / f"eval-{number}")]
    return f"eval case {number} ({name}: {what})", argv


@pytest.mark.slow
def test_fuzzed_ground_truth_and_results_evaluate_or_fail_in_one_line(run_subprocess, tmp_path, capfd):
    sources = eval_sources(tmp_path)
    outcomes = {0: 0, 2: 0}
    for number in range(EVAL_CASES):
        case, argv = eval_case(number, sources, tmp_path)
        status, out, err = run_subprocess(argv) if number < SUBPROCESS_CASES else run_cli(argv, capfd)
        check_outcome("eval", case, status, err)
        out_dir = Path(argv[-1])
        if status == 0:
            assert "Average Precision" in out and (out_dir / "metrics.json").exists(), case
        else:
            assert not out_dir.exists(), f"{case}: output written before the error"
        outcomes[status] += 1
    assert outcomes[0] >= EVAL_CASES // 20 and outcomes[2] >= EVAL_CASES // 4, outcomes

