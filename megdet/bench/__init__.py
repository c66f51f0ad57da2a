"""``megdet bench NAME``: benchmarks that measure alternatives side by side in one run and print ratios.

Each benchmark is a module here with ``add_arguments(parser)`` and ``run(args) -> exit code``; it
writes its rows as JSON and a Markdown table with ``megdet.bench.report.write``. Tests run each once
at a tiny size and assert nothing about speed.
"""
from __future__ import annotations

import importlib

# name: (module, one-line help)
BENCHMARKS = {}
BENCHMARKS["loader"] = ("megdet.bench.loader", "images/s from loose files, jpeg shards, raw shards and the JPEG decode limit")
BENCHMARKS["cgbn"] = ("megdet.bench.cgbn", "train-step time of conv+BN+ReLU blocks: local BN, CGBN, SyncBatchNorm")
BENCHMARKS["optim"] = ("megdet.bench.optim", "one optimizer step over ResNet-50-sized parameters: SGD, PMD-LAMB foreach and naive, LAMB, LARS")
BENCHMARKS["model"] = ("megdet.bench.model", "forward+backward s/image of the detector, with and without sublinear memory, vs torchvision")
BENCHMARKS["train"] = ("megdet.bench.train", "images/s of the real training step at 1 and N ranks, scaling efficiency, time shares of data, compute, allreduce, optimizer")
BENCHMARKS["allreduce"] = ("megdet.bench.allreduce", "time and bus bandwidth of one allreduce, 4 KiB to 256 MiB: Horovod fusion on/off vs torch.distributed")
BENCHMARKS["node"] = ("megdet.bench.node", "the checks that prove a GPU node: doctor, the step vs torchvision, amp modes, CGBN exactness, a short train + eval (scripts/gpu_check.sh)")
BENCHMARKS["project"] = ("megdet.bench.project", "projected time to train on 8-160 GPUs (compute + ring allreduce model) next to the papers' times")


def add_arguments(parser) -> None:
    names = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub = names.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--out", default=f"runs/bench/{name}",
                         help="folder for the JSON and Markdown results (default: %(default)s)")
        module.add_arguments(sub)
        sub.set_defaults(run_benchmark=module.run)


def run(args) -> int:
    return args.run_benchmark(args)
