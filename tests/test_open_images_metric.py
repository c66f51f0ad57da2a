"""The Open Images challenge metric (``megdet.engine.open_images_metric``): one hand-worked case per
rule, with the arithmetic beside it; a case that mixes all the rules, through the files, the command
line and the in-memory API; each bad input as one line naming the file, the line and the fix; the
synthetic set and its benchmark at a tiny size.

Boxes are (xmin, ymin, xmax, ymax), normalised. In the comments, P@k is the precision at rank k, and
AP = (sum of the precision envelope at each true positive) / (number of boxes)."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hpc.errors import UserError
from megdet.cli import main
from megdet.data import open_images
from megdet.data.open_images import ClassHierarchy
from megdet.data.open_images_synth import BOX_HEADER, synthetic_hierarchy, write_synthetic_open_images
from megdet.engine.open_images_metric import (METRICS_FILE, ImageDetections, ImageTruth, evaluate_arrays,
                                              evaluate_files)
from tests.multirank import REPO, base_env


def flat(*names):
    """Classes with no hierarchy."""
    return ClassHierarchy(names, [[] for _ in names])


def truth(h, boxes=(), positive=(), negative=()):
    """One image: boxes [(class, (xmin, ymin, xmax, ymax), group_of)], image-level labels by class name."""
    return ImageTruth(np.array([box for _, box, _ in boxes], float).reshape(-1, 4),
                      np.array([h.index[name] for name, _, _ in boxes], int),
                      np.array([group_of for _, _, group_of in boxes], bool),
                      np.array([h.index[name] for name in positive], int),
                      np.array([h.index[name] for name in negative], int))


def detections(h, rows):
    """One image: [(class, score, (xmin, ymin, xmax, ymax))]."""
    return ImageDetections(np.array([box for _, _, box in rows], float).reshape(-1, 4),
                           np.array([score for _, score, _ in rows], float),
                           np.array([h.index[name] for name, _, _ in rows], int))


def ap(result, name):
    return result.average_precision[result.class_names.index(name)]


def test_ap_is_the_area_under_the_precision_envelope_at_iou_one_half():
    h = flat("a")
    boxes = [(.0, .0, .5, .5), (.5, .5, 1., 1.), (.0, .5, .5, 1.), (.5, .0, 1., .5)]
    dets = [("a", .9, boxes[0]),               # TP            P@1 = 1/1
            ("a", .8, (.9, .9, 1., 1.)),       # FP (no box)   P@2 = 1/2
            ("a", .7, (.5, .5, 1., .74)),      # FP: IoU .12/.25 = .48 < .5 with box 1, which stays missed
            ("a", .6, (.0, .5, .5, .75)),      # TP: IoU .125/.25 = .5 exactly, >= .5     P@4 = 2/4
            ("a", .5, boxes[3])]               # TP                                       P@5 = 3/5
    result = evaluate_arrays(h, {"i": truth(h, [("a", b, False) for b in boxes])}, {"i": detections(h, dets)})
    # envelope: rank 1: 1; rank 4: max(2/4, 3/5) = 3/5; rank 5: 3/5.  AP = (1 + 3/5 + 3/5) / 4 boxes = 0.55
    assert ap(result, "a") == pytest.approx(0.55, abs=1e-12)
    assert result.detections["scored"] == 5


def test_map_averages_the_classes_that_have_boxes():
    h = flat("a", "b", "c")
    image = truth(h, [("a", (.1, .1, .5, .5), False), ("b", (.5, .5, .9, .9), False)], negative=["c"])
    dets = [("a", .9, (.1, .1, .5, .5)),      # a: TP, AP 1
            ("c", .8, (.5, .5, .9, .9))]      # c: verified absent, so a FP; c has no box: not in the mean
    result = evaluate_arrays(h, {"i": image}, {"i": detections(h, dets)})
    # b has a box and no detection: AP 0, in the mean.  mAP = (1 + 0) / 2 = 0.5
    assert (ap(result, "a"), ap(result, "b")) == (1.0, 0.0) and np.isnan(ap(result, "c"))
    assert result.mean_ap == 0.5
    assert result.num_boxes.tolist() == [1, 1, 0] and result.detections["scored"] == 2


def pets():
    """animal > dog, animal > cat, pet > dog: dog has two parents."""
    return ClassHierarchy(["animal", "dog", "cat", "pet"], [[], [0, 3], [0], []])


def test_boxes_expand_to_every_ancestor_and_detections_do_not():
    h = pets()
    dog, cat = (.1, .1, .4, .4), (.5, .5, .9, .9)
    image = truth(h, [("dog", dog, False), ("cat", cat, False)])
    dets = [("dog", .9, dog),        # dog: TP
            ("animal", .8, cat),     # animal: TP on the cat box's animal copy
            ("pet", .7, dog)]        # pet: TP on the dog box's pet copy (the second parent)
    result = evaluate_arrays(h, {"i": image}, {"i": detections(h, dets)})
    # animal has 2 boxes (copies of dog and cat); the dog detection is not an animal detection, so the
    # dog box's animal copy is missed: animal AP = 1 / 2.  cat: 1 box, no detection: 0.  pet, dog: 1.
    assert result.num_boxes.tolist() == [2, 1, 1, 1]
    assert [ap(result, c) for c in ("animal", "dog", "cat", "pet")] == [0.5, 1.0, 0.0, 1.0]


def test_image_labels_expand_positives_up_and_negatives_down():
    h = pets()
    dog = (.1, .1, .4, .4)
    images = {"boxed": truth(h, [("dog", dog, False)]),
              "no_animal": truth(h, negative=["animal"]),   # verifies animal, dog and cat absent (not pet)
              "a_cat": truth(h, positive=["cat"])}          # verifies cat and animal present (no box)
    dets = {"boxed": detections(h, [("dog", .9, dog), ("animal", .8, dog)]),
            "no_animal": detections(h, [("dog", .95, dog), ("pet", .99, dog)]),   # dog: FP; pet: ignored
            "a_cat": detections(h, [("animal", .85, dog), ("dog", .97, dog)])}    # animal: FP; dog: ignored
    result = evaluate_arrays(h, images, dets)
    # dog:    .95 FP, .9 TP (P@2 = 1/2): AP = 1/2 over 1 box
    # animal: .85 FP, .8 TP (P@2 = 1/2): AP = 1/2 over 1 box (the dog box's copy)
    # pet:    .99 ignored (pet is not below animal), so the pet copy of the dog box is missed: AP 0
    assert [ap(result, c) for c in ("dog", "animal", "pet")] == [0.5, 0.5, 0.0]
    assert result.detections["unverified"] == 2


def test_only_verified_classes_are_evaluated():
    h = flat("a", "b")
    box = (.2, .2, .6, .6)
    images = {"one": truth(h, [("a", box, False)]), "two": truth(h, [("b", box, False)])}
    dets = {"one": detections(h, [("b", .9, box), ("a", .5, box)]),   # b is not verified on "one": ignored
            "two": detections(h, [("a", .8, box), ("b", .4, box)])}   # a is not verified on "two": ignored
    result = evaluate_arrays(h, images, dets)
    # ignored, a's .8 and b's .9 leave each class one detection, a TP: AP 1 each.  Counted as FPs they
    # would rank first: a .8 FP, .5 TP -> 1/2; b .9 FP, .4 TP -> 1/2.
    assert (ap(result, "a"), ap(result, "b")) == (1.0, 1.0)
    assert result.detections == {"scored": 2, "in_group_of": 0, "unverified": 2, "empty_box": 0, "over_limit": 0}


def test_a_group_of_box_is_one_true_positive_with_its_best_score_and_a_missed_one_counts():
    h = flat("a")
    group, unseen, ordinary = (.0, .0, .5, .5), (.0, .6, .3, .9), (.6, .6, .9, .9)
    image = truth(h, [("a", group, True), ("a", unseen, True), ("a", ordinary, False)])
    dets = [("a", .9, (.1, .1, .3, .3)),      # inside the group-of box: its TP, with score .9
            ("a", .88, (.95, .0, 1., .05)),   # FP
            ("a", .85, (.2, .2, .4, .4)),     # inside the group-of box too: ignored
            ("a", .8, ordinary),              # TP
            ("a", .4, (.4, .4, .7, .7))]      # FP: .01 of its .09 inside the group-of box (< .5)
    result = evaluate_arrays(h, {"i": image}, {"i": detections(h, dets)})
    # ranked: .9 TP (P@1 = 1), .88 FP, .8 TP (P@3 = 2/3), .4 FP; 3 boxes, the unseen group-of box missed:
    # AP = (1 + 2/3) / 3 = 5/9.  Had the group-of TP taken the .85 joiner's score: .88 FP, .85 TP, .8 TP
    # -> (2/3 + 2/3) / 3 = 4/9; had .85 been an FP: .9 TP, .88 FP, .85 FP, .8 TP -> (1 + 2/4) / 3 = 1/2.
    assert ap(result, "a") == pytest.approx(5 / 9, abs=1e-12)
    assert result.detections["in_group_of"] == 2 and result.detections["scored"] == 3


def test_a_duplicate_of_a_matched_box_inside_a_group_of_box_joins_it():
    """As in the reference: the group-of stage takes every detection that is not a true positive."""
    h = flat("a")
    group, inside = (.0, .0, .5, .5), (.1, .1, .2, .2)
    image = truth(h, [("a", group, True), ("a", inside, False)])
    dets = [("a", .95, inside), ("a", .6, inside)]  # the second finds its box taken, then joins the group
    result = evaluate_arrays(h, {"i": image}, {"i": detections(h, dets)})
    # ranked: .95 TP, .6 TP (the group-of box): AP = (1 + 1) / 2 = 1
    assert ap(result, "a") == 1.0 and result.detections["in_group_of"] == 1


def test_each_box_is_matched_once_and_a_detection_does_not_fall_back_to_its_second_best():
    h = flat("a")
    left, right = (.0, .0, .4, .4), (.2, .0, .6, .4)
    image = truth(h, [("a", left, False), ("a", right, False)])
    dets = [("a", .9, left),                 # TP: takes the left box
            ("a", .8, (.08, .0, .48, .4))]   # IoU .667 with left (taken), .538 with right: FP
    result = evaluate_arrays(h, {"i": image}, {"i": detections(h, dets)})
    # ranked: .9 TP, .8 FP; the right box is missed: AP = 1 / 2 boxes = 0.5 (COCO's matching would give 1)
    assert ap(result, "a") == 0.5


def test_the_in_memory_api_refuses_arrays_that_break_its_contract():
    h = flat("a")
    image = truth(h, [("a", (.1, .1, .2, .2), False)])
    unknown_class = detections(h, [("a", .5, (.1, .1, .2, .2))])._replace(labels=np.array([3]))
    with pytest.raises(ValueError, match=r"Invalid detection labels: \[3\]"):
        evaluate_arrays(h, {"i": image}, {"i": unknown_class})
    with pytest.raises(ValueError, match="Invalid ground-truth boxes"):
        evaluate_arrays(h, {"i": truth(h, [("a", (.3, .1, .2, .2), False)])}, {})
    with pytest.raises(UserError, match="detections for 1 images without ground truth"):
        evaluate_arrays(h, {"i": image}, {"j": ImageDetections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))})


CLASSES = [("/m/animal", "Animal"), ("/m/dog", "Dog"), ("/m/cat", "Cat"), ("/m/pet", "Pet"),
           ("/m/vehicle", "Vehicle"), ("/m/car", "Car")]
HIERARCHY = {"LabelName": "/m/entity", "Subcategory": [
    {"LabelName": "/m/animal", "Subcategory": [{"LabelName": "/m/dog"}, {"LabelName": "/m/cat"}]},
    {"LabelName": "/m/pet", "Subcategory": [{"LabelName": "/m/dog"}]},
    {"LabelName": "/m/vehicle", "Subcategory": [{"LabelName": "/m/car"}]}]}
D1, GROUP, C1, K1 = (.1, .1, .4, .4), (.5, .5, 1., 1.), (.2, .2, .6, .6), (.6, .0, .9, .3)
# (ImageID, LabelName, box, IsGroupOf)
BOXES = [("img1", "/m/dog", D1, 0), ("img1", "/m/car", GROUP, 1), ("img2", "/m/cat", C1, 0), ("img2", "/m/car", K1, 0)]
# (ImageID, LabelName, Confidence)
LABELS = [("img1", "/m/cat", 0), ("img1", "/m/vehicle", 1), ("img2", "/m/dog", 0), ("img3", "/m/animal", 0),
          ("img3", "/m/car", 1)]
# (ImageID, LabelName, Score, box)
DETECTIONS = [
    ("img1", "/m/dog", .9, D1), ("img1", "/m/animal", .8, D1), ("img1", "/m/pet", .7, (.12, .1, .42, .4)),
    ("img1", "/m/cat", .85, D1), ("img1", "/m/car", .6, (.6, .6, .8, .8)), ("img1", "/m/car", .75, (.55, .7, .95, .95)),
    ("img1", "/m/vehicle", .65, (.7, .55, .9, .75)), ("img1", "/m/car", .5, (.0, .6, .2, .8)),
    ("img1", "/m/dog", .3, D1), ("img1", "/m/dog", .99, (.2, .2, .2, .5)),
    ("img2", "/m/cat", .8, C1), ("img2", "/m/animal", .9, C1), ("img2", "/m/dog", .92, C1), ("img2", "/m/pet", .88, C1),
    ("img2", "/m/car", .4, K1), ("img2", "/m/vehicle", .3, (.0, .7, .1, .8)),
    ("img3", "/m/cat", .7, (.3, .3, .5, .5)), ("img3", "/m/pet", .95, (.3, .3, .5, .5)),
    ("img3", "/m/car", .55, (.1, .1, .3, .3)), ("img3", "/m/vehicle", .45, (.1, .1, .3, .3)),
    ("img3", "/m/animal", .85, (.3, .3, .5, .5))]
# Hand-worked. Expanded boxes: dog D1 -> dog, animal, pet; car GROUP (group-of) -> car, vehicle;
# cat C1 -> cat, animal; car K1 -> car, vehicle.  Verified: img1 dog animal pet car vehicle (boxes), cat
# (negative), vehicle (positive); img2 cat animal car vehicle (boxes), dog (negative); img3 animal dog cat
# (animal negative, expanded down), car vehicle (car positive, expanded up).  Pet is verified on img1 only.
#   dog      .99 dropped (zero width); .92 FP (img2, negative), .9 TP, .3 FP (D1 taken)  -> 1/2 / 1      = 0.5
#   animal   .9 TP (C1), .85 FP (img3, negative), .8 TP (D1): P 1, 2/3                  -> (1 + 2/3) / 2 = 5/6
#   pet      .95, .88 ignored (not verified on img3, img2); .7 TP (IoU .875)            -> 1 / 1        = 1
#   cat      .85 FP (img1, negative), .8 TP, .7 FP (img3, animal negative)              -> 1/2 / 1      = 0.5
#   car      .75 and .6 join GROUP: one TP at .75; .55 FP (img3, positive, no box), .5 FP, .4 TP (K1): P 1, 2/4
#                                                                                       -> (1 + 1/2) / 2 = 0.75
#   vehicle  .65 joins GROUP's copy: TP; .45 FP (img3), .3 FP; K1's copy missed        -> 1 / 2        = 0.5
#   mAP = (0.5 + 5/6 + 1 + 0.5 + 0.75 + 0.5) / 6 = 0.680556
EXPECTED_AP = {"/m/dog": 0.5, "/m/animal": 5 / 6, "/m/pet": 1.0, "/m/cat": 0.5, "/m/car": 0.75, "/m/vehicle": 0.5}
# The TF Object Detection API's evaluator (OpenImagesDetectionChallengeEvaluator, ground truth expanded
# by oid_hierarchical_labels_expansion.py; its NumPy code run by hand outside this repository) gives
# the same six APs and mAP 0.6805555555555556 for these files (docs/open_images.md).
EXPECTED_MAP = 0.6805555555555556
EXPECTED_COUNTS = {"scored": 15, "in_group_of": 3, "unverified": 2, "empty_box": 1, "over_limit": 0}



def write_case(folder, *, boxes=BOXES, labels=LABELS, detections=DETECTIONS, hierarchy=HIERARCHY, classes=CLASSES,
               box_header=BOX_HEADER):
    """The mixed case as the official files in ``folder``: {CLI option: path}."""
    def corners(box):
        xmin, ymin, xmax, ymax = box
        return f"{xmin},{xmax},{ymin},{ymax}"  # the files' column order: XMin, XMax, YMin, YMax

    paths = {name: folder / name for name in ("boxes.csv", "labels.csv", "results.csv", "hierarchy.json",
                                                "classes.csv")}
    paths["boxes.csv"].write_text("\n".join([box_header] + [f"{i},xclick,{label},1,{corners(box)},0,0,{g},0,0"
                                                            for i, label, box, g in boxes]) + "\n")
    paths["labels.csv"].write_text("\n".join(["ImageID,Source,LabelName,Confidence"] +
                                             [f"{i},verification,{label},{c}" for i, label, c in labels]) + "\n")
    paths["results.csv"].write_text("\n".join(["ImageID,LabelName,Score,XMin,XMax,YMin,YMax"] +
                                              [f"{i},{label},{s},{corners(box)}" for i, label, s, box in detections])
                                    + "\n")
    paths["hierarchy.json"].write_text(json.dumps(hierarchy))
    paths["classes.csv"].write_text("".join(f"{name},{display}\n" for name, display in classes))
    return {"--boxes": paths["boxes.csv"], "--labels": paths["labels.csv"], "--results": paths["results.csv"],
            "--hierarchy": paths["hierarchy.json"], "--classes": paths["classes.csv"]}


def evaluate_case(paths):
    return evaluate_files(paths["--boxes"], paths["--labels"], paths["--hierarchy"], paths["--classes"],
                          paths["--results"])


def test_mixed_case_through_the_files_matches_the_hand_worked_and_reference_values(tmp_path):
    result = evaluate_case(write_case(tmp_path))
    assert {name: ap(result, name) for name in EXPECTED_AP} == pytest.approx(EXPECTED_AP, abs=1e-12)
    assert result.mean_ap == pytest.approx(EXPECTED_MAP, abs=1e-12)
    assert result.detections == EXPECTED_COUNTS
    assert result.num_images == 3 and result.num_boxes.tolist() == [2, 1, 1, 1, 2, 2]


def test_mixed_case_through_the_in_memory_api_equals_the_files():
    h = ClassHierarchy([n for n, _ in CLASSES], [[], [0, 3], [0], [], [], [4]], [d for _, d in CLASSES])
    images = sorted({row[0] for row in BOXES + LABELS})
    truth_arrays = {image: ImageTruth(np.array([box for i, _, box, _ in BOXES if i == image]).reshape(-1, 4),
                                      np.array([h.index[label] for i, label, _, _ in BOXES if i == image], int),
                                      np.array([g for i, _, _, g in BOXES if i == image], bool),
                                      np.array([h.index[label] for i, label, c in LABELS if i == image and c], int),
                                      np.array([h.index[label] for i, label, c in LABELS if i == image and not c], int))
                    for image in images}
    detection_arrays = {image: ImageDetections(np.array([box for i, *_, box in DETECTIONS if i == image]),
                                               np.array([s for i, _, s, _ in DETECTIONS if i == image]),
                                               np.array([h.index[label] for i, label, *_ in DETECTIONS if i == image]))
                        for image in images}
    result = evaluate_arrays(h, truth_arrays, detection_arrays)
    assert {name: ap(result, name) for name in EXPECTED_AP} == pytest.approx(EXPECTED_AP, abs=1e-12)
    assert result.mean_ap == pytest.approx(EXPECTED_MAP, abs=1e-12) and result.detections == EXPECTED_COUNTS


def test_the_command_prints_map_and_the_class_table_without_importing_torch(tmp_path):
    paths = write_case(tmp_path)
    argv = ["eval", "--metric", "open-images", *[str(p) for item in paths.items() for p in item],
            "--out", str(tmp_path / "eval")]
    code = textwrap.dedent(f"""
        import sys
        from megdet.cli import main
        status = main({argv!r})
        print("torch imported:", "torch" in sys.modules, "status:", status)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=base_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == ("Open Images mAP@0.5 = 0.6806 over 6 classes with boxes (of 6), 3 images")
    assert "   1  Pet      /m/pet       1.0000       1" in done.stdout  # the best class first
    assert "torch imported: False status: 0" in done.stdout
    metrics = json.loads((tmp_path / "eval" / METRICS_FILE).read_text())
    assert metrics["mAP@0.5"] == pytest.approx(EXPECTED_MAP) and metrics["classes"]["/m/car"]["AP"] == 0.75


def replace_row(rows, index, row):
    return rows[:index] + [row] + rows[index + 1:]


@pytest.mark.parametrize("change, message", [
    (dict(box_header=BOX_HEADER.replace(",IsGroupOf", ",IsGroup")),
     r"boxes file \S+boxes.csv lacks the column IsGroupOf \(header: .*\): give a CSV whose header line names "
     r"ImageID, LabelName, XMin, XMax, YMin, YMax, IsGroupOf"),
    (dict(boxes=replace_row(BOXES, 1, ("img1", "/m/car", (.7, .5, .6, 1.), 1))),
     r"boxes file \S+boxes.csv line 3: XMin 0.7 > XMax 0.6: .* swap the two values"),
    (dict(detections=replace_row(DETECTIONS, 3, ("img1", "/m/cat", .85, (.1, .1, .4, 1.2)))),
     r"results file \S+results.csv line 5: YMax 1.2 is outside \[0, 1\]: .*clip them to \[0, 1\]"),
    (dict(labels=replace_row(LABELS, 0, ("img1", "/m/unicorn", 0))),
     r"image labels file \S+labels.csv line 2: LabelName '/m/unicorn' is not in the classes file: use the classes "
     r"file of the same release"),
    (dict(detections=replace_row(DETECTIONS, 2, ("img1", "/m/unicorn", .7, D1))),
     r"results file \S+results.csv line 4: LabelName '/m/unicorn' is not in the classes file"),
    (dict(detections=replace_row(DETECTIONS, 0, ("img9", "/m/dog", .9, D1))),
     r"results file \S+results.csv line 2: ImageID 'img9' has no ground truth .*: evaluate the detections of the "
     r"ground truth's images"),
    (dict(hierarchy={"LabelName": "/m/entity", "Subcategory": [
        {"LabelName": "/m/animal", "Subcategory": [{"LabelName": "/m/dog", "Subcategory": [{"LabelName": "/m/pet"}]}]},
        {"LabelName": "/m/pet", "Subcategory": [{"LabelName": "/m/animal"}]}]}),
     r"hierarchy file \S+hierarchy.json: a cycle, each label the parent of the next: (/m/\w+ > ){3}/m/\w+: a label "
     r"cannot be its own ancestor"),
    (dict(hierarchy={"LabelName": "/m/entity", "Subcategory": [{"LabelName": "/m/unicorn"}]}),
     r"hierarchy file \S+hierarchy.json: LabelName /m/unicorn \(at /m/entity > /m/unicorn\) is not in the classes "
     r"file \S+classes.csv"),
    (dict(labels=replace_row(LABELS, 4, ("img3", "/m/car", 0.5))),
     r"image labels file \S+labels.csv line 6: Confidence '0.5' is neither 0 nor 1"),
    (dict(classes=CLASSES + [("/m/dog", "Dog again")]),
     r"classes file \S+classes.csv line 7: LabelName /m/dog again \(first on line 2\)"),
])
def test_bad_input_is_one_line_naming_the_file_the_line_and_the_fix(tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        evaluate_case(write_case(tmp_path, **change))


def test_a_score_that_is_not_a_number_names_its_line(tmp_path):
    paths = write_case(tmp_path)
    text = paths["--results"].read_text().replace("img2,/m/cat,0.8,", "img2,/m/cat,high,")
    paths["--results"].write_text(text)
    with pytest.raises(UserError, match=r"results file \S+ line 12: Score 'high' is not a number"):
        evaluate_case(paths)


def test_the_command_line_refuses_a_mixed_up_call_in_one_line(run_megdet, tmp_path):
    paths = write_case(tmp_path)
    done = run_megdet(["eval", "--boxes", str(paths["--boxes"]), "--gt", "x.json", "--results", "y.json"], timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--boxes belongs to the Open Images metric: add --metric open-images, or drop them for COCO" in done.stderr
    done = run_megdet(["eval", "--metric", "open-images", "--boxes", str(paths["--boxes"])], timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--metric open-images needs --labels" in done.stderr and "--results (the detections CSV)" in done.stderr
    done = run_megdet(["eval", "--metric", "open-images",
                       *[str(p) for item in write_case(tmp_path, boxes=replace_row(
                           BOXES, 0, ("img1", "/m/dog", (.1, .1, .4, -.1), 0))).items() for p in item]], timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "boxes.csv line 2: YMax -0.1 is outside [0, 1]" in done.stderr


def test_the_hierarchy_reader_keeps_every_parent_and_skips_the_top_node(tmp_path):
    h = open_images.read_hierarchy(write_case(tmp_path)["--hierarchy"], tmp_path / "classes.csv")
    name = h.names.index
    assert h.parents[name("/m/dog")] == (name("/m/animal"), name("/m/pet"))
    assert h.parents[name("/m/animal")] == ()  # under the top node, which is no class
    dog_and_up = h.up.members[h.up.offsets[name("/m/dog")]:h.up.offsets[name("/m/dog") + 1]]
    assert sorted(h.names[c] for c in dog_and_up) == ["/m/animal", "/m/dog", "/m/pet"]


def test_synthetic_set_reads_back_and_its_benchmark_runs_at_a_tiny_size(tmp_path):
    paths = write_synthetic_open_images(tmp_path / "set", images=12, detections_per_image=7, seed=3)
    hierarchy = open_images.read_hierarchy(paths["hierarchy"], paths["classes"])
    assert hierarchy.names == synthetic_hierarchy().names
    truth_files = open_images.read_ground_truth(paths["boxes"], paths["labels"], hierarchy)
    assert len(open_images.read_detections(paths["results"], truth_files, hierarchy).label) == 12 * 7
    assert main(["bench", "open-images", "--images", "12", "--detections-per-image", "7",
                 "--out", str(tmp_path / "bench")]) == 0
    rows = json.loads((tmp_path / "bench" / "open_images.json").read_text())["rows"]
    assert [row["stage"] for row in rows] == ["write_synthetic_set", "read_ground_truth", "read_detections",
                                              "evaluate", "megdet eval (the three)"]
