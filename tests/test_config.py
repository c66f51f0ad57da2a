"""Presets match the papers' tables; config errors are one-line UserErrors naming the key and the fix."""
import math
import re

import pytest

from hpc.errors import UserError
from megdet import config
from tests.multirank import MEGDET, REPO

SEEDS = REPO.parent / "shared" / "seeds"
PAPER_PRESETS = [name for name in config.PRESETS if not name.startswith("shapes_")]  # the demos are no paper row


def paper_text(prefix):
    paths = sorted(SEEDS.glob(f"{prefix}_*.txt"))
    if not paths:
        pytest.skip(f"the papers are absent from {SEEDS}")
    return paths[0].read_text()


def one_line_error(match, function, *args):
    with pytest.raises(UserError, match=match) as caught:
        function(*args)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_every_preset_loads_fits_its_paper_world_and_cites_its_row():
    assert set(config.PRESETS) >= {"megdet_r50_fpn_bs16", "megdet_r50_fpn_bs256_bn32", "megdet_r50_fpn_bs256_bn32_long",
                                   "largedet_r50_fpn_bs256_pmdlamb", "largedet_r50_fpn_bs512_pmdlamb",
                                   "largedet_r50_fpn_bs1056_pmdlamb", "largedet_coco_12min", "shapes_r18_cpu"}
    for name in config.PRESETS:
        cfg = config.load(name)
        assert cfg.name == name and cfg.paper.row
        cfg.check_world(cfg.paper.gpus, min(cfg.paper.gpus, cfg.paper.gpus_per_node))
        assert cfg.train.output_dir == f"runs/{name}"
    for name in PAPER_PRESETS:
        cfg = config.load(name)
        # MegDet Sec. 4 / LargeDet Sec. 4.1: 0.02 for batch 16, scaled linearly; the "half" rows take half.
        half = "half" in cfg.paper.row
        assert cfg.solver.lr == pytest.approx((0.01 if half else 0.02) * cfg.solver.batch_size / 16), name
        depth = 101 if "Res101" in cfg.paper.row else 50
        assert cfg.model.name == ("mask_rcnn_r50_fpn" if "Mask" in cfg.paper.row else f"resnet{depth}_fpn")
        # COCO's 80 classes; Open Images (Table 5): the shards' classes, filled in at the start
        assert cfg.model.num_classes == (None if "Table 5" in cfg.paper.row else 80)
        # Both papers start from ImageNet weights (MegDet Sec. 4, LargeDet Sec. 4.1) on the paper's GPUs.
        assert cfg.model.backbone_weights == f"torchvision:resnet{depth}" and cfg.paper.gpu_memory_gb in (12, 32)


def test_megdet_presets_match_table_3_and_section_4():
    text = paper_text("003")
    assert "momentum as 0.9 and a weight decay as 0.0001" in text
    for name, label in (("megdet_r50_fpn_bs16", "16-base"), ("megdet_r50_fpn_bs256_bn32", "256"),
                        ("megdet_r50_fpn_bs256_bn32_long", "256 (long)")):
        cfg = config.load(name)
        bn_size = cfg.model.bn_size if cfg.model.norm == "cgbn" else 0
        row = (f"{label}\t{bn_size}\t{cfg.paper.gpus}\t{cfg.paper.box_ap}\t"
               f"{cfg.paper.expected_time.removesuffix(' h')}")
        assert re.search(rf"^{re.escape(row)}$", text, re.M), row
        assert (cfg.solver.optimizer, cfg.solver.momentum, cfg.solver.weight_decay) == ("sgd", 0.9, 0.0001)
        # Policies in epochs of 118,000 images (Sec. 4): normal 8, 10 | 11; long 11, 14, 17 | 18.
        epochs = {"normal": ([8, 10], 11), "long": ([11, 14, 17], 18)}[cfg.solver.policy]
        per_epoch = 118000 / cfg.solver.batch_size
        assert cfg.solver.steps == [round(e * per_epoch) for e in epochs[0]]
        assert cfg.solver.max_iter == round(epochs[1] * per_epoch)
    assert config.load("megdet_r50_fpn_bs256_bn32_long").solver.decay_factors == [0.1, 0.1, 0.5]
    bn32 = config.load("megdet_r50_fpn_bs256_bn32")
    assert bn32.data.images_per_rank == 4 and bn32.bn_groups.group_size == 8
    assert bn32.solver.warmup_factor * bn32.solver.lr == pytest.approx(0.02), "warm-up starts at r (Sec. 3.2)"


def test_largedet_presets_match_tables_2_3_4():
    text = paper_text("002")
    table2 = text.split("**Table 2.**", 1)[1].split("We summarize", 1)[0]
    pmd_rows, batch, gpus = {}, None, None
    for line in table2.splitlines():
        cells = line.split("\t")
        if len(cells) == 4 and cells[0].isdigit():
            batch, gpus = int(cells[0]), int(cells[1])
        if len(cells) == 4 and cells[2] == "PMD-LAMB":
            pmd_rows[batch] = (gpus, float(cells[3]))
    for batch in (256, 512, 1056):
        cfg = config.load(f"largedet_r50_fpn_bs{batch}_pmdlamb")
        assert (cfg.paper.gpus, cfg.paper.box_ap) == pmd_rows[batch]
        assert cfg.solver.batch_size == batch and cfg.solver.optimizer == "pmd_lamb"
        # Sec. 4.1: 90000 iterations, steps 60000 and 80000 at batch 16, shortened in proportion.
        assert cfg.solver.max_iter == round(90000 * 16 / batch + 1e-9)
        assert cfg.solver.steps == [round(60000 * 16 / batch), round(80000 * 16 / batch)]
        assert (cfg.solver.weight_decay, cfg.solver.betas) == (0.0005, [0.9, 0.999])
        assert (cfg.solver.pmd_alpha, cfg.solver.pmd_cycle) == (0.012, 200)  # Table 3's choice
        assert cfg.model.norm == "cgbn"
    fast = config.load("largedet_coco_12min")
    row = re.search(r"^Faster\t(\d+),(\d+)\t(\d+)\tbox:([\d.]+)\t(\S+)$", text, re.M)
    assert fast.solver.steps == [int(row[1]), int(row[2])] and fast.solver.max_iter == int(row[3])
    assert fast.paper.box_ap == float(row[4]) and fast.paper.expected_time == row[5]
    assert "reaches 36.6, we stop" in text and fast.train.target_ap == [36.6]
    assert (fast.solver.batch_size, fast.paper.gpus, fast.solver.lr) == (320, 160, pytest.approx(0.4))
    mask = config.load("largedet_mask_rcnn_coco_17min")
    row = re.search(r"^Mask\t(\d+),(\d+)\t(\d+)\tbox:([\d.]+) seg:([\d.]+)\t(\S+)$", text, re.M)
    assert mask.solver.steps == [int(row[1]), int(row[2])] and mask.solver.max_iter == int(row[3])
    assert mask.paper.box_ap == float(row[4]) and mask.paper.expected_time == row[6]
    assert "the threshold is 37.6 detection mAP@0.5:0.95 and 33.9 segmentation" in text
    assert mask.train.target_ap == [37.6, 33.9] and mask.model.with_masks
    assert (mask.solver.batch_size, mask.paper.gpus, mask.solver.lr) == (320, 160, pytest.approx(0.4))


def table(text, after, header):
    """The tab-separated rows of the table between the header line that starts with ``header`` and the
    text ``after`` it."""
    body = text.split(after, 1)[0].rsplit(header, 1)[-1].split("\n", 1)[1]
    return [line.split("\t") for line in body.splitlines() if "\t" in line]


def megdet_epochs(cfg):
    """MegDet Sec. 4's policies in iterations of 118,000 images: normal 8, 10 | 11; long 11, 14, 17 | 18."""
    steps, end = {"normal": ([8, 10], 11), "long": ([11, 14, 17], 18)}[cfg.solver.policy]
    per_epoch = 118000 / cfg.solver.batch_size
    return [round(e * per_epoch) for e in steps], round(end * per_epoch)


def test_every_row_of_megdet_table_3_is_a_preset():
    text = paper_text("003")
    rows = table(text, "Table 3: Comparisons of training", "Batch size\tBN size")
    assert len(rows) == 20
    for label, bn, gpus, mmap, hours in rows:
        batch = int(label.split()[0].split("-")[0])
        long = "(long)" in label
        name = ("megdet_r50_fpn_bs16" if label == "16-base"
                else f"megdet_r50_fpn_bs{batch}_bn{bn}" + ("_long" if long else ""))
        cfg = config.load(name)
        assert (cfg.solver.batch_size, cfg.paper.gpus, cfg.paper.box_ap) == (batch, int(gpus), float(mmap)), name
        assert cfg.paper.expected_time == f"{hours} h" and cfg.paper.gpus_per_node == 8, name
        assert cfg.data.images_per_rank == batch // int(gpus) and cfg.solver.policy == ("long" if long else "normal")
        if bn == "0":
            assert cfg.model.norm == "frozen"
        elif int(bn) == cfg.data.images_per_rank:  # BN size 2 at 2 images per GPU: each GPU's own batch
            assert cfg.model.norm == "bn"
        else:
            assert (cfg.model.norm, cfg.model.bn_size, cfg.model.bn_node_local) == ("cgbn", int(bn), True), name
            assert cfg.bn_groups.group_size <= 8, "Sec. 3.3: BN inside one 8-GPU machine"
        assert cfg.model.sublinear_stages == (["res3"] if int(bn) >= 32 else []), "Table 3 caption: BN size >= 32"
        assert (cfg.solver.steps, cfg.solver.max_iter) == megdet_epochs(cfg), name
        assert cfg.solver.lr == pytest.approx(0.02 * batch / 16)
        assert cfg.solver.lr * cfg.solver.warmup_factor == pytest.approx(min(0.02, cfg.solver.lr)), "from r (Sec. 3.2)"
        assert cfg.paper.row.startswith("MegDet Table 3") and f"{gpus} GPUs" in cfg.paper.row or label == "16-base"


def test_every_row_of_megdet_table_2_is_a_preset():
    text = paper_text("003")
    rows = table(text, "Table 2: Comparisons of different mini-batch sizes, without BN", "Mini-Batch size\tmmAP")
    assert len(rows) == 5
    for label, mmap, hours in rows:
        batch, half = int(label.split()[0]), "half" in label
        name = "megdet_r50_fpn_bs16" if batch == 16 else f"megdet_r50_fpn_bs{batch}_nobn" + ("_halflr" if half else "")
        cfg = config.load(name)
        assert cfg.model.norm == "frozen" and cfg.solver.batch_size == batch and cfg.solver.optimizer == "sgd"
        assert cfg.solver.lr == pytest.approx((0.01 if half else 0.02) * batch / 16), name
        assert cfg.paper.box_ap == (None if mmap == "failed" else float(mmap)), name
        assert cfg.paper.expected_time == ("" if hours == "_" else f"{hours} h")
        assert (cfg.solver.steps, cfg.solver.max_iter) == megdet_epochs(cfg)
        if batch > 16:  # Sec. 4.1: every row warms up, from r = 0.02
            assert cfg.solver.warmup_iters > 0 and cfg.solver.lr * cfg.solver.warmup_factor == pytest.approx(0.02)


def largedet_schedule(cfg, scale=1.0):
    """LargeDet Sec. 4.1: 90000 iterations, steps at 60000 and 80000 for batch 16, in proportion."""
    k = 16 / cfg.solver.batch_size * scale
    return [round(60000 * k + 1e-9), round(80000 * k + 1e-9)], round(90000 * k + 1e-9)


def test_every_cell_of_largedet_table_1_is_a_preset():
    text = paper_text("002")
    rows = table(text, "For experiments without BN", "Batch Size\tw.o. SyncBN")
    assert len(rows) == 8
    for label, without, with_sync in rows:
        batch, half = int(label.split()[0]), "(half)" in label
        for sync, result in ((False, without), (True, with_sync)):
            name = f"largedet_r50_fpn_bs{batch}_sgd" + ("_syncbn" if sync else "") + ("_half" if half else "")
            cfg = config.load(name)
            assert cfg.solver.optimizer == "sgd" and cfg.solver.batch_size == batch, name
            assert cfg.solver.lr == pytest.approx((0.01 if half else 0.02) * batch / 16), name
            assert cfg.paper.box_ap == (None if result == "failed" else float(result)), name
            assert (cfg.solver.steps, cfg.solver.max_iter) == largedet_schedule(cfg), name
            # Sec. 4.1: "When SyncBN is applied, we set the BN size to 32" (all 16 images at batch 16).
            assert (cfg.model.norm, cfg.model.bn_size) == (("cgbn", min(32, batch)) if sync else ("frozen", None))


def test_every_row_of_largedet_table_2_is_a_preset():
    text = paper_text("002")
    rows = table(text, "We summarize the main results in Table 4.1", "Batch Size\tGPUs\tMethod")
    batch = gpus = None
    for cells in rows:
        batch, gpus = (int(cells[0]), int(cells[1])) if cells[0] else (batch, gpus)
        method, ap = cells[2], float(cells[3])
        suffix = {"SGD": "sgd", "LAMB": "lamb", "PMD-LAMB": "pmdlamb", "PMD-LAMB (1.4x)": "pmdlamb_1.4x"}[method]
        cfg = config.load(f"largedet_r50_fpn_bs{batch}_{suffix}")
        assert (cfg.solver.batch_size, cfg.paper.gpus, cfg.paper.box_ap) == (batch, gpus, ap), method
        assert cfg.data.images_per_rank == batch // gpus and cfg.solver.lr == pytest.approx(0.02 * batch / 16)
        assert (cfg.solver.steps, cfg.solver.max_iter) == largedet_schedule(cfg, 1.4 if "1.4x" in method else 1.0)
        if method == "SGD":
            assert cfg.model.norm == "frozen" and cfg.solver.optimizer == "sgd"
            continue
        assert cfg.model.norm == "cgbn" and cfg.solver.optimizer == "pmd_lamb" and cfg.solver.pmd_alpha == 0.012
        # The paper's LAMB is Table 3's T = infinity (36.2 at batch 256 in both): alpha, no bias correction.
        assert cfg.solver.pmd_cycle == (math.inf if method == "LAMB" else 200)
        assert cfg.bn_groups.group_size * cfg.data.images_per_rank == cfg.model.bn_size
    assert len(rows) == 14


OPEN_IMAGES_V5_TRAIN_IMAGES = 1_743_042


def test_every_row_of_largedet_table_5_is_a_preset():
    """Sec. 4.3: 12 epochs, LR x0.1 and x0.01 at epochs 8 and 11, LR 0.02 / 0.4 / 0.8, multi-scale training."""
    text = paper_text("002")
    section = text.split("### 4.3 Experiments on Open Images", 1)[1]
    assert "We train the detector for 12 epochs, and multiply the learning rate by 0.1 and 0.01 at epoch 8 and 11" \
        in section and "we adopt multi-scale training for all experiments" in section
    rows = table(section, "The results are summarized", "Backbone\tBatchSize")
    assert len(rows) == 6
    backbone = None
    for cells in rows:
        backbone = cells[0] or backbone
        batch, gpus, map50, hours = int(cells[1]), int(cells[2]), float(cells[3]), cells[4]
        depth = backbone.removeprefix("Res")
        cfg = config.load(f"largedet_oi_r{depth}_fpn_bs{batch}")
        assert (cfg.solver.batch_size, cfg.paper.gpus, cfg.paper.open_images_map50) == (batch, gpus, map50)
        assert cfg.paper.expected_time == hours.replace("h", " h") and cfg.paper.box_ap is None
        assert cfg.paper.row == f"LargeDet Table 5, {backbone}, batch {batch}, {gpus} GPUs"
        assert cfg.model.name == f"resnet{depth}_fpn" and cfg.model.backbone_weights == f"torchvision:resnet{depth}"
        assert cfg.solver.lr == pytest.approx({16: 0.02, 320: 0.4, 640: 0.8}[batch])
        assert (cfg.solver.epochs, cfg.solver.step_epochs, cfg.solver.decay_factors) == (12, [8, 11], [0.1, 0.1])
        assert len(cfg.data.min_sizes) > 1, "multi-scale training"
        assert cfg.model.norm == "cgbn" and cfg.data.images_per_rank == batch // gpus
        assert cfg.solver.optimizer == ("sgd" if batch == 16 else "pmd_lamb")
        # the iterations follow from the shards: 12 epochs of Open Images V5's training images
        max_iter, steps = cfg.solver.iterations_for(OPEN_IMAGES_V5_TRAIN_IMAGES)
        per_epoch = OPEN_IMAGES_V5_TRAIN_IMAGES / batch
        assert (max_iter, steps) == (round(12 * per_epoch), [round(8 * per_epoch), round(11 * per_epoch)])


def test_the_shards_fill_in_the_class_count_and_the_iterations_of_an_epochs_preset():
    cfg = config.load("largedet_oi_r50_fpn_bs640")
    cfg.fill_from_shards(num_classes=600, num_images=OPEN_IMAGES_V5_TRAIN_IMAGES)
    assert (cfg.model.num_classes, cfg.solver.max_iter, cfg.solver.steps) == (600, 32682, [21788, 29959])
    given = config.load("largedet_r50_fpn_bs256_pmdlamb")
    given.fill_from_shards(num_classes=7, num_images=1000)  # a preset that gives both keeps them
    assert (given.model.num_classes, given.solver.max_iter) == (80, 5625)
    tiny = config.load("largedet_oi_r50_fpn_bs16", ["solver.warmup_iters=0"])
    one_line_error(r"solver.epochs=12 with solver.step_epochs=\[8.0, 11.0\] over 2 images at solver.batch_size=16 "
                   r"gives max_iter 2 and steps \[1, 1\], which do not decay inside the run: .* solver.epochs=null",
                   lambda: tiny.fill_from_shards(num_classes=600, num_images=2))
    warm = config.load("largedet_oi_r50_fpn_bs16")
    one_line_error(r"solver.warmup_iters=500 must be in \[0, solver.max_iter=90\]",
                   lambda: warm.fill_from_shards(num_classes=600, num_images=120))
    one_line_error(r"solver.step_epochs=\[8.0, 11.0\] needs solver.epochs", config.load,
                   "largedet_oi_r50_fpn_bs16", ["solver.epochs=null"])
    one_line_error(r"solver.step_epochs=\[8.0, 13.0\] must be increasing epochs between 0 and solver.epochs=12",
                   config.load, "largedet_oi_r50_fpn_bs16", ["solver.step_epochs=[8, 13]"])


def test_the_presets_doc_names_every_preset_and_the_table_3_ablations():
    doc = (REPO / "docs" / "presets.md").read_text()
    missing = [name for name in config.PRESETS if f"`{name}`" not in doc]
    assert not missing, f"docs/presets.md does not list {missing}"
    for override in ("solver.pmd_cycle=10", "solver.pmd_cycle=500", "solver.pmd_cycle=1000", "solver.pmd_cycle=inf",
                     "solver.pmd_alpha=0.008", "solver.pmd_alpha=0.01", "solver.pmd_alpha=0.015",
                     "solver.pmd_alpha=0.018"):
        assert f"megdet train largedet_r50_fpn_bs256_pmdlamb {override}" in doc, override
        config.load("largedet_r50_fpn_bs256_pmdlamb", [override])


def test_demo_preset_shares_batch_norm_across_its_two_ranks():
    demo = config.load("shapes_r18_cpu")
    demo.check_world(2, 2)
    assert demo.model.norm == "cgbn" and demo.bn_groups.group_size == 2 and demo.solver.optimizer == "pmd_lamb"
    assert demo.model.name == "resnet18_fpn"


def test_overrides_are_typed_and_resolve_the_learning_rate():
    cfg = config.load("largedet_r50_fpn_bs256_pmdlamb",
                      ["solver.batch_size=512", "data.images_per_rank=8", "solver.steps=[100, 200]",
                       "solver.max_iter=300", "model.bn_size=null", "solver.weight_decay=1e-4",
                       "train.output_dir=runs/x", "solver.warmup_iters=10"])
    assert cfg.solver.lr == pytest.approx(0.64), "the linear scaling rule follows the overridden batch"
    assert cfg.solver.steps == [100, 200] and cfg.model.bn_size is None and cfg.solver.weight_decay == 1e-4
    assert cfg.train.output_dir == "runs/x"
    assert config.load("megdet_r50_fpn_bs16", ["solver.lr=0.05"]).solver.lr == 0.05, "a given lr wins"
    assert config.load("megdet_r50_fpn_bs16").to_dict()["solver"]["lr"] == 0.02


def test_yaml_files_and_their_errors(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("solver:\n  max_iter: 10\n  steps: [5]\n")
    cfg = config.load(str(path))
    assert cfg.name == "mine" and cfg.solver.max_iter == 10
    path.write_text("solver:\n  max_itr: 10\n")
    message = one_line_error("unknown config key 'solver.max_itr'", config.load, str(path))
    assert "did you mean max_iter?" in message and "solver.max_iter" in message and "solver.pmd_cycle" in message
    path.write_text("trainer:\n  seed: 1\n")
    one_line_error(r"unknown config key 'trainer'.*valid keys are name, description, paper, model", config.load,
                   str(path))
    path.write_text("model: resnet50\n")
    one_line_error("config key 'model' .* must be a mapping", config.load, str(path))
    path.write_text("solver: [unclosed\n")
    one_line_error("is not valid YAML", config.load, str(path))
    one_line_error("config file nowhere/x.yaml does not exist", config.load, "nowhere/x.yaml")


@pytest.mark.parametrize("override, match", [
    ("solver.lrr=0.1", r"unknown config key 'solver.lrr' in the overrides \(did you mean lr\?\): valid keys are "
                       r"solver.optimizer, solver.batch_size"),
    ("solvr.lr=0.1", r"unknown config key 'solvr' in the overrides \(did you mean solver\?\)"),
    ("solver.max_iter=abc", r"config key 'solver.max_iter' in the overrides must be int, not 'abc'"),
    ("solver.max_iter=1.5", r"must be int, not 1.5"),
    ("model.bn_size=true", r"'model.bn_size' in the overrides must be int or null, not True"),
    ("solver.steps=7", r"must be a list of int, not 7"),
    ("solver.steps=[1, x]", r"'solver.steps\[1\]' in the overrides must be int, not 'x'"),
    ("solver", r"override 'solver' is not key=value"),
    ("solver=3", r"override 'solver=3' names a whole section"),
    ("solver.lr.x=3", r"solver.lr is not a section"),
    ("solver.optimizer=adam", r"solver.optimizer='adam' is not one of sgd, pmd_lamb, lamb, lars"),
    ("model.norm=frozen", r"model.bn_size=32 applies to model.norm=cgbn only"),
    ("model.bn_size=30", r"model.bn_size=30 is not a positive multiple of data.images_per_rank=4"),
    ("solver.steps=[5000, 4000]", r"solver.steps=\[5000, 4000\] must be increasing"),
    ("solver.policy=long", r"decays the LR 3 times but solver.steps=\[3688, 4609\] has 2"),
    ("solver.layer_adaptation=bias", r"solver.layer_adaptation='bias' is not one of all, weights"),
    ("solver.layer_adaptation=weights", r"applies to lamb and pmd_lamb, not sgd: drop it"),
    ("solver.pmd_kernel=fused", r"solver.pmd_kernel='fused' is not one of multi_tensor, compiled"),
    ("solver.pmd_kernel=compiled", r"solver.pmd_kernel='compiled' applies to pmd_lamb, not sgd: drop it"),
    ("model.anchor_sizes=[16, 32]", r"model.anchor_sizes=\[16, 32\] needs 5 positive sizes"),
    ("model.roi_batch_size_per_image=0", r"model.roi_batch_size_per_image=0 must be positive"),
    ("model.rpn_post_nms_topk=[100]", r"model.rpn_post_nms_topk=\[100\] needs 2 positive counts: \[train, test\]"),
    ("model.fpn_channels=0", r"model.fpn_channels=0 must be positive"),
    ("model.roi_positive_fraction=1.5", r"model.roi_positive_fraction=1.5 must be in \(0, 1\]"),
    ("train.keep_checkpoints=-1", r"train.keep_checkpoints=-1 must be >= 0 \(N keeps the newest N checkpoints, 0 "
                                  r"keeps every one\)"),
    ("data.skip_corrupt=sometimes", r"'data.skip_corrupt' in the overrides must be bool, not 'sometimes'"),
])
def test_bad_overrides_are_one_line_errors(override, match):
    one_line_error(match, config.load, "megdet_r50_fpn_bs256_bn32", [override])


def test_unknown_preset_lists_the_presets():
    message = one_line_error(r"unknown preset 'largedet_coco_12mn' \(did you mean largedet_coco_12min\?\)",
                             config.load, "largedet_coco_12mn")
    assert all(name in message for name in config.PRESETS)


def test_check_world_names_the_numbers_and_the_fix():
    cfg = config.load("megdet_r50_fpn_bs256_bn32")  # 256 images, 4 per rank, BN groups of 8 ranks
    cfg.check_world(64, 8)
    one_line_error(r"solver.batch_size=256 is not divisible by 48 ranks: launch a divisor of 256 ranks "
                   r"\(e.g. 64 for data.images_per_rank=4\)", cfg.check_world, 48, 8)
    one_line_error(r"solver.batch_size=256 over 128 ranks is 2 images per rank but data.images_per_rank=4: "
                   r"launch 64 ranks or set data.images_per_rank=2", cfg.check_world, 128, 8)
    small = config.load("megdet_r50_fpn_bs256_bn32", ["solver.batch_size=24", "model.bn_size=16"])
    one_line_error(r"model.bn_size=16 is 4 ranks of 4 images, which does not divide the world of 6 ranks",
                   small.check_world, 6, 6)
    whole = config.load("megdet_r50_fpn_bs256_bn32", ["model.bn_size=null", "model.bn_node_local=false"])
    whole.check_world(64, 8)
    assert whole.bn_groups.group_size is None


def test_node_local_bn_refuses_a_group_that_spans_nodes():
    cfg = config.load("megdet_r50_fpn_bs256_bn32", ["data.images_per_rank=2"])  # BN 32 = 16 ranks of 2 images
    assert cfg.model.bn_node_local, "MegDet Sec. 3.3: BN only across the GPUs of one machine"
    message = one_line_error(r"model.bn_node_local asks for BN groups inside one node, but model.bn_size=32 is 16 "
                             r"ranks of 2 images and a node runs 8: .* or model.bn_node_local=false", cfg.check_world,
                             128, 8)
    assert "set model.bn_size to 2 times a divisor of 8" in message
    cfg.check_world(128, 16)  # 16-GPU nodes hold a group
    spanning = config.load("megdet_r50_fpn_bs256_bn32", ["data.images_per_rank=2", "model.bn_node_local=false"])
    spanning.check_world(128, 8)
    whole = config.load("megdet_r50_fpn_bs256_bn32", ["model.bn_size=null"])  # one group of all 64 ranks
    one_line_error(r"model.bn_size=256 is 64 ranks of 4 images and a node runs 8", whole.check_world, 64, 8)
    config.load("megdet_r50_fpn_bs16").check_world(8, 1)  # frozen BN: no groups to place


@pytest.mark.multirank
def test_megdet_train_refuses_a_node_spanning_bn_group_on_every_rank(launch_env, tmp_path):
    """Two ranks on two "nodes" of one rank each, one BN group of both: every rank prints the one line and
    exits 2 before anything is written. The torch engine counts a node's ranks by host name, so each rank
    is given a host name of its own (a sitecustomize on its path) and torchrun's variables."""
    import subprocess

    from tests.multirank import free_port

    (tmp_path / "sitecustomize.py").write_text(
        "import os, socket\nsocket.gethostname = lambda: 'node' + os.environ['RANK']\n")
    run = tmp_path / "run"
    argv = [*MEGDET, "train", "megdet_r50_fpn_bs256_bn32", "solver.batch_size=8", "model.bn_size=8",
            f"train.output_dir={run}"]
    port, env = free_port(), launch_env({"MEGDET_COMM": "torch", "MEGDET_COMM_TIMEOUT": "60"})
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    ranks = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                   "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in range(2)]
    for rank, process in enumerate(ranks):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"megdet train: error (rank {rank}/2): model.bn_node_local asks "
                                                        "for BN groups inside one node"), err
    assert not run.exists()


def test_pmd_cycle_takes_inf_for_no_moments_decay(tmp_path):
    for text in ("inf", ".inf", "Infinity"):
        cfg = config.load("largedet_r50_fpn_bs256_pmdlamb", [f"solver.pmd_cycle={text}"])
        assert cfg.solver.pmd_cycle == math.inf
    assert config.load("largedet_r50_fpn_bs256_lamb").solver.pmd_cycle == math.inf
    cycle = config.load("largedet_r50_fpn_bs256_pmdlamb", ["solver.pmd_cycle=500"]).solver.pmd_cycle
    assert cycle == 500 and isinstance(cycle, int)
    for bad in ("0", "-200", "2.5", "nan", "-inf"):
        one_line_error(r"solver.pmd_cycle=\S+ must be a whole number of iterations >= 1, or inf", config.load,
                       "largedet_r50_fpn_bs256_pmdlamb", [f"solver.pmd_cycle={bad}"])
    path = tmp_path / "lamb.yaml"
    path.write_text(config.load("largedet_r50_fpn_bs256_lamb").to_yaml())
    assert "pmd_cycle: .inf" in path.read_text() and config.load(str(path)).solver.pmd_cycle == math.inf


def test_frozen_layers_only_on_loaded_weights():
    scratch = config.load("megdet_r50_fpn_bs256_bn32", ["model.backbone_weights=null", "model.sublinear_stages=[res2]"])
    assert scratch.model.norm == "cgbn", "from scratch with trained BN: allowed, and res2 trains, so it may recompute"
    message = one_line_error(r"model.norm=frozen keeps every BN layer at its initial values .* model.backbone_weights "
                             r"is null: set model.backbone_weights \(e.g. torchvision:resnet50\), or model.norm=bn or "
                             r"cgbn .*, or model.allow_frozen_random=true", config.load, "megdet_r50_fpn_bs16",
                             ["model.backbone_weights=null"])
    assert "only makes sense on loaded weights" in message
    allowed = config.load("megdet_r50_fpn_bs16", ["model.backbone_weights=null", "model.allow_frozen_random=true"])
    assert allowed.model.norm == "frozen"
    one_line_error(r"model.sublinear_stages=\['res2', 'res3'\] lists \['res2'\], frozen on the loaded weights .* "
                   r"recomputing it saves nothing; drop res2", config.load, "megdet_r50_fpn_bs256_bn32",
                   ["model.sublinear_stages=[res2, res3]"])
    one_line_error(r"model.sublinear_stages=\['res6'\] names \['res6'\], not backbone stages", config.load,
                   "megdet_r50_fpn_bs256_bn32", ["model.sublinear_stages=[res6]"])
    one_line_error(r"model.backbone_weights='torchvision:resnet18' are resnet18 weights but model.name=resnet50_fpn "
                   r"has a resnet50 backbone: use torchvision:resnet50", config.load, "megdet_r50_fpn_bs16",
                   ["model.backbone_weights=torchvision:resnet18"])
    one_line_error(r"backbone weights 'torchvision:resnet5' are not a known name: use one of torchvision:resnet18, "
                   r"torchvision:resnet50, torchvision:resnet101", config.load, "megdet_r50_fpn_bs16",
                   ["model.backbone_weights=torchvision:resnet5"])
    assert config.load("megdet_r50_fpn_bs16", ["model.backbone_weights=weights/r50.pth"]).model.backbone_weights


def test_solver_and_model_options_reach_the_optimizer_and_the_detector():
    import torch
    from torch import nn

    from megdet.engine.build import build_model, build_optimizer, model_settings

    cfg = config.load("shapes_r18_cpu", ["solver.layer_adaptation=weights", "model.anchor_sizes=[8, 16, 32, 64, 128]",
                                         "model.roi_batch_size_per_image=64", "model.roi_positive_fraction=0.5",
                                         "model.fpn_channels=32", "model.box_head_dim=128",
                                         "model.rpn_pre_nms_topk=[100, 100]", "model.rpn_post_nms_topk=[50, 50]",
                                         "eval.score_threshold=0.1", "model.norm=bn", "model.bn_size=null"])
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    adapted = {group["name"]: group["layer_adaptation"] for group in build_optimizer(cfg, model).param_groups}
    assert adapted == {"weights": True, "norm": False, "bias": False}
    cfg.solver.layer_adaptation = "all"
    assert all(group["layer_adaptation"] for group in build_optimizer(cfg, model).param_groups)
    assert not build_optimizer(cfg, model).compiled
    cfg.solver.pmd_kernel = "compiled"
    assert build_optimizer(cfg, model).compiled
    settings = model_settings(cfg)
    assert settings == {"anchor_sizes": (8, 16, 32, 64, 128), "roi_batch_size_per_image": 64,
                        "roi_positive_fraction": 0.5, "fpn_channels": 32, "box_head_dim": 128,
                        "rpn_pre_nms_topk": (100, 100), "rpn_post_nms_topk": (50, 50), "score_threshold": 0.1,
                        "nms_threshold": 0.5, "detections_per_image": 100}
    detector = build_model(cfg)
    assert detector.fpn.output_convs[0].out_channels == 32 and detector.roi_heads.box_head.fc2.out_features == 128
    assert detector.rpn.post_nms_topk == {True: 50, False: 50} and detector.roi_heads.positive_fraction == 0.5


def test_amp_and_channels_last_reach_the_training_step():
    import torch

    from megdet.engine.build import build_model, build_runtime

    cfg = config.load("shapes_r18_cpu", ["train.amp=bf16", "train.channels_last=true", "model.norm=bn",
                                         "model.bn_size=null", "model.rpn_pre_nms_topk=[40, 40]", "model.rpn_post_nms_topk=[20, 20]",
                                         "model.roi_batch_size_per_image=16"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert model.channels_last and model.backbone.conv1.weight.is_contiguous()
    conv_outputs = []
    model.backbone.conv1.register_forward_hook(lambda module, inputs, output: conv_outputs.append(output))
    images = [torch.rand(3, 64, 64) * 255, torch.rand(3, 64, 64) * 255]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
                "iscrowd": torch.tensor([False])} for _ in images]
    runtime = build_runtime(cfg)
    assert runtime.device == torch.device("cpu") and runtime.amp == torch.bfloat16
    with runtime.autocast():
        losses = model(images, targets)
    assert conv_outputs[0].dtype == torch.bfloat16
    assert conv_outputs[0].is_contiguous(memory_format=torch.channels_last)
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses.values()), losses
    sum(losses.values()).backward()
    assert model.roi_heads.predictor.cls_score.weight.grad.dtype == torch.float32
    assert all(p.grad.is_contiguous() for p in model.parameters() if p.grad is not None), "Horovod needs these"
    one_line_error(r"train.amp='fp8' is not one of none, bf16, fp16, auto", config.load, "shapes_r18_cpu",
                   ["train.amp=fp8"])
