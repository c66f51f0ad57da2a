"""``megdet bench NAME``: benchmarks that measure alternatives side by side in one run and print ratios.

Each benchmark is a module here with ``add_arguments(parser)`` and ``run(args) -> exit code``; it
writes its rows as JSON and a Markdown table with ``megdet.bench.report.write``. ``megdet.cli``
imports only the chosen one. Tests run each once at a tiny size and assert nothing about speed.
"""
from __future__ import annotations

SUBCOMMAND_METAVAR = "BENCHMARK"
# name: (module, one-line help)
SUBCOMMANDS = {
    "loader": ("megdet.bench.loader", "images/s from loose files, jpeg shards, raw shards, the JPEG decode limit and the training transform"),
    "cgbn": ("megdet.bench.cgbn", "train-step time of conv+BN+ReLU blocks: local BN, CGBN (checked exact), SyncBatchNorm"),
    "optim": ("megdet.bench.optim", "one optimizer step over ResNet-50-sized parameters: SGD, PMD-LAMB foreach and naive, LAMB, LARS"),
    "model": ("megdet.bench.model", "forward+backward s/image of the detector per autocast mode, with and without sublinear memory, vs torchvision"),
    "train": ("megdet.bench.train", "images/s of the real training step at 1 and N ranks, scaling efficiency, time shares of data, compute, allreduce, optimizer"),
    "allreduce": ("megdet.bench.allreduce", "time and bus bandwidth of one allreduce, 4 KiB to 256 MiB: Horovod fusion on/off vs torch.distributed"),
    "node": ("megdet.bench.node", "the checks that prove a GPU node: doctor, the step vs torchvision, amp modes, CGBN exactness, a short train + eval (scripts/gpu_check.sh)"),
    "open-images": ("megdet.bench.open_images", "seconds to read and score a synthetic Open Images validation-sized result (41,620 images x 100 detections)"),
    "eval": ("megdet.bench.evaluation", "seconds to score a COCO-val-sized box set: pycocotools vs our category split on 1, 2, 4 ranks, and faster-coco-eval, each checked exact"),
    "pack-open-images": ("megdet.bench.pack_open_images", "peak memory and images/s of megdet pack on synthetic Open Images CSVs of two sizes (memory must not grow with the rows)"),
    "project": ("megdet.bench.project", "projected time to train on 8-160 GPUs (compute + ring allreduce model) next to the papers' times"),
}


def add_common_arguments(parser, name: str) -> None:
    parser.add_argument("--out", default=f"runs/bench/{name}",
                        help="folder for the JSON and Markdown results (default: %(default)s)")
