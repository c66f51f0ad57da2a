"""``megdet bench project``: projected time to train the papers' configurations on 8 to 160 GPUs,
from a measured (or paper-derived) step time and allreduce bandwidth, next to the papers' times.

    megdet bench project                                   # paper-derived defaults, 8..160 GPUs
    megdet bench project --gpus 8,16,32,64,128,160 --step-time 0.2 --bandwidth 20 --latency-us 5
    megdet bench project --train-results runs/bench/train/train.json \\
                         --allreduce-results runs/bench/allreduce/allreduce.json --overlap 0.5

Model (``hpc.perfmodel``): step = compute + exposed ring allreduce of the gradients + the CGBN
allreduces over the BN group, at least images_per_gpu / input rate; time = iterations * step. CGBN
makes two blocking allreduces per BN layer (84 per step for R50's 42 trainable BN layers); on
Horovod each also waits half a HOROVOD_CYCLE_TIME for the background thread (``--cgbn-transport
horovod``: 84 x 2.5 ms = 0.21 s at the job scripts' 5 ms, LargeDet's whole step), on torch.distributed
none (``--cgbn-transport torch``, the default and what the job scripts run: MEGDET_CGBN_COMM=torch).
Compute scales with the images per GPU from the measured step (one rank, no communication). Rows:
for each GPU count, the MegDet Table 3 and LargeDet Table 4 rows run at that count (``--batch``:
only those of that batch); a count with none gets a generated row, marked "no paper row".

Evaluation is counted for the rows of a preset that names it (the LargeDet row, ``largedet_coco_12min``):
the preset's ``train.eval_period`` and ``solver.max_iter`` give the evaluations ``megdet train`` runs
(every eval_period iterations and once at the end: 14 in 3360). Each is an inference pass over COCO
val's 5000 images shared among the GPUs, assumed to cost the forward share of the training step per
image (forward ~ 1/3 of a training step per image, backward ~ 2x forward; post-processing and the
detection gather left out), then the scoring, ``--scoring-seconds`` (default: pycocotools in one
process, 42.5 s, ``megdet bench eval``). Beside the training-only row ("not counted") come two rows:
"synchronous scoring" (every evaluation waits for it, as ``megdet train`` does) and "overlapped
scoring" (in the background: hidden behind the training up to the next evaluation, except the last,
whose AP ends the run).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

from hpc import perfmodel
from hpc.errors import UserError
from hpc.schedule import POLICIES
from megdet import config
from megdet.bench import report

NAME = "project"
COLUMNS = ("gpus", "row", "batch", "bn_size", "images_per_gpu", "iterations", "compute_s", "allreduce_s",
           "cgbn_s", "step_s", "images_per_s", "efficiency", "evaluation", "evaluations", "eval_s", "projected",
           "paper", "projected/paper", "source")

COCO_TRAIN_IMAGES = 118_000        # MegDet Sec. 4: "118,000 training images" (train2017 has 118,287)
COCO_VAL_IMAGES = 5000             # val2017, what every evaluation infers and scores
EPOCHS = {name: policy.epochs for name, policy in POLICIES.items()}  # MegDet Sec. 4: normal 11, long 18
STEP_IMAGES = 2                    # images per rank of --step-time and of the default step time
# Default compute: MegDet Table 3 "16-base", 33.2 h for 11 epochs at batch 16 (81125 iterations) on
# 8 Titan Xp GPUs x 2 images. It includes that server's own gradient allreduce, so it slightly
# overstates pure compute.
BASELINE_HOURS, BASELINE_BATCH = 33.2, 16
DEFAULT_BANDWIDTH_GBPS = 12.0      # 100 Gb/s InfiniBand EDR = 12.5 GB/s line rate; ~12 GB/s busbw
FORWARD_SHARE = 1 / 3              # of compute; inference of one image ~ the forward pass of its training step
BACKWARD_SHARE = 2 * FORWARD_SHARE  # backward ~ 2x forward: the part of compute that --overlap can hide
# `megdet bench eval` (docs/benchmarks.md, 2026-12-05, 2 shared cores): pycocotools scores a COCO-val-sized
# set (5000 images x 100 detections) in 42.5 s in one process.
PYCOCOTOOLS_SCORING_S = 42.5
SCORING_FROM = "default: megdet bench eval, pycocotools in one process, COCO-val-sized set (docs/benchmarks.md)"
EVALUATION_MODEL = (f"inference: ceil({COCO_VAL_IMAGES} val images / GPUs) per rank at forward ~ "
                    f"{FORWARD_SHARE:.3g} of a training step per image; then scoring: synchronous (every "
                    "evaluation waits) or overlapped (hidden behind the training up to the next evaluation, "
                    "except the last)")
GPUS_PER_NODE = 8                  # generated rows: MegDet's 8-GPU servers; CGBN stays inside a node
GRADIENT_BYTES_PER_PARAM = 4       # float32 gradients
CGBN_TRANSPORTS = ("torch", "horovod")
DEFAULT_CYCLE_TIME_MS = 5.0        # HOROVOD_CYCLE_TIME in jobs/templates/body.sh.in


class Row(NamedTuple):
    """One configuration to project; ``bn_size`` 0 means frozen BN (no CGBN); ``preset``: the preset whose
    evaluations are counted (None: not counted)."""
    label: str
    batch: int
    bn_size: int
    gpus: int
    gpus_per_node: int
    iterations: int
    paper_s: Optional[float]
    source: str
    preset: Optional[str] = None


def _megdet(label: str, batch: int, bn_size: int, gpus: int, hours: float) -> Row:
    """A MegDet Table 3 row (8-GPU servers, Sec. 1); "(long)" rows run the long policy."""
    policy = "long" if "(long)" in label else "normal"
    iterations = perfmodel.iterations_for_epochs(EPOCHS[policy], COCO_TRAIN_IMAGES, batch)
    return Row(label, batch, bn_size, gpus, 8, iterations, hours * 3600, "MegDet Table 3")


PAPER_ROWS = (
    _megdet("16-base", 16, 0, 8, 33.2), _megdet("2", 2, 2, 2, 131.2), _megdet("4", 4, 4, 4, 91.4),
    _megdet("8", 8, 8, 8, 71.5), _megdet("16", 16, 2, 8, 45.6), _megdet("16", 16, 16, 8, 39.5),
    _megdet("32", 32, 32, 8, 45.5), _megdet("64", 64, 64, 8, 40.9), _megdet("64", 64, 32, 16, 19.6),
    _megdet("64", 64, 16, 32, 11.2), _megdet("128", 128, 32, 32, 11.3), _megdet("128", 128, 16, 64, 6.5),
    _megdet("256", 256, 32, 64, 7.2), _megdet("256", 256, 16, 128, 4.1),
    _megdet("16 (long)", 16, 16, 8, 65.2), _megdet("32 (long)", 32, 32, 8, 60.3),
    _megdet("64 (long)", 64, 32, 16, 30.1), _megdet("128 (long)", 128, 32, 32, 15.8),
    _megdet("256 (long)", 256, 32, 64, 9.4), _megdet("256 (long)", 256, 16, 128, 5.4),
    # LargeDet Table 4 "Faster": batch 320 on 10 DGX-2 (16 GPUs each), stop iteration 3360, 11m53s;
    # BN size 32 as in its Sec. 4.1 and our preset largedet_coco_12min.
    Row("Faster", 320, 32, 160, 16, 3360, 11 * 60 + 53, "LargeDet Table 4", preset="largedet_coco_12min"),
)


def add_arguments(parser) -> None:
    parser.add_argument("--gpus", default="8,16,32,64,128,160",
                        help="GPU counts, comma-separated (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=None,
                        help="only configurations of this global batch (default: every paper row; "
                             "2 images per GPU where a count has none)")
    step = parser.add_mutually_exclusive_group()
    step.add_argument("--step-time", type=float, default=None,
                      help=f"seconds per training step of one rank at {STEP_IMAGES} images, without "
                           "communication (default: from MegDet Table 3's 16-base time)")
    step.add_argument("--train-results", default=None,
                      help="a `megdet bench train` JSON: use its 1-rank row's seconds_per_step")
    bandwidth = parser.add_mutually_exclusive_group()
    bandwidth.add_argument("--bandwidth", type=float, default=None,
                           help=f"allreduce bus bandwidth in GB/s (default: {DEFAULT_BANDWIDTH_GBPS}, "
                                "100 Gb/s InfiniBand EDR)")
    bandwidth.add_argument("--allreduce-results", default=None,
                           help="a `megdet bench allreduce` JSON: busbw of the best engine at its largest size")
    parser.add_argument("--latency-us", type=float, default=5.0,
                        help="latency per ring step in microseconds (default: %(default)s)")
    parser.add_argument("--input-rate", type=float, default=None,
                        help="images/s one GPU's input pipeline delivers (default: unbounded)")
    parser.add_argument("--overlap", type=float, default=0.0,
                        help="share of the backward pass that hides the gradient allreduce, 0..1 "
                             "(default: %(default)s, no overlap: conservative)")
    parser.add_argument("--cgbn-transport", choices=CGBN_TRANSPORTS, default="torch",
                        help="what carries cross-GPU BN's blocking allreduces: torch (MEGDET_CGBN_COMM=torch, "
                             "NCCL, starts at once) or horovod (waits for the background cycle) "
                             "(default: %(default)s, what the job scripts use)")
    parser.add_argument("--cycle-time-ms", type=float, default=DEFAULT_CYCLE_TIME_MS,
                        help="HOROVOD_CYCLE_TIME for --cgbn-transport horovod (default: %(default)s, the job scripts')")
    parser.add_argument("--gradient-mb", type=float, default=None,
                        help="gradient size in MB (1e6 bytes) (default: trainable parameters of "
                             "resnet50_fpn x 4 bytes)")
    parser.add_argument("--scoring-seconds", default=None,
                        help=f"seconds to score one evaluation's {COCO_VAL_IMAGES} images (default: "
                             f"{PYCOCOTOOLS_SCORING_S}, pycocotools in one process, `megdet bench eval`; our "
                             "category split measured 44.6 / 26.7 / 32.8 s at 1 / 2 / 4 ranks on 2 cores)")


def run(args) -> int:
    gpu_counts = _gpu_counts(args.gpus)
    for name in ("batch", "step_time", "bandwidth", "input_rate", "gradient_mb"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"Invalid --{name.replace('_', '-')}: {value}; need a positive number")
    if args.latency_us < 0:
        raise UserError(f"Invalid --latency-us: {args.latency_us}; need 0 or more microseconds")
    if args.cycle_time_ms < 0:
        raise UserError(f"Invalid --cycle-time-ms: {args.cycle_time_ms}; need 0 or more milliseconds")
    if not 0 <= args.overlap <= 1:
        raise UserError(f"Invalid --overlap: {args.overlap}; need a share of the backward pass in 0..1")
    scoring_s, scoring_from = _scoring_seconds(args.scoring_seconds)
    rows = [row for gpus in gpu_counts for row in _rows_at(gpus, args.batch)]
    step_s, step_images, step_from = _step_time(args)
    busbw_GBps, busbw_from = _bandwidth(args)
    params, bn_channels = _detector_shape()
    cgbn_wait_s = perfmodel.horovod_wait_seconds(args.cycle_time_ms / 1e3) if args.cgbn_transport == "horovod" else 0.0
    gradient_bytes = args.gradient_mb * 1e6 if args.gradient_mb else params * GRADIENT_BYTES_PER_PARAM
    inputs = {
        "gpus": gpu_counts, "batch": args.batch,
        "step_time_s": step_s, "step_images_per_rank": step_images, "step_time_from": step_from,
        "busbw_GBps": busbw_GBps, "busbw_from": busbw_from, "latency_us": args.latency_us,
        "input_rate_images_per_s_per_gpu": args.input_rate or "unbounded", "overlap": args.overlap,
        "backward_share_of_compute": BACKWARD_SHARE, "gradient_bytes": gradient_bytes,
        "gradient_from": ("--gradient-mb" if args.gradient_mb else
                          f"resnet50_fpn trainable parameters ({params}) x {GRADIENT_BYTES_PER_PARAM} bytes, "
                          "one fused allreduce"),
        "bn_layers": len(bn_channels), "bn_channels": sum(bn_channels),
        "cgbn_collectives_per_step": perfmodel.cgbn_collectives(bn_channels), "cgbn_transport": args.cgbn_transport,
        "cgbn_wait_per_collective_ms": cgbn_wait_s * 1e3,
        "coco_train_images": COCO_TRAIN_IMAGES, "epochs": EPOCHS,
        "evaluation_model": EVALUATION_MODEL, "coco_val_images": COCO_VAL_IMAGES,
        "forward_share_of_compute": FORWARD_SHARE, "scoring_s": scoring_s, "scoring_from": scoring_from,
    }
    model = dict(seconds_per_image=step_s / step_images, busbw_Bps=busbw_GBps * 1e9,
                 latency_s=args.latency_us * 1e-6, input_rate=args.input_rate, overlap=args.overlap,
                 gradient_bytes=gradient_bytes, bn_channels=bn_channels, cgbn_wait_s=cgbn_wait_s)
    results = []
    for row in rows:
        trained = _project(row, **model)
        results.append(trained)
        if row.preset:
            results += [_with_evaluation(trained, row, seconds_per_image=model["seconds_per_image"],
                                         scoring_s=scoring_s, overlapped=overlapped) for overlapped in (False, True)]
    print(f"megdet bench {NAME}: inputs")
    for key, value in inputs.items():
        print(f"  {key}: {value}")
    print(report.write(args.out, NAME, results, COLUMNS, inputs=inputs), flush=True)
    return 0


def _gpu_counts(text: str) -> List[int]:
    try:
        counts = [int(item) for item in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"Invalid --gpus: {text!r}; give a comma-separated list of positive integers, "
                        "e.g. 8,16,32,64,128,160")
    return counts


def _rows_at(gpus: int, batch: Optional[int]) -> List[Row]:
    """The paper rows run on ``gpus`` GPUs (of ``batch`` if given), else one generated row: ``batch``
    (default 2 images per GPU), CGBN over the largest group of one node that tiles the GPUs."""
    rows = [row for row in PAPER_ROWS if row.gpus == gpus and batch in (None, row.batch)]
    if rows:
        return rows
    batch = batch or STEP_IMAGES * gpus
    if batch % gpus:
        raise UserError(f"Invalid --batch: {batch} images is not divisible by {gpus} GPUs; choose a multiple "
                        f"of {gpus} or GPU counts that divide {batch}")
    group = math.gcd(gpus, GPUS_PER_NODE)
    iterations = perfmodel.iterations_for_epochs(EPOCHS["normal"], COCO_TRAIN_IMAGES, batch)
    return [Row("", batch, batch // gpus * group, gpus, GPUS_PER_NODE, iterations, None, "no paper row")]


def _project(row: Row, *, seconds_per_image: float, busbw_Bps: float, latency_s: float,
             input_rate: Optional[float], overlap: float, gradient_bytes: float, bn_channels: List[int],
             cgbn_wait_s: float) -> Dict:
    """The model's figures for one row, as a results row."""
    images_per_gpu = row.batch // row.gpus
    group = min(row.bn_size // images_per_gpu, row.gpus_per_node) if row.bn_size else 1
    compute_s = seconds_per_image * images_per_gpu
    allreduce_s = perfmodel.exposed_allreduce_seconds(
        perfmodel.ring_allreduce_seconds(gradient_bytes, row.gpus, busbw_Bps, latency_s),
        backward_s=BACKWARD_SHARE * compute_s, overlap=overlap)
    cgbn_s = perfmodel.cgbn_seconds(bn_channels, group, busbw_Bps, latency_s, cgbn_wait_s)
    step_s = perfmodel.step_seconds(compute_s, allreduce_s, cgbn_s, images_per_gpu, input_rate)
    step_1 = perfmodel.step_seconds(compute_s, 0.0, 0.0, images_per_gpu, input_rate)
    throughput = perfmodel.images_per_second(row.gpus, images_per_gpu, step_s)
    projected_s = perfmodel.time_to_train_seconds(row.iterations, step_s)
    result = {"gpus": row.gpus, "row": row.label, "batch": row.batch, "bn_size": row.bn_size,
              "bn_group_ranks": group, "images_per_gpu": images_per_gpu, "iterations": row.iterations,
              "compute_s": compute_s, "allreduce_s": allreduce_s, "cgbn_s": cgbn_s, "step_s": step_s,
              "images_per_s": throughput,
              "efficiency": perfmodel.scaling_efficiency(
                  throughput, perfmodel.images_per_second(1, images_per_gpu, step_1), row.gpus),
              "evaluation": "not counted",
              "projected_s": projected_s, "projected": perfmodel.format_duration(projected_s),
              "paper_s": row.paper_s, "source": row.source}
    if row.paper_s:
        result.update({"paper": perfmodel.format_duration(row.paper_s), "projected/paper": projected_s / row.paper_s})
    return result


def _with_evaluation(trained: Dict, row: Row, *, seconds_per_image: float, scoring_s: float,
                     overlapped: bool) -> Dict:
    """``trained`` (``_project``'s row for ``row``) with the evaluations of ``row.preset``'s whole run
    added: each an inference pass at FORWARD_SHARE of ``seconds_per_image`` (training, per image), then
    ``scoring_s`` seconds of scoring, all waited for (synchronous) or hidden but the last
    (``overlapped``). Seconds are per run unless named per evaluation."""
    preset = config.load(row.preset)
    eval_period, max_iter = preset.train.eval_period, preset.solver.max_iter
    evaluations = len(range(eval_period, max_iter, eval_period)) + 1 if eval_period else 1  # + the one at the end
    inference_per_evaluation_s = perfmodel.inference_seconds(COCO_VAL_IMAGES, row.gpus,
                                                             FORWARD_SHARE * seconds_per_image)
    scoring_exposed_s = perfmodel.exposed_scoring_seconds(scoring_s, evaluations, eval_period * trained["step_s"],
                                                          overlapped)
    eval_s = evaluations * inference_per_evaluation_s + scoring_exposed_s
    projected_s = trained["projected_s"] + eval_s
    result = {**trained, "evaluation": "overlapped scoring" if overlapped else "synchronous scoring",
              "preset": row.preset, "eval_period": eval_period, "evaluations": evaluations,
              "inference_s_per_evaluation": inference_per_evaluation_s, "scoring_s_per_evaluation": scoring_s,
              "scoring_exposed_s": scoring_exposed_s, "eval_s": eval_s, "train_s": trained["projected_s"],
              "projected_s": projected_s, "projected": perfmodel.format_duration(projected_s)}
    if row.paper_s:
        result["projected/paper"] = projected_s / row.paper_s
    return result


def _scoring_seconds(text: Optional[str]) -> Tuple[float, str]:
    """Seconds to score one evaluation, from ``--scoring-seconds`` or the measured default, and where
    they came from."""
    if text is None:
        return PYCOCOTOOLS_SCORING_S, SCORING_FROM
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise UserError(f"Invalid --scoring-seconds: {text!r}; need 0 or more seconds, e.g. "
                        f"{PYCOCOTOOLS_SCORING_S} (pycocotools in one process, `megdet bench eval`)")
    return seconds, "--scoring-seconds"


def _read_rows(path: str, command: str, alternative: str) -> List[Dict]:
    """The ``rows`` of a ``megdet bench COMMAND`` results JSON, or a UserError naming the fix."""
    if not Path(path).is_file():
        raise UserError(f"no results file {path}: run `megdet bench {command}` first or pass {alternative}")
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a `megdet bench {command}` results file ({error!r}): "
                        f"rerun `megdet bench {command}` or pass {alternative}") from None
    return [row for row in rows if isinstance(row, dict)]


def _step_time(args) -> Tuple[float, int, str]:
    """Seconds per step of one rank without communication, its images per rank, and where it came from."""
    if args.step_time:
        return args.step_time, STEP_IMAGES, "--step-time"
    if args.train_results:
        rows = [row for row in _read_rows(args.train_results, "train", "--step-time") if row.get("ranks") == 1]
        if not rows or not rows[0].get("seconds_per_step") or not rows[0].get("images_per_rank"):
            raise UserError(f"{args.train_results} has no 1-rank row with seconds_per_step and images_per_rank: "
                            "run `megdet bench train` on 1 rank or pass --step-time")
        return float(rows[0]["seconds_per_step"]), int(rows[0]["images_per_rank"]), f"{args.train_results} (1 rank)"
    iterations = perfmodel.iterations_for_epochs(EPOCHS["normal"], COCO_TRAIN_IMAGES, BASELINE_BATCH)
    return (BASELINE_HOURS * 3600 / iterations, STEP_IMAGES,
            f"MegDet Table 3 16-base: {BASELINE_HOURS} h / {iterations} iterations (8 Titan Xp, incl. their allreduce)")


def _bandwidth(args) -> Tuple[float, str]:
    """Allreduce bus bandwidth in GB/s and where it came from."""
    if args.bandwidth:
        return args.bandwidth, "--bandwidth"
    if args.allreduce_results:
        rows = [row for row in _read_rows(args.allreduce_results, "allreduce", "--bandwidth")
                if isinstance(row.get("bytes"), (int, float)) and isinstance(row.get("busbw_GBps"), (int, float))]
        if not rows:
            raise UserError(f"{args.allreduce_results} has no row with bytes and busbw_GBps: "
                            "rerun `megdet bench allreduce` or pass --bandwidth")
        largest = max(row["bytes"] for row in rows)
        best = max((row for row in rows if row["bytes"] == largest), key=lambda row: row["busbw_GBps"])
        return float(best["busbw_GBps"]), f"{args.allreduce_results}: {best.get('engine')} at {largest} bytes"
    return DEFAULT_BANDWIDTH_GBPS, "default: 100 Gb/s InfiniBand EDR (12.5 GB/s line rate)"


def _detector_shape() -> Tuple[int, List[int]]:
    """Trainable parameters of resnet50_fpn (80 classes) and the channels of its trainable BN layers
    (the ones CGBN replaces: res3-res5, 42 layers, the stem and res2 being frozen with the ImageNet
    weights every paper preset starts from), counted on a model built on the CPU."""
    from torch import nn

    from megdet.model import build_detector
    from megdet.weights import default_freeze_at

    model = build_detector("resnet50_fpn", num_classes=80, norm="bn", freeze_at=default_freeze_at(pretrained=True))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return params, [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
