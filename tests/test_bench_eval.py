"""``megdet bench eval``: the generated set is shaped like COCO val2017, one tiny run on 1 and 2 real
ranks gives a row per scorer with ours exact, and bad options are one line. Nothing about speed."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter

import numpy as np
import pytest

from megdet.bench import evaluation


def test_the_generated_set_is_shaped_like_coco_val_and_repeats():
    dataset, results = evaluation.synthetic_set(images=500, detections=100, seed=3)
    boxes = dataset["annotations"]
    assert len(dataset["images"]) == 500 and 0.85 * 3650 < len(boxes) < 1.15 * 3650  # 7.3 per image
    assert [c["id"] for c in dataset["categories"]] == list(evaluation.COCO_CATEGORY_IDS)
    classes = Counter(b["category_id"] for b in boxes)
    assert 0.25 < classes[1] / len(boxes) < 0.35 and len(classes) > 60, "person ~30%, a long tail"
    sides = np.sqrt([b["area"] for b in boxes])
    small, large = np.mean(sides < 32), np.mean(sides > 96)
    assert 0.3 < small < 0.5 and 0.2 < large < 0.4, (small, large)
    assert 0.002 < np.mean([b["iscrowd"] for b in boxes]) < 0.03
    assert Counter(r["image_id"] for r in results) == {i: 100 for i in range(1, 501)}
    sizes = {image["id"]: (image["width"], image["height"]) for image in dataset["images"]}
    for box in [b["bbox"] for b in boxes]:
        assert box[2] > 0 and box[3] > 0
    assert all(0 <= b["bbox"][0] and b["bbox"][0] + b["bbox"][2] <= sizes[b["image_id"]][0] + 0.01 for b in boxes)
    assert evaluation.synthetic_set(images=500, detections=100, seed=3) == (dataset, results)


@pytest.mark.multirank
def test_a_tiny_run_gives_each_scorer_a_row_and_ours_is_exact(run_megdet, tmp_path):
    out = tmp_path / "bench"
    done = run_megdet(["bench", "eval", "--images", "30", "--detections", "20", "--ranks", "1,2", "--out", str(out)],
                      timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [(r["scorer"], r["ranks"]) for r in rows] == [("pycocotools", 1), ("faster-coco-eval", 1), ("ours", 1),
                                                        ("ours", 2)]
    for row in rows[2:]:
        assert row["exact"] is True and row["printed_equal"] is True and row["seconds"] > 0, row
        assert sum(int(n) for n in row["detections_per_rank"].split(" / ")) == 30 * 20
        assert len(row["detections_per_rank"].split(" / ")) == row["ranks"]
    faster = rows[1]
    if importlib.util.find_spec("faster_coco_eval") is None:  # not a dependency: measured where installed
        assert faster["seconds"] is None and faster["note"].startswith("not installed"), faster
    else:
        assert faster["printed_equal"] is True and faster["seconds"] > 0, faster
    assert (out / "gt.json").exists() and (out / "eval.md").read_text().startswith("| scorer | ranks |")


@pytest.mark.parametrize("options, message", [
    (["--gt", "gt.json"], "give both --gt and --results"),
    (["--images", "0"], "Invalid --images: 0; need at least 1"),
    (["--ranks", "0,2"], "Invalid --ranks: '0,2'"),
])
def test_bad_options_are_one_line(run_megdet, tmp_path, options, message):
    done = run_megdet(["bench", "eval", *options, "--out", str(tmp_path / "bench")], timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
