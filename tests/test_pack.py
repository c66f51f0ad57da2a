"""``megdet pack`` on real COCO-format data: round trip, export, parallel packing, resume, bad input.

The data sets are read from ../shared/realdata (see its README); the tests skip when it is absent.
Modified copies (truncated, rotated, grayscale, PNG) are written under pytest's tmp_path.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
from PIL import Image, ImageOps

import megdet.pack
from hpc.errors import UserError
from hpc.shards import ShardDataset
from hpc.shards.manifest import MANIFEST_NAME, read_manifest
from tests.conftest import REALDATA
from tests.multirank import MEGDET, REPO, launch_command, mpirun_skip_reason, skip_unless_launcher

# name: (annotation file, image folder) under REALDATA
REAL_SETS = {
    "chess_test": ("roboflow_chess_v23/test/_annotations.coco.json", "roboflow_chess_v23/test"),
    "chess_valid": ("roboflow_chess_v23/valid/_annotations.coco.json", "roboflow_chess_v23/valid"),
    "voc100": ("padilla_voc100/instances_default.json", "padilla_voc100/images"),
    "coco6": ("icevision_coco6/annotations.json", "icevision_coco6/images"),
    "coco4": ("mmpose_coco4/test_coco.json", "mmpose_coco4"),
}
SUBPROCESS_TIMEOUT_S = 240


def real_set(name: str) -> Tuple[Path, Path]:
    """(annotation file, image folder) of a real data set; skips the test when it is absent."""
    annotation, images = (REALDATA / part for part in REAL_SETS[name])
    if not annotation.exists():
        pytest.skip(f"real data {annotation} is absent: the tests read ../shared/realdata beside the repository")
    return annotation, images


def pack(*argv: str) -> int:
    """Run ``megdet pack ARGV`` in this process (its output is left to pytest's capture)."""
    parser = argparse.ArgumentParser()
    megdet.pack.add_arguments(parser)
    return megdet.pack.run(parser.parse_args([str(a) for a in argv]))


def subset(tmp_path: Path, name: str, count: Optional[int] = None, folder: str = "src") -> Tuple[Path, Path, Dict]:
    """A copy of real set ``name`` limited to its first ``count`` images, under ``tmp_path/folder``:
    (annotation file, image folder of symlinks, the json). Tests change files in it freely."""
    annotation, images = real_set(name)
    coco = json.loads(annotation.read_text())
    coco["images"] = coco["images"][:count]
    kept = {image["id"] for image in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    out = tmp_path / folder
    (out / "images").mkdir(parents=True)
    for image in coco["images"]:
        (out / "images" / image["file_name"]).symlink_to(images / image["file_name"])
    (out / "ann.json").write_text(json.dumps(coco))
    return out / "ann.json", out / "images", coco


def replace_image(images: Path, file_name: str, data: bytes) -> None:
    (images / file_name).unlink()
    (images / file_name).write_bytes(data)


def source_pixels(path: Path) -> np.ndarray:
    """The image as displayed, decoded by Pillow's own EXIF handling: uint8 [H, W, 3]."""
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def gt_as_detections(coco: Dict) -> List[Dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in coco["annotations"] if not a.get("iscrowd", 0)]


def bbox_stats(ground_truth: Dict, detections: List[Dict]) -> np.ndarray:
    """COCOeval bbox stats [12] of ``detections`` against ``ground_truth`` (a COCO dict)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = json.loads(json.dumps(ground_truth))
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def assert_round_trip(dataset: ShardDataset, coco: Dict, images: Path) -> None:
    """Every image's bytes and every annotation in ``dataset`` equal the source ``coco``."""
    annotations_of = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        annotations_of[annotation["image_id"]].append(annotation)
    assert [int(i) for i in dataset.image_ids] == [image["id"] for image in coco["images"]]
    for index, image in enumerate(coco["images"]):
        record = dataset.raw_record(index)
        source = annotations_of[image["id"]]
        assert record["image_bytes"] == (images / image["file_name"]).read_bytes()
        assert (record["image_id"], record["file_name"]) == (image["id"], image["file_name"])
        assert (record["height"], record["width"]) == (image["height"], image["width"])
        assert (record["source"]["image"], record["source"]["annotations"]) == (image, source)
        np.testing.assert_array_equal(record["boxes"], np.array([a["bbox"] for a in source], np.float32).reshape(-1, 4))
        assert record["category_ids"].tolist() == [a["category_id"] for a in source]
        assert record["annotation_ids"].tolist() == [a["id"] for a in source]
        assert record["iscrowd"].tolist() == [bool(a["iscrowd"]) for a in source]
        np.testing.assert_array_equal(record["areas"], np.array([a["area"] for a in source], np.float32))
        assert record["segmentation"] == [a["segmentation"] for a in source]


@pytest.mark.parametrize("name", list(REAL_SETS))
def test_round_trip_and_export_evaluate_identically(name, tmp_path):
    annotation, images = real_set(name)
    coco = json.loads(annotation.read_text())
    out = tmp_path / "shards"
    assert pack("--coco-json", annotation, "--images", images, "--out", out, "--shard-size", "3MiB",
                "--export-json", tmp_path / "export.json") == 0
    dataset = ShardDataset(str(out))
    assert_round_trip(dataset, coco, images)
    last = dataset[len(dataset) - 1]
    np.testing.assert_array_equal(last["image"], source_pixels(images / coco["images"][-1]["file_name"]))
    exported = json.loads((tmp_path / "export.json").read_text())
    assert exported == coco
    detections = gt_as_detections(coco)
    np.testing.assert_array_equal(bbox_stats(exported, detections), bbox_stats(coco, detections))


def test_ids_from_zero_survive_and_category_zero_is_not_background(tmp_path):
    """Trap: the chess set numbers images, annotations and a category from 0."""
    annotation, images = real_set("chess_test")
    coco = json.loads(annotation.read_text())
    out = tmp_path / "shards"
    pack("--coco-json", annotation, "--images", images, "--out", out, "--export-json", tmp_path / "export.json")
    dataset = ShardDataset(str(out))
    assert int(dataset.image_ids[0]) == 0 and dataset[0]["image_id"] == 0
    assert dataset.categories[0] == {"id": 0, "name": coco["categories"][0]["name"]}  # -> label 1, not background
    exported = json.loads((tmp_path / "export.json").read_text())
    assert min(a["id"] for a in exported["annotations"]) == 0  # ids are kept as they are
    # pycocotools reads a matched ground-truth id 0 as "unmatched": ground truth fed back as detections
    # scores below 1 on the source and, identically, on the export; with ids shifted by one it is 1.
    detections = gt_as_detections(coco)
    stats = bbox_stats(exported, detections)
    np.testing.assert_array_equal(stats, bbox_stats(coco, detections))
    shifted = {**exported, "annotations": [{**a, "id": a["id"] + 1} for a in exported["annotations"]]}
    assert stats[0] < 1.0 and bbox_stats(shifted, detections)[0] == pytest.approx(1.0)


def test_crowd_rle_kept_for_evaluation(tmp_path):
    """Trap: crowd annotations (RLE) are packed, marked, and exported unchanged."""
    ann, images, coco = subset(tmp_path, "coco6")
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    assert crowd and isinstance(crowd[0]["segmentation"], dict)
    pack("--coco-json", ann, "--images", images, "--out", tmp_path / "shards")
    dataset = ShardDataset(str(tmp_path / "shards"), with_segmentation=True)
    index = [int(i) for i in dataset.image_ids].index(crowd[0]["image_id"])
    record = dataset[index]
    row = [a["id"] for a in coco["annotations"] if a["image_id"] == crowd[0]["image_id"]].index(crowd[0]["id"])
    assert record["iscrowd"][row] and record["iscrowd"].sum() == len(
        [a for a in crowd if a["image_id"] == crowd[0]["image_id"]])
    assert record["segmentation"][row] == crowd[0]["segmentation"]


def test_exif_orientation_grayscale_and_png(tmp_path):
    """Trap: the json's size is the image as displayed; grayscale and PNG decode to RGB [H, W, 3]."""
    ann, images, coco = subset(tmp_path, "coco6", count=3)
    rotated, gray, png = coco["images"]
    upright = Image.open(images / rotated["file_name"]).convert("RGB")
    stored = io.BytesIO()  # pixels stored turned; EXIF 6 says "turn 90 degrees clockwise to show"
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(stored, "JPEG", quality=95, exif=exif)
    replace_image(images, rotated["file_name"], stored.getvalue())
    grayscale = io.BytesIO()
    Image.open(images / gray["file_name"]).convert("L").save(grayscale, "JPEG")
    replace_image(images, gray["file_name"], grayscale.getvalue())
    png_name = png["file_name"].replace(".jpg", ".png")
    Image.open(images / png["file_name"]).save(images / png_name, "PNG")
    png["file_name"] = png_name
    ann.write_text(json.dumps(coco))

    for fmt in ("jpeg", "raw"):
        pack("--coco-json", ann, "--images", images, "--out", tmp_path / fmt, "--format", fmt)
        dataset = ShardDataset(str(tmp_path / fmt))
        for index, image in enumerate(coco["images"]):
            pixels = dataset[index]["image"]
            assert pixels.shape == (image["height"], image["width"], 3)
            np.testing.assert_array_equal(pixels, source_pixels(images / image["file_name"]))
        if fmt == "jpeg":
            assert dataset.raw_record(0)["orientation"] == 6
            assert dataset.raw_record(2)["image_bytes"][:8] == b"\x89PNG\r\n\x1a\n"
    assert dataset.raw_record(0)["stored_size"] == (rotated["height"], rotated["width"])

    rotated["width"], rotated["height"] = rotated["height"], rotated["width"]  # the size as stored, not shown
    ann.write_text(json.dumps(coco))
    wrong_size = rf"image id {rotated['id']} \(.*{rotated['file_name']}\).*after EXIF orientation 6"
    with pytest.raises(UserError, match=wrong_size):
        pack("--coco-json", ann, "--images", images, "--out", tmp_path / "wrong")


def test_raw_format_downscales_and_keeps_original_boxes(tmp_path):
    ann, images, coco = subset(tmp_path, "chess_valid", count=2)
    pack("--coco-json", ann, "--images", images, "--out", tmp_path / "raw", "--format", "raw", "--max-size", "512")
    dataset = ShardDataset(str(tmp_path / "raw"))
    for index, image in enumerate(coco["images"]):
        record = dataset[index]
        scale = 512 / max(image["height"], image["width"])
        assert record["image"].shape == (round(image["height"] * scale), round(image["width"] * scale), 3)
        expected = np.asarray(Image.open(images / image["file_name"]).convert("RGB").resize(
            record["image"].shape[1::-1], Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(record["image"], expected)
        boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"]]
        np.testing.assert_array_equal(record["boxes"], np.array(boxes, np.float32))
        assert (record["height"], record["width"]) == (image["height"], image["width"])
    with pytest.raises(UserError, match="--format raw only"):
        pack("--coco-json", ann, "--images", images, "--out", tmp_path / "j", "--max-size", "512")


def test_boxes_outside_or_empty_are_clipped_or_dropped_and_counted(tmp_path):
    ann, images, coco = subset(tmp_path, "coco4", count=1)
    image = coco["images"][0]
    width = image["width"]
    template = coco["annotations"][0]
    odd = [[-10.0, 5.0, 50.0, 40.0],            # clipped at the left: x 0..40
           [width - 20.0, 10.0, 60.0, 30.0],    # clipped at the right
           [30.0, 30.0, 0.0, 20.0],             # zero width: dropped
           [30.0, 30.0, 20.0, -5.0],            # negative height: dropped
           [width + 5.0, 10.0, 20.0, 20.0]]     # outside the image: dropped
    coco["annotations"] += [{**template, "id": 10**9 + i, "bbox": box} for i, box in enumerate(odd)]
    ann.write_text(json.dumps(coco))
    pack("--coco-json", ann, "--images", images, "--out", tmp_path / "shards", "--export-json", tmp_path / "e.json")
    dataset = ShardDataset(str(tmp_path / "shards"))
    assert dataset.manifest["dataset"]["box_fixes"] == {"clipped": 2, "dropped": 3, "area_from_box": 0}
    boxes = dataset[0]["boxes"]
    assert len(boxes) == len(coco["annotations"]) - 3
    np.testing.assert_array_equal(boxes[-2:], np.array([[0, 5, 40, 40], [width - 20, 10, 20, 30]], np.float32))
    assert json.loads((tmp_path / "e.json").read_text()) == coco  # the source's own entries are exported


def test_invalid_annotation_files_name_the_entry(tmp_path):
    ann, images, coco = subset(tmp_path, "coco4", count=2)
    first, image = coco["annotations"][0], coco["images"][0]
    broken = [("annotations", [{**first, "category_id": 999}], rf"annotation id {first['id']} has category id 999"),
              ("annotations", [{**first, "image_id": 5}], rf"annotation id {first['id']} refers to image id 5"),
              ("annotations", [{**first, "bbox": [1, 2, 3]}], r"has bbox \[1, 2, 3\]"),
              ("images", [image, image], rf"image id {image['id']} appears twice"),
              ("images", [{k: v for k, v in image.items() if k != "height"}], "lacks height")]
    for key, entries, message in broken:
        ann.write_text(json.dumps({**coco, key: entries}))
        with pytest.raises(UserError, match=message):
            pack("--coco-json", ann, "--images", images, "--out", tmp_path / "shards")
    ann.write_text("{not json")
    with pytest.raises(UserError, match="not JSON"):
        pack("--coco-json", ann, "--images", images, "--out", tmp_path / "shards")
    assert not (tmp_path / "shards").exists()  # nothing is written before the file is valid


def test_bad_images_name_the_image_or_are_skipped_and_counted(tmp_path):
    ann, images, coco = subset(tmp_path, "voc100", count=6)
    truncated, corrupt = coco["images"][1], coco["images"][4]
    data = (images / truncated["file_name"]).read_bytes()
    replace_image(images, truncated["file_name"], data[: len(data) // 2])
    replace_image(images, corrupt["file_name"], b"not an image at all" * 100)
    out = tmp_path / "shards"
    undecodable = rf"image id {truncated['id']} \(.*{truncated['file_name']}\) cannot be decoded"
    with pytest.raises(UserError, match=undecodable):
        pack("--coco-json", ann, "--images", images, "--out", out, "--shards", "2")
    assert not (out / MANIFEST_NAME).exists()
    pack("--coco-json", ann, "--images", images, "--out", out, "--shards", "2", "--skip-bad")
    manifest = read_manifest(out)
    assert manifest["num_skipped"] == 2 and manifest["num_images"] == 4
    assert [s["image_id"] for s in manifest["skipped"]] == [truncated["id"], corrupt["id"]]
    dataset = ShardDataset(str(out))
    kept = [image for image in coco["images"] if image not in (truncated, corrupt)]
    assert [int(i) for i in dataset.image_ids] == [image["id"] for image in kept]
    for index, image in enumerate(kept):
        assert dataset.raw_record(index)["image_bytes"] == (images / image["file_name"]).read_bytes()

    first = coco["images"][0]
    (images / first["file_name"]).unlink()
    with pytest.raises(UserError, match=rf"{first['file_name']} \(image id {first['id']}\) does not exist"):
        pack("--coco-json", ann, "--images", images, "--out", tmp_path / "missing", "--skip-bad")
    with pytest.raises(UserError, match="Invalid --shard-size: '1 GiBi'"):
        pack("--coco-json", ann, "--images", images, "--out", out, "--shard-size", "1 GiBi")


def test_crash_mid_pack_leaves_no_shard_and_resume_keeps_complete_ones(launch_env, tmp_path):
    ann, images, coco = subset(tmp_path, "chess_valid", count=9)
    out = tmp_path / "shards"
    pack("--coco-json", ann, "--images", images, "--out", tmp_path / "clean", "--shards", "3")
    clean_manifest = (tmp_path / "clean" / MANIFEST_NAME).read_text()

    # a crash while shard 1 is written: a truncated image stops the run there
    broken = coco["images"][4]["file_name"]
    good = (images / broken).read_bytes()
    replace_image(images, broken, good[:1000])
    with pytest.raises(UserError, match="cannot be decoded"):
        pack("--coco-json", ann, "--images", images, "--out", out, "--shards", "3")
    assert sorted(p.name for p in out.iterdir()) == [  # the failed shard's partial file is removed, the lock too
        "shard-00000-of-00003.h5", "shard-00000-of-00003.h5.json"]
    kept = (out / "shard-00000-of-00003.h5").stat().st_ino

    # a SIGKILL while shard 1 is written leaves shard 0 complete and nothing under shard 1's name
    replace_image(images, broken, good)
    killed = tmp_path / "killed"
    argv = ["pack", "--coco-json", str(ann), "--images", str(images), "--out", str(killed),
            "--shards", "3", "--format", "raw"]
    proc = subprocess.Popen(MEGDET + argv, cwd=REPO, env=launch_env(None), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not (killed / ".shard-00001-of-00003.h5.partial").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "megdet pack never started shard 1"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "megdet pack finished before it could be killed"
    assert sorted(p.name for p in killed.glob("shard-*")) == ["shard-00000-of-00003.h5", "shard-00000-of-00003.h5.json"]
    killed_shard0 = (killed / "shard-00000-of-00003.h5").stat().st_ino
    pack(*argv[1:])
    assert (killed / "shard-00000-of-00003.h5").stat().st_ino == killed_shard0
    assert len(ShardDataset(str(killed), verify_checksums=True)) == len(coco["images"])

    # resume: shard 0 is kept as it is, the rest packed; the result equals a clean run
    pack("--coco-json", ann, "--images", images, "--out", out, "--shards", "3")
    assert (out / "shard-00000-of-00003.h5").stat().st_ino == kept
    assert (out / MANIFEST_NAME).read_text() == clean_manifest
    assert not (out / ".shard-00001-of-00003.h5.partial").exists()

    # a shard that no longer matches its checksum is packed again on resume
    shard = out / "shard-00002-of-00003.h5"
    with open(shard, "r+b") as handle:
        handle.seek(shard.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    pack("--coco-json", ann, "--images", images, "--out", out, "--shards", "3")
    assert (out / MANIFEST_NAME).read_text() == clean_manifest
    assert_round_trip(ShardDataset(str(out), verify_checksums=True), coco, images)


def rank_errors(result: subprocess.CompletedProcess) -> Dict[int, str]:
    """{rank: message} of the one-line CLI errors in ``result``'s stderr (mpirun may splice the ranks'
    lines together, so messages are split at each "megdet pack: error" rather than at newlines)."""
    found = re.findall(r"megdet pack: error \(rank (\d+)/\d+\): (.*?)(?=megdet pack: error|\n|$)", result.stderr)
    return {int(rank): message for rank, message in found}


@pytest.mark.multirank
def test_mpirun_pack_equals_serial_and_fails_on_every_rank(run_megdet, tmp_path):
    if mpirun_skip_reason():
        pytest.skip(mpirun_skip_reason())
    ann, images, coco = subset(tmp_path, "voc100", count=40)
    common = ["pack", "--coco-json", str(ann), "--images", str(images), "--shards", "5"]
    serial = run_megdet([*common, "--out", str(tmp_path / "serial")], timeout=SUBPROCESS_TIMEOUT_S)
    parallel = run_megdet([*common, "--out", str(tmp_path / "parallel")],
                          nprocs=2, launcher="mpirun", timeout=SUBPROCESS_TIMEOUT_S)
    assert serial.returncode == 0 and parallel.returncode == 0, serial.stderr + parallel.stderr
    assert "[rank 1/2] packed" in parallel.stdout
    manifest = read_manifest(tmp_path / "serial")
    assert read_manifest(tmp_path / "parallel") == manifest  # same shard checksums: byte-identical files
    a, b = ShardDataset(str(tmp_path / "serial")), ShardDataset(str(tmp_path / "parallel"))
    for index in range(len(a)):
        ra, rb = a.raw_record(index), b.raw_record(index)
        assert ra.keys() == rb.keys() and all(np.array_equal(ra[k], rb[k]) if isinstance(ra[k], np.ndarray)
                                              else ra[k] == rb[k] for k in ra)
    assert_round_trip(b, coco, images)

    # an image in a shard of rank 1 is missing: both ranks print one line naming it, exit 2, no manifest
    missing = coco["images"][a.shard_of.tolist().index(1)]["file_name"]
    (images / missing).unlink()
    failed = run_megdet([*common, "--out", str(tmp_path / "failed")],
                        nprocs=2, launcher="mpirun", timeout=SUBPROCESS_TIMEOUT_S)
    errors = rank_errors(failed)
    assert failed.returncode != 0 and sorted(errors) == [0, 1], failed.stderr
    assert all(missing in line and "does not exist" in line for line in errors.values()), failed.stderr
    assert not (tmp_path / "failed" / MANIFEST_NAME).exists()

    # a truncated image in rank 1's shard fails both ranks; rank 0's finished shard is kept for a resume
    (images / missing).write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    failed = run_megdet([*common, "--out", str(tmp_path / "failed")],
                        nprocs=2, launcher="mpirun", timeout=SUBPROCESS_TIMEOUT_S)
    errors = rank_errors(failed)
    assert failed.returncode != 0 and sorted(errors) == [0, 1], failed.stderr
    assert errors[0].startswith("rank 1 failed") and all(missing in line for line in errors.values())
    assert (tmp_path / "failed" / "shard-00000-of-00005.h5").exists()
    assert not (tmp_path / "failed" / MANIFEST_NAME).exists()


@pytest.mark.multirank
def test_packers_under_a_launcher_without_mpi_are_refused_on_every_rank(launch_env, tmp_path):
    """horovodrun (or torchrun, srun without MPI) would start N packers of the whole split into one
    folder; each rank refuses, naming mpirun, and nothing is written."""
    skip_unless_launcher("horovodrun")
    ann, images, _ = subset(tmp_path, "voc100", count=4)
    argv = ["pack", "--coco-json", str(ann), "--images", str(images), "--out", str(tmp_path / "out")]
    done = subprocess.run(launch_command("horovodrun", 2, MEGDET + argv), cwd=REPO, env=launch_env(None),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    errors = rank_errors(subprocess.CompletedProcess(done.args, done.returncode, done.stdout, done.stdout + done.stderr))
    assert done.returncode != 0 and sorted(errors) == [0, 1], done.stdout + done.stderr
    assert all("horovodrun started 2 packers" in e and "mpirun -np 2 megdet pack" in e for e in errors.values())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("segmentation, says", [
    ([[10.0, 10.0, 50.0, 10.0]], "polygon 0 has 4 values, not x, y pairs of at least 3 points"),
    ({"counts": [5, 5], "size": [10, 1]}, "its RLE is 10x1 (h x w) but the image is"),
])
def test_a_bad_segmentation_names_its_image_and_annotation_and_writes_no_shard(tmp_path, segmentation, says):
    """Masks are checked when packing, before any shard is written: a polygon of fewer than 3 points, an RLE
    of another size."""
    ann, images, coco = subset(tmp_path, "coco6", count=3)
    bad = next(a for a in coco["annotations"] if a["iscrowd"] == 0)
    bad["segmentation"] = segmentation
    ann.write_text(json.dumps(coco))
    image = next(i for i in coco["images"] if i["id"] == bad["image_id"])
    with pytest.raises(UserError) as caught:
        pack("--coco-json", ann, "--images", images, "--out", tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message and says in message, message
    assert f"annotation {bad['id']} of image {image['id']} ({image['file_name']})" in message, message
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.h5"))
