"""``megdet pack`` of Open Images on real photographs (``open_images_set``: the VOC photos of
../shared/realdata written as the official Open Images files): streamed into shards with pixel boxes,
flags and verified labels, exported back byte for byte; each kind of bad input one line naming the file
and line or the ImageID, and no partial shard; ``--skip-bad`` counts; resume; the class subset; mpirun.
"""
from __future__ import annotations

import csv
import gc
import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from hpc.errors import UserError
from hpc.shards import CorruptRecordError, ShardDataset
from hpc.shards.manifest import MANIFEST_NAME, read_manifest
from megdet.cli import main
from megdet.data.open_images import (FLAG_COLUMNS, read_ground_truth, read_hierarchy, stream_image_rows)
from megdet.data.open_images_shards import EXPORTED_FILES
from megdet.engine.open_images_eval import image_truth
from megdet.engine.open_images_metric import ImageDetections, evaluate_arrays
from tests.multirank import mpirun_skip_reason
from tests.test_pack import SUBPROCESS_TIMEOUT_S, pack, rank_errors


def split_copy(open_images_set: Dict, tmp_path: Path, split: str = "train") -> Dict[str, Path]:
    """A copy of one split's files (CSV files, the hierarchy, the classes, a folder of the same image
    links) under ``tmp_path``, for a test to change."""
    out = tmp_path / "src"
    out.mkdir()
    paths = {name: Path(shutil.copy(open_images_set[split][name], out / f"{name}.csv")) for name in ("boxes", "labels")}
    paths["classes"] = Path(shutil.copy(open_images_set["classes"], out / "classes.csv"))
    paths["hierarchy"] = Path(shutil.copy(open_images_set["hierarchy"], out / "hierarchy.json"))
    paths["images"] = Path(shutil.copytree(open_images_set[split]["images"], out / "images", symlinks=True))
    return paths


def inputs(paths: Dict, out: Path, *extra) -> List[str]:
    return ["--boxes", paths["boxes"], "--labels", paths["labels"], "--classes", paths["classes"],
            "--hierarchy", paths["hierarchy"], "--images", paths["images"], "--out", out, *extra]


def csv_rows(path: Path) -> List[List[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def set_field(path: Path, line: int, column: str, value: str) -> List[str]:
    """Set ``column`` of file line ``line`` (1: the header) of a CSV file; returns the row before."""
    rows = csv_rows(path)
    before = list(rows[line - 1])
    rows[line - 1][rows[0].index(column)] = value
    path.write_text("".join(",".join(row) + "\n" for row in rows))
    return before


def no_shard_written(out: Path) -> bool:
    return not any(p.name.startswith(("shard-", ".shard-")) or p.name == MANIFEST_NAME
                   for p in out.iterdir()) if out.exists() else True


def test_real_photos_pack_into_pixel_boxes_flags_and_labels_and_export_back_exactly(open_images_set, tmp_path):
    split = open_images_set["train"]
    out = tmp_path / "shards"
    pack(*inputs({**split, "classes": open_images_set["classes"], "hierarchy": open_images_set["hierarchy"]}, out,
                 "--images-per-shard", "16"))
    dataset = ShardDataset(str(out), verify_checksums=True)
    manifest = dataset.manifest
    assert dataset.kind == "open-images" and len(dataset) == 70
    assert [shard["file"] for shard in manifest["shards"]] == [f"shard-0000{i}.h5" for i in range(5)]
    assert [shard["num_images"] for shard in manifest["shards"]] == [16, 16, 16, 16, 6]
    assert manifest["dataset"]["files"]["boxes"]["sha256"] == hashlib.sha256(split["boxes"].read_bytes()).hexdigest()
    hierarchy = read_hierarchy(open_images_set["hierarchy"], open_images_set["classes"])
    assert [c["label_name"] for c in manifest["dataset"]["categories"]] == list(hierarchy.names)
    assert dataset.categories == [{"id": i, "name": name} for i, name in enumerate(hierarchy.display_names)]

    truth = read_ground_truth(split["boxes"], split["labels"], hierarchy)
    group_of_images = 0
    for index in range(len(dataset)):
        record = dataset[index]
        image_id = Path(record["file_name"]).stem
        photo = Image.open(split["images"] / record["file_name"])
        assert record["image"].shape == (photo.height, photo.width, 3)
        assert (record["height"], record["width"]) == (photo.height, photo.width)
        assert dataset.read_bytes(index).tobytes() == (split["images"] / record["file_name"]).read_bytes()
        # the files' fractions x the JPEG header's size = the shard's pixel boxes
        rows = truth.boxes.image == truth.image_ids.index(image_id)
        corners = truth.boxes.boxes[rows]
        xywh = np.stack([corners[:, 0] * photo.width, corners[:, 1] * photo.height,
                         (corners[:, 2] - corners[:, 0]) * photo.width,
                         (corners[:, 3] - corners[:, 1]) * photo.height], axis=1)
        np.testing.assert_allclose(record["boxes"], xywh, rtol=1e-6, atol=1e-4)
        assert record["category_ids"].tolist() == truth.boxes.label[rows].tolist()
        assert record["iscrowd"].tolist() == truth.boxes.group_of[rows].tolist()
        assert record["flags"][:, FLAG_COLUMNS.index("IsGroupOf")].tolist() == truth.boxes.group_of[rows].astype(int).tolist()
        assert set(record["flags"].ravel().tolist()) <= {0, 1}
        labels = truth.image_labels.image == truth.image_ids.index(image_id)
        present = truth.image_labels.positive[labels]
        assert sorted(record["positive_labels"].tolist()) == sorted(truth.image_labels.label[labels][present].tolist())
        assert sorted(record["negative_labels"].tolist()) == sorted(truth.image_labels.label[labels][~present].tolist())
        assert len(record["negative_labels"]) == 2
        group_of_images += bool(record["iscrowd"].any())
        # the metric's ground truth from the shard is the files' (normalised again, to float32's precision)
        np.testing.assert_allclose(image_truth(dataset.annotations(index), photo.height, photo.width).boxes, corners,
                                   atol=1e-6)
    assert group_of_images >= 5, "the set has group-of boxes"

    pack("--out", out, "--export-csv", tmp_path / "exported")
    exported = {name: tmp_path / "exported" / file_name for name, file_name in EXPORTED_FILES.items()}
    assert exported["boxes"].read_bytes() == split["boxes"].read_bytes()
    assert exported["labels"].read_bytes() == split["labels"].read_bytes()
    assert exported["classes"].read_bytes() == Path(open_images_set["classes"]).read_bytes()
    assert json.loads(exported["hierarchy"].read_text()) == json.loads(Path(open_images_set["hierarchy"]).read_text())

    # the ground truth in the shards, fed back as detections (each box, group-of ones too), scores mAP 1
    truths = {Path(str(dataset.file_names[i])).stem: image_truth(dataset.annotations(i), *dataset.image_sizes[i])
              for i in range(len(dataset))}
    detections = {}
    for name, t in truths.items():  # each box for its class and every ancestor class (boxes count for those)
        rows, labels = hierarchy.up.expand(t.labels)
        detections[name] = ImageDetections(t.boxes[rows], np.ones(len(rows)), labels)
    assert evaluate_arrays(hierarchy, truths, detections).mean_ap == 1.0


def test_streaming_in_small_chunks_reads_what_the_metric_reads(open_images_set):
    """Images split across chunks of 3 rows come out whole, the same as one chunk, with the files' digests."""
    split = open_images_set["validation"]
    hierarchy = read_hierarchy(open_images_set["hierarchy"], open_images_set["classes"])
    truth = read_ground_truth(split["boxes"], split["labels"], hierarchy)
    digests = {"boxes": hashlib.sha256(), "labels": hashlib.sha256()}
    small = list(stream_image_rows(split["boxes"], split["labels"], hierarchy, chunk_rows=3, digests=digests))
    whole = list(stream_image_rows(split["boxes"], split["labels"], hierarchy))
    assert tuple(rows.image_id for rows in small) == truth.image_ids == tuple(rows.image_id for rows in whole)
    np.testing.assert_array_equal(np.concatenate([rows.boxes for rows in small]), truth.boxes.boxes)
    np.testing.assert_array_equal(np.concatenate([rows.labels for rows in small]), truth.boxes.label)
    for a, b in zip(small, whole):
        assert a.box_rows == b.box_rows and a.label_rows == b.label_rows
        np.testing.assert_array_equal(a.flags, b.flags)
        np.testing.assert_array_equal(a.box_lines, b.box_lines)
    assert digests["boxes"].hexdigest() == hashlib.sha256(split["boxes"].read_bytes()).hexdigest()
    assert digests["labels"].hexdigest() == hashlib.sha256(split["labels"].read_bytes()).hexdigest()


def test_the_garbage_collector_runs_while_the_stream_is_consumed(open_images_set):
    """The collector is paused only while a chunk of rows is parsed: packing between chunks makes cycles
    (Pillow, h5py), which a paused collector would keep for the whole file (peak memory growing with it)."""
    split = open_images_set["train"]
    hierarchy = read_hierarchy(open_images_set["hierarchy"], open_images_set["classes"])
    enabled = [gc.isenabled() for _ in stream_image_rows(split["boxes"], split["labels"], hierarchy, chunk_rows=5)]
    assert len(enabled) == 70 and all(enabled)


def test_the_packing_benchmark_runs_at_a_tiny_size(tmp_path):
    assert main(["bench", "pack-open-images", "--boxes", "300,600", "--images-per-shard", "20",
                 "--out", str(tmp_path / "bench")]) == 0
    rows = json.loads((tmp_path / "bench" / "pack_open_images.json").read_text())["rows"]
    assert [row["run"].split()[0] for row in rows] == ["imports", "pack", "pack"]
    assert rows[1]["rss_vs_smallest"] == 1.0 and all(row["peak_rss_MiB"] > 0 for row in rows)
    assert rows[2]["boxes"] > rows[1]["boxes"] and rows[2]["images_per_s"] > 0


def _missing_column(paths):
    text = paths["boxes"].read_text()
    paths["boxes"].write_text(text.replace("IsGroupOf", "IsGroup", 1))
    return r"boxes file \S+boxes.csv lacks the column IsGroupOf \(header: ImageID,.*\): give a CSV whose header line names"


def _xmin_above_xmax(paths):
    header, row = csv_rows(paths["boxes"])[0], csv_rows(paths["boxes"])[4]
    xmin, xmax = row[header.index("XMin")], row[header.index("XMax")]
    set_field(paths["boxes"], 5, "XMin", xmax)
    set_field(paths["boxes"], 5, "XMax", xmin)
    return (rf"boxes file \S+boxes.csv line 5: XMin {xmax} > XMax {xmin}: the columns are XMin, XMax, YMin, YMax.*"
            r"swap the two values \(or pass --skip-bad")


def _outside_unit_square(paths):
    set_field(paths["boxes"], 7, "YMax", "1.2")
    return r"boxes file \S+boxes.csv line 7: YMax 1.2 is outside \[0, 1\]: .* clip them to \[0, 1\]"


def _image_file_missing(paths):
    image_id = csv_rows(paths["boxes"])[20][0]
    (paths["images"] / f"{image_id}.jpg").unlink()
    return rf"ImageID {image_id} has no image file \S+/{image_id}.jpg: put it there .* or pass --skip-bad"


def _unknown_label(paths):
    set_field(paths["labels"], 4, "LabelName", "/m/unicorn")
    return r"image labels file \S+labels.csv line 4: LabelName '/m/unicorn' is not in the classes file: use the classes"


def _hierarchy_cycle(paths):
    tree = json.loads(paths["hierarchy"].read_text())
    animal = next(node for node in tree["Subcategory"] if node["LabelName"] == "/m/voc_animal")
    dog = next(node for node in animal["Subcategory"] if node["LabelName"] == "/m/voc_dog")
    dog["Subcategory"] = [{"LabelName": "/m/voc_animal"}]
    paths["hierarchy"].write_text(json.dumps(tree))
    return (r"hierarchy file \S+hierarchy.json: a cycle, each label the parent of the next: /m/voc_(animal|dog) > .*"
            "remove one of these Subcategory entries")


def _unsorted(paths):
    rows = csv_rows(paths["boxes"])
    first_other = next(i for i, row in enumerate(rows) if i > 1 and row[0] != rows[1][0])
    rows[1], rows[first_other] = rows[first_other], rows[1]
    paths["boxes"].write_text("".join(",".join(row) + "\n" for row in rows))
    return (rf"boxes file \S+boxes.csv line 3: ImageID '{rows[2][0]}' comes after '{rows[1][0]}' \(line 2\): the file "
            r"must be sorted by ImageID, as the official files are; sort it")


BAD_INPUTS = {"missing column": _missing_column, "XMin > XMax": _xmin_above_xmax,
              "outside [0, 1]": _outside_unit_square, "no image file": _image_file_missing,
              "unknown LabelName": _unknown_label, "hierarchy cycle": _hierarchy_cycle, "unsorted": _unsorted}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_file_and_line_or_image_and_writes_no_shard(open_images_set, tmp_path, case):
    paths = split_copy(open_images_set, tmp_path)
    expected = BAD_INPUTS[case](paths)
    out = tmp_path / "shards"
    with pytest.raises(UserError, match=expected) as caught:
        pack(*inputs(paths, out))
    assert "\n" not in str(caught.value)
    assert no_shard_written(out), sorted(p.name for p in out.iterdir())


def test_skip_bad_leaves_out_bad_rows_and_images_and_counts_them(open_images_set, tmp_path):
    paths = split_copy(open_images_set, tmp_path)
    _xmin_above_xmax(paths)
    _outside_unit_square(paths)
    _unknown_label(paths)
    bad_rows = {("boxes", 5), ("boxes", 7), ("labels", 4)}
    missing = csv_rows(paths["boxes"])[20][0]
    (paths["images"] / f"{missing}.jpg").unlink()
    out = tmp_path / "shards"
    pack(*inputs(paths, out, "--skip-bad", "--images-per-shard", "20"))
    manifest = read_manifest(out)
    counts = manifest["dataset"]["counts"]
    assert (counts["skipped_rows"], counts["skipped_images"], manifest["num_skipped"]) == (3, 1, 4)
    rows_skipped = {(Path(s["file_name"]).stem, s["line"]) for s in manifest["skipped"] if "line" in s}
    assert rows_skipped == bad_rows
    assert all(s["reason"] and s["image_id"] for s in manifest["skipped"])
    image_skip = next(s for s in manifest["skipped"] if "line" not in s)
    assert image_skip["image_id"] == missing and "has no image file" in image_skip["reason"]
    dataset = ShardDataset(str(out))
    assert len(dataset) == 69 and f"{missing}.jpg" not in set(dataset.file_names.tolist())
    pack("--out", out, "--export-csv", tmp_path / "exported")
    exported = csv_rows(tmp_path / "exported" / "boxes.csv")
    source = csv_rows(paths["boxes"])
    kept = [row for line, row in enumerate(source, start=1) if line not in (5, 7) and row[0] != missing]
    assert exported == kept


def test_resume_keeps_finished_shards_repacks_changed_ones_and_drops_stale_ones(open_images_set, tmp_path):
    paths = split_copy(open_images_set, tmp_path)
    per_shard = ["--images-per-shard", "16"]
    pack(*inputs(paths, tmp_path / "clean", *per_shard))
    clean_manifest = (tmp_path / "clean" / MANIFEST_NAME).read_text()

    # a missing image in shard 3 stops the run there: shards 0-2 complete, nothing of shard 3, no manifest
    out = tmp_path / "shards"
    image_ids = sorted({row[0] for row in csv_rows(paths["boxes"])[1:]} | {row[0] for row in csv_rows(paths["labels"])[1:]})
    in_shard_3 = paths["images"] / f"{image_ids[3 * 16 + 2]}.jpg"
    target = in_shard_3.readlink()
    in_shard_3.unlink()
    with pytest.raises(UserError, match="has no image file"):
        pack(*inputs(paths, out, *per_shard))
    assert sorted(p.name for p in out.iterdir()) == [f"shard-0000{i}.h5{suffix}" for i in range(3) for suffix in ("", ".json")]
    inodes = {i: (out / f"shard-0000{i}.h5").stat().st_ino for i in range(3)}

    in_shard_3.symlink_to(target)
    pack(*inputs(paths, out, *per_shard))
    assert {i: (out / f"shard-0000{i}.h5").stat().st_ino for i in range(3)} == inodes
    assert (out / MANIFEST_NAME).read_text() == clean_manifest

    # a changed row repacks its shard alone
    rows = csv_rows(paths["boxes"])
    line = next(n for n, row in enumerate(rows, start=1) if n > 1 and row[0] == image_ids[16 + 1])
    set_field(paths["boxes"], line, "IsOccluded", "-1")
    before = {i: (out / f"shard-0000{i}.h5").stat().st_ino for i in range(5)}
    pack(*inputs(paths, out, *per_shard))
    after = {i: (out / f"shard-0000{i}.h5").stat().st_ino for i in range(5)}
    assert [i for i in range(5) if after[i] != before[i]] == [1]
    dataset = ShardDataset(str(out), verify_checksums=True)
    index = int(np.flatnonzero(dataset.file_names == f"{image_ids[17]}.jpg")[0])
    assert (dataset.annotations(index)["flags"][:, FLAG_COLUMNS.index("IsOccluded")] == -1).any()

    # fewer images: the shards past the new end are removed
    keep = set(image_ids[:20])
    for name in ("boxes", "labels"):
        rows = csv_rows(paths[name])
        paths[name].write_text("".join(",".join(row) + "\n" for row in rows[:1] + [r for r in rows[1:] if r[0] in keep]))
    pack(*inputs(paths, out, *per_shard))
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.h5", "shard-00000.h5.json",
                                                          "shard-00001.h5", "shard-00001.h5.json"]
    assert len(ShardDataset(str(out))) == 20


def test_a_corrupt_jpeg_body_is_packed_by_its_header_and_named_when_decoded(open_images_set, tmp_path):
    """Sizes come from headers only: a truncated JPEG packs, and reading it is a CorruptRecordError naming the
    image (or, with skip_corrupt, None), never a decoder's traceback."""
    paths = split_copy(open_images_set, tmp_path)
    image_id = csv_rows(paths["boxes"])[1][0]
    photo = paths["images"] / f"{image_id}.jpg"
    data = photo.read_bytes()
    photo.unlink()
    photo.write_bytes(data[:len(data) // 3])
    pack(*inputs(paths, tmp_path / "shards"))
    with pytest.raises(CorruptRecordError, match=r"Undecodable image: image id 0 in \S+shard-00000.h5 .*: its image "
                                                 r"does not decode \(image file is truncated"):
        ShardDataset(str(tmp_path / "shards"))[0]
    assert ShardDataset(str(tmp_path / "shards"), skip_corrupt=True)[0] is None


def test_the_challenge_subset_keeps_its_classes_and_counts_the_rows_left_out(open_images_set, tmp_path):
    paths = split_copy(open_images_set, tmp_path)
    dropped = {"/m/voc_cow", "/m/voc_sofa"}
    classes = [row for row in csv_rows(paths["classes"]) if row[0] not in dropped]
    subset = tmp_path / "subset.csv"
    subset.write_text("".join(",".join(row) + "\n" for row in classes))
    tree = json.loads(paths["hierarchy"].read_text())

    def prune(node):
        node["Subcategory"] = [prune(child) for child in node.get("Subcategory", []) if child["LabelName"] not in dropped]
        return node

    paths["hierarchy"].write_text(json.dumps(prune(tree)))
    out = tmp_path / "shards"
    pack(*inputs(paths, out, "--subset", subset))
    dataset = ShardDataset(str(out))
    assert [c["label_name"] for c in dataset.manifest["dataset"]["categories"]] == [row[0] for row in classes]
    left_out = sum(row[2] in dropped for name in ("boxes", "labels") for row in csv_rows(paths[name])[1:])
    assert left_out > 0 and dataset.manifest["dataset"]["counts"]["outside_subset"] == left_out
    assert dataset.manifest["num_annotations"] == sum(row[2] not in dropped for row in csv_rows(paths["boxes"])[1:])


@pytest.mark.parametrize("extra, says", [
    (["--shards", "3"], "use --images-per-shard N .* instead of --shards and --shard-size"),
    (["--coco-json", "x.json"], "--coco-json packs COCO, --boxes --labels --classes --hierarchy Open Images"),
    (["--images-per-shard", "0"], r"Invalid --images-per-shard: 0; use a positive count"),
])
def test_options_that_do_not_fit_open_images_are_one_line(open_images_set, tmp_path, extra, says):
    paths = split_copy(open_images_set, tmp_path)
    with pytest.raises(UserError, match=says):
        pack(*inputs(paths, tmp_path / "shards"), *extra)
    header_only = tmp_path / "empty"
    header_only.mkdir()
    for name in ("boxes", "labels"):
        (header_only / f"{name}.csv").write_text(paths[name].read_text().splitlines()[0] + "\n")
    with pytest.raises(UserError, match="name no image; give the files of a split"):
        pack(*inputs({**paths, "boxes": header_only / "boxes.csv", "labels": header_only / "labels.csv"},
                     tmp_path / "empty_shards"))
    with pytest.raises(UserError, match="needs --hierarchy"):
        pack("--boxes", paths["boxes"], "--labels", paths["labels"], "--classes", paths["classes"], "--images",
             paths["images"], "--out", tmp_path / "shards")


def test_exports_are_refused_for_the_other_kind_of_shards(open_images_set, tmp_path, shapes_shards):
    paths = split_copy(open_images_set, tmp_path)
    pack(*inputs(paths, tmp_path / "oi"))
    with pytest.raises(UserError, match="holds open-images shards; export them with --export-csv DIR"):
        pack("--out", tmp_path / "oi", "--export-json", tmp_path / "x.json")
    with pytest.raises(UserError, match="holds coco shards, not Open Images"):
        pack("--out", shapes_shards / "val", "--export-csv", tmp_path / "csv")


@pytest.mark.multirank
def test_mpirun_pack_equals_serial_and_an_image_error_on_rank_1_stops_both(open_images_set, run_megdet, tmp_path):
    if mpirun_skip_reason():
        pytest.skip(mpirun_skip_reason())
    paths = split_copy(open_images_set, tmp_path)
    common = ["pack", *map(str, inputs(paths, tmp_path / "serial", "--images-per-shard", "12"))]
    serial = run_megdet(common, timeout=SUBPROCESS_TIMEOUT_S)
    parallel = run_megdet([*common[:-3], str(tmp_path / "parallel"), *common[-2:]], nprocs=2, launcher="mpirun",
                          timeout=SUBPROCESS_TIMEOUT_S)
    assert serial.returncode == 0 and parallel.returncode == 0, serial.stderr + parallel.stderr
    assert "[rank 1/2] packed shard-00001.h5" in parallel.stdout and "[rank 0/2] packed shard-00002.h5" in parallel.stdout
    assert read_manifest(tmp_path / "parallel") == read_manifest(tmp_path / "serial")  # byte-identical shards

    # an image of shard 3 (rank 1's) has no file: both ranks print one line naming it, no manifest
    image_ids = sorted({row[0] for row in csv_rows(paths["boxes"])[1:]} | {row[0] for row in csv_rows(paths["labels"])[1:]})
    (paths["images"] / f"{image_ids[3 * 12]}.jpg").unlink()
    failed = run_megdet([*common[:-3], str(tmp_path / "failed"), *common[-2:]], nprocs=2, launcher="mpirun",
                        timeout=SUBPROCESS_TIMEOUT_S)
    errors = rank_errors(failed)
    assert failed.returncode != 0 and sorted(errors) == [0, 1], failed.stderr
    assert errors[0].startswith("rank 1 failed") and all(image_ids[36] in line for line in errors.values())
    assert not (tmp_path / "failed" / MANIFEST_NAME).exists()
    assert not list((tmp_path / "failed").glob(".shard-*.partial"))
