"""``megdet bench train``: throughput of the real training step at 1 and N ranks, and where the
step's time goes.

    megdet bench train                                   # shapes_r18_cpu: 1 rank here, 2 under horovodrun
    megdet bench train shapes_r18_cpu data.train=DIR --ranks 1,2,4 --steps 10 --warmup 3
    horovodrun --gloo -np 2 -H localhost:2 megdet bench train --out runs/bench/train-2   # one launched run

Without a launcher it measures 1 rank in this process (the local engine), then starts each N of
``--ranks`` under ``--engine``'s launcher (horovodrun or torchrun) and merges the rows; the 1-rank
baseline is always measured. Every run keeps the config's ``data.images_per_rank`` and sets
``solver.batch_size`` and (cross-GPU BN) ``model.bn_size`` to images_per_rank x ranks, so batch norm
shares statistics over all ranks (at 1 rank: plain local statistics) and the model and optimizer are
the same. Under a launcher it measures the launched ranks once.

The timed step is ``Trainer.step`` itself (``megdet.engine.train``: its model, DataLoader over the
shards, DistributedOptimizer, schedule, device and autocast), cut in four phases, in seconds on each
rank's clock (on a GPU, each phase ends with a device synchronisation, so its time is the GPU's):
  data              next batch from the DataLoader (decode + transform, or waiting for a worker)
  forward_backward  forward, losses and backward; the gradient allreduces start from the backward
                    hooks and overlap it
  communication     waiting for the gradient allreduces still in flight (``DistributedOptimizer.synchronize``)
  optimizer         the divergence guard's one-element allreduce and the optimizer step
The table gives seconds_per_step (median over steps of the slowest rank's step), images_per_s (each
rank's images over its own wall time, summed over ranks), the phase shares of all ranks' step time,
and scaling_efficiency = images_per_s(N) / (N x images_per_s(1)).

Threads: N ranks on one host share its cores (``launch.threads_per_rank``, as ``megdet train``):
1 rank uses every core, 2 ranks half each. On a CPU machine the N-rank "scaling" therefore measures
splitting the same cores between ranks plus the communication, not adding hardware; on GPUs each
rank adds a device.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from hpc import comm as comm_mod
from hpc import launch
from hpc.errors import UserError
from megdet import config as config_mod
from megdet.bench import report, spawn
from megdet.engine.build import build_runtime, init_rank
from megdet.engine.train import Trainer, to_device

NAME = "train"
DEFAULT_CONFIG = "shapes_r18_cpu"
DEFAULT_RANKS = "1,2"
PHASES = ("data", "forward_backward", "communication", "optimizer")
COLUMNS = ("engine", "ranks", "images_per_rank", "seconds_per_step", "images_per_s", "data_share",
           "forward_backward_share", "communication_share", "optimizer_share", "scaling_efficiency")


def add_arguments(parser) -> None:
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                        help="a preset or a YAML file (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.train=DIR data.images_per_rank=2")
    parser.add_argument("--ranks", default=None,
                        help=f"rank counts, comma-separated (default: {DEFAULT_RANKS}; under a launcher: the "
                             "launched world)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--engine", default="horovod", choices=spawn.ENGINES,
                        help="when no launcher started us: how to start the N-rank runs (default: %(default)s)")


def run(args) -> int:
    if "=" in args.config:  # `megdet bench train data.train=DIR`: an override, not a config
        args.config, args.overrides = DEFAULT_CONFIG, [args.config, *args.overrides]
    ranks = spawn.parse_ranks(args.ranks or DEFAULT_RANKS)
    if args.steps < 1:
        raise UserError(f"Invalid --steps: {args.steps}; need at least 1")
    if args.warmup < 0:
        raise UserError(f"Invalid --warmup: {args.warmup}; need 0 or more")
    launched = launch.detect().size or 1
    if launched > 1:
        if args.ranks is not None and launched not in ranks:
            raise UserError(f"the launcher started {launched} ranks but --ranks is {args.ranks}: launch "
                            f"{ranks[-1]} ranks, or leave out --ranks to measure the launched ones")
        comm = init_rank(_runtime(args).device)
        row = _measure(args, comm)
        if comm.rank == 0:
            threads = {comm.size: torch.get_num_threads()}
            print(report.write(args.out, NAME, [row], COLUMNS, inputs=_inputs(args, [comm.size], threads)))
        comm.barrier()  # Horovod shuts down for everyone when the first rank exits
        return 0
    return _spawn(args, ranks)


def _spawn(args, ranks: List[int]) -> int:
    """Measure 1 rank here and each N > 1 under the launcher; merge the rows and add the efficiency."""
    ranks = sorted({1, *ranks})
    comm = init_rank(_runtime(args).device)
    rows = [_measure(args, comm)]
    threads = {1: torch.get_num_threads()}
    forwarded = [args.config, *args.overrides, f"--steps={args.steps}", f"--warmup={args.warmup}"]
    with tempfile.TemporaryDirectory(prefix="megdet-bench-train-") as scratch:  # no partial output on failure
        for n in ranks:
            if n > 1:
                out = Path(scratch) / str(n)
                rows += spawn.run_ranks(NAME, args.engine, n, out, [*forwarded, f"--ranks={n}"])
                threads[n] = json.loads((out / f"{NAME}.json").read_text())["inputs"]["threads_per_rank"][str(n)]
    for row in rows:
        row["scaling_efficiency"] = row["images_per_s"] / (row["ranks"] * rows[0]["images_per_s"])
    print(report.write(args.out, NAME, rows, COLUMNS, inputs=_inputs(args, ranks, threads)))
    print("threads per rank: " + ", ".join(f"{n} rank(s): {t}" for n, t in threads.items()) +
          " -- the ranks share this host's cores, so more ranks here split the same hardware")
    return 0


def _inputs(args, ranks: List[int], threads: Dict[int, int]) -> Dict:
    return {"config": args.config, "overrides": args.overrides, "ranks": ranks, "steps": args.steps,
            "warmup": args.warmup, "engine": args.engine, "threads_per_rank": threads}


def _config(args, ranks: int, output_dir: str) -> config_mod.Config:
    """The user's config with the batch, BN size and schedule length of a ``ranks``-rank run (the batch
    counts each rank's ``solver.backward_passes_per_step`` micro-batches; BN sees one at a time)."""
    user = config_mod.load(args.config, args.overrides)
    per_rank = user.data.images_per_rank
    fixed = [f"solver.batch_size={per_rank * ranks * user.solver.backward_passes_per_step}", "data.val=", f"train.output_dir={output_dir}",
             f"solver.max_iter={max(user.solver.max_iter, args.warmup + args.steps)}"]
    if user.model.norm == "cgbn":
        fixed.append(f"model.bn_size={per_rank * ranks}")
    return config_mod.load(args.config, [*args.overrides, *fixed])


def _runtime(args):
    """This rank's device and autocast from the user's config (before the communicator starts)."""
    return build_runtime(config_mod.load(args.config, args.overrides))


def _measure(args, comm: comm_mod.Communicator) -> Optional[Dict]:
    """Time ``args.steps`` training steps on every rank of ``comm``; the row on rank 0, else None."""
    with tempfile.TemporaryDirectory(prefix="megdet-bench-train-") as output_dir:
        cfg = _config(args, comm.size, output_dir)
        trainer = Trainer(cfg, comm, build_runtime(cfg))
        try:
            seconds = _time_steps(trainer, args.warmup, args.steps)
        finally:
            trainer.stop.restore()
    everyone = comm.allgather_object(seconds)  # [rank][step][phase] seconds
    if comm.rank != 0:
        return None
    per_rank = cfg.data.images_per_rank
    per_step = per_rank * cfg.solver.backward_passes_per_step
    step_seconds = [[sum(step.values()) for step in rank] for rank in everyone]
    totals = {phase: sum(step[phase] for rank in everyone for step in rank) for phase in PHASES}
    return {"ranks": comm.size, "images_per_rank": per_rank,
            "seconds_per_step": statistics.median(max(steps) for steps in zip(*step_seconds)),
            "images_per_s": sum(per_step * len(steps) / sum(steps) for steps in step_seconds),
            **{f"{phase}_share": totals[phase] / sum(totals.values()) for phase in PHASES},
            "scaling_efficiency": 1.0 if comm.size == 1 else None, "engine": comm_mod.describe()}


def _on_device(item, device: torch.device):
    """A loader item's (images, targets) on ``device``; its data error raised (a corrupt record)."""
    batch, _, _, error = item
    if error is not None:
        raise UserError(error)
    return to_device(*batch[:2], device)


def _time_steps(trainer: Trainer, warmup: int, steps: int) -> List[Dict[str, float]]:
    """Run ``warmup + steps`` steps of ``Trainer.step``; each timed step's seconds per phase."""
    batches = iter(trainer.loader())
    device = trainer.device
    timed = []
    for iteration in range(warmup + steps):
        marks = {"start": time.perf_counter()}

        def mark(phase: str) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks[phase] = time.perf_counter()

        micro_batches = [_on_device(next(batches), device) for _ in range(trainer.passes)]
        trainer.agree_before_step(None)
        mark("data")
        trainer.step(iteration, micro_batches, mark=mark)
        if iteration >= warmup:
            ends = [marks[phase] for phase in ("start", *PHASES)]
            timed.append({phase: end - start for phase, start, end in zip(PHASES, ends, ends[1:])})
    return timed
