"""``megdet job``: a Slurm or PBS script that trains a preset on N GPUs, its batch, BN and LR checked
against that launch and written in the script's header.

    megdet job --scheduler slurm --gpus 64 --config megdet_r50_fpn_bs256_bn32 -o megdet-64.sbatch
    megdet job --scheduler pbs --gpus 160 --config largedet_coco_12min --data /lustre/coco/shards \\
        --stage-to-local /local/coco --queue gpu --account proj42 -o largedet.pbs
    megdet job --scheduler slurm --gpus 16 --command 'megdet doctor'   # check a new cluster's launch first
    megdet job --regenerate   # the scripts committed in jobs/slurm and jobs/pbs (PAPER_JOBS)

The preset's global batch is kept and spread over the GPUs: each rank takes batch / GPUs images
(passed to ``megdet train`` as ``data.images_per_rank`` when it differs from the preset's).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Dict

from hpc import jobs
from hpc.errors import UserError
from megdet import config

DEFAULT_PRESET = "megdet_r50_fpn_bs256_bn32"
# The scripts committed in jobs/: (preset, GPUs), GPUs per node from the preset's paper section.
# MegDet Table 3 runs 8 to 128 GPUs, 8 per node; LargeDet's 12-minute run 160 GPUs on 10 DGX-2 nodes.
PAPER_JOBS = (("megdet_r50_fpn_bs16", 8), ("megdet_r50_fpn_bs256_bn32", 16), ("megdet_r50_fpn_bs256_bn32", 32),
              ("megdet_r50_fpn_bs256_bn32", 64), ("megdet_r50_fpn_bs256_bn32", 128), ("largedet_coco_12min", 160))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", choices=sorted(jobs.SCHEDULERS), help="batch system of the script")
    parser.add_argument("--gpus", type=int, help="GPUs (= ranks) in all")
    parser.add_argument("--gpus-per-node", type=int,
                        help="GPUs (= ranks) per node (default: the preset's paper setting, at most --gpus)")
    parser.add_argument("--config", default=DEFAULT_PRESET, metavar="PRESET",
                        help=f"preset name or YAML file to train (default {DEFAULT_PRESET})")
    parser.add_argument("--launcher", choices=jobs.LAUNCHERS, default="mpirun",
                        help="what starts the ranks (default mpirun; srun needs an MPI with Slurm's PMI2)")
    parser.add_argument("--time", default="24:00:00", help="time limit HH:MM:SS (default 24:00:00)")
    parser.add_argument("--partition", "--queue", dest="queue", help="Slurm partition / PBS queue")
    parser.add_argument("--account", help="account to charge")
    parser.add_argument("--data", metavar="SHARDS_DIR", help="training shards (default: the preset's data.train)")
    parser.add_argument("--stage-to-local", metavar="DIR",
                        help="copy the shards to this node-local folder, once per node, before the launch")
    parser.add_argument("--node-local-bn", action="store_true",
                        help="require every cross-GPU BN group to lie inside one node")
    parser.add_argument("--cpu", action="store_true", help="ranks compute on CPUs: request no GPUs "
                        "(--gpus then counts CPU ranks; the shapes demo, tests)")
    parser.add_argument("--cpus-per-rank", type=int,
                        help="CPU cores per rank (default: the preset's data.num_workers + 1)")
    parser.add_argument("--command", dest="rank_command",
                        help="run this on every rank instead of 'megdet train PRESET ...' "
                        "(e.g. 'megdet doctor'); \"${RESUME_ARGS[@]}\" expands to --resume CHECKPOINT")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the script here (default: stdout)")
    parser.add_argument("--regenerate", action="store_true",
                        help="render every script committed in jobs/slurm and jobs/pbs (the paper rows)")


def _bn_text(cfg: config.Config, gpus: int, gpus_per_node: int) -> str:
    if cfg.model.norm == "frozen":
        return "BN frozen (BN size 0)"
    if cfg.model.norm == "bn":
        return f"BN per GPU ({cfg.data.images_per_rank} images)"
    group = cfg.bn_group_ranks() or gpus
    where = "inside one node" if gpus_per_node % group == 0 else f"spanning {-(-group // gpus_per_node)} nodes"
    return f"cross-GPU BN size {group * cfg.data.images_per_rank} ({group} GPUs per group, {where})"


def _check_node_local_bn(cfg: config.Config, gpus: int, gpus_per_node: int) -> None:
    if cfg.model.norm != "cgbn":
        return
    group = cfg.bn_group_ranks() or gpus
    node_images = gpus_per_node * cfg.data.images_per_rank
    if gpus_per_node % group:
        raise UserError(f"BN size {group * cfg.data.images_per_rank} does not fit the {node_images} images of "
                        f"a node ({gpus_per_node} GPUs x {cfg.data.images_per_rank}) as --node-local-bn asks: "
                        f"use fewer GPUs (more images each), or a preset whose model.bn_size divides {node_images}")


def _command_line(args, gpus_per_node: int) -> str:
    """The ``megdet job`` command that renders this script (the options that were given)."""
    words = ["megdet", "job", "--scheduler", args.scheduler, "--gpus", str(args.gpus),
             "--gpus-per-node", str(gpus_per_node), "--config", args.config]
    queue_flag = "--partition" if args.scheduler == "slurm" else "--queue"
    for flag, value, default in (("--launcher", args.launcher, "mpirun"), ("--time", args.time, "24:00:00"),
                                 (queue_flag, args.queue, None), ("--account", args.account, None),
                                 ("--data", args.data, None), ("--stage-to-local", args.stage_to_local, None),
                                 ("--cpus-per-rank", args.cpus_per_rank, None), ("--command", args.rank_command, None)):
        if value != default:
            words += [flag, str(value)]
    words += [flag for flag, on in (("--node-local-bn", args.node_local_bn), ("--cpu", args.cpu)) if on]
    return " ".join(shlex.quote(word) for word in words)


def plan(args) -> jobs.Job:
    """The checked job of ``args``; raises ``UserError`` (before anything is written) when it cannot run."""
    if args.scheduler is None or args.gpus is None:
        raise UserError("give --scheduler slurm|pbs and --gpus N (or --regenerate)")
    cfg = config.load(args.config)
    gpus, batch = args.gpus, cfg.solver.batch_size
    gpus_per_node = min(cfg.paper.gpus_per_node, gpus) if args.gpus_per_node is None else args.gpus_per_node
    jobs.check_nodes(gpus, gpus_per_node)
    if batch % gpus:
        raise UserError(f"the batch of {args.config} ({batch} images) does not split over {gpus} GPUs: ask for a "
                        f"divisor of {batch} GPUs (the paper used {cfg.paper.gpus})")
    preset_images = cfg.data.images_per_rank
    overrides = [] if batch // gpus == preset_images else [f"data.images_per_rank={batch // gpus}"]
    cfg = config.load(args.config, overrides)
    cfg.check_world(gpus, gpus_per_node)
    if args.node_local_bn:
        _check_node_local_bn(cfg, gpus, gpus_per_node)
    data = args.data or (cfg.data.train if args.stage_to_local else None)

    command = args.rank_command or " ".join(
        ["megdet", "train", shlex.quote(args.config), *overrides, 'train.output_dir="$RUN_DIR"',
         *(['data.train="$DATA"'] if data else []), '"${RESUME_ARGS[@]}"'])
    unit = "CPU ranks" if args.cpu else "GPUs"
    nodes = gpus // gpus_per_node
    memory_note = [] if cfg.data.images_per_rank <= preset_images else [
        f"  {cfg.data.images_per_rank} images per GPU where the paper had {preset_images}: about "
        f"{cfg.data.images_per_rank / preset_images:g}x its activation memory (see model.sublinear_stages)"]
    job = jobs.Job(
        scheduler=args.scheduler, name=f"{cfg.name}-{gpus}{'cpu' if args.cpu else 'gpu'}", gpus=gpus,
        gpus_per_node=gpus_per_node, command=command, run_dir=cfg.train.output_dir, launcher=args.launcher,
        time=args.time, cpu=args.cpu,
        cpus_per_rank=cfg.data.num_workers + 1 if args.cpus_per_rank is None else args.cpus_per_rank,
        queue=args.queue, account=args.account, data=data, stage_to=args.stage_to_local,
        script_name=Path(args.output).name if args.output else None,
        header=[
            f"{cfg.paper.row}",
            f"  batch {batch} = {gpus} {unit} x {cfg.data.images_per_rank} images; "
            f"{_bn_text(cfg, gpus, gpus_per_node)}; LR {cfg.solver.lr:g} ({cfg.solver.optimizer})",
            f"  here {gpus} {unit} = {nodes} node{'s' if nodes > 1 else ''} x {gpus_per_node}; the paper: "
            f"{cfg.paper.gpus} GPUs x {preset_images} images, {cfg.paper.gpus_per_node} per node, "
            f"time {cfg.paper.expected_time or 'not reported'}",
            *memory_note,
            f"Rendered by: {_command_line(args, gpus_per_node)}",
        ])
    return job


def paper_scripts() -> Dict[Path, str]:
    """Every committed script (PAPER_JOBS x schedulers): its path in jobs/ and the text ``megdet job`` renders."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    scripts = {}
    for preset, gpus in PAPER_JOBS:
        for scheduler in sorted(jobs.SCHEDULERS):
            job = plan(parser.parse_args(["--scheduler", scheduler, "--gpus", str(gpus), "--config", preset]))
            scripts[jobs.TEMPLATES.parent / scheduler / job.file_name] = jobs.render(job)
    return scripts


def run(args) -> int:
    if args.regenerate:
        for path, text in paper_scripts().items():
            path.write_text(text)
            print(f"wrote {path}")
        return 0
    text = jobs.render(plan(args))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0

