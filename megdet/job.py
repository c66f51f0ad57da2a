"""``megdet job``: a Slurm or PBS script that trains a preset on N GPUs, its batch, BN and LR checked
against that launch and written in the script's header.

    megdet job --scheduler slurm --gpus 64 --config megdet_r50_fpn_bs256_bn32 -o megdet-64.sbatch
    megdet job --scheduler pbs --gpus 160 --config largedet_coco_12min --data /lustre/coco/shards \\
        --stage-to-local /local/coco --queue gpu --account proj42 -o largedet.pbs
    megdet job --scheduler slurm --gpus 16 --command 'megdet doctor'   # check a new cluster's launch first
    megdet job --regenerate   # the scripts committed in jobs/slurm and jobs/pbs (PAPER_JOBS)

The preset's global batch is kept and spread over the GPUs: each rank takes batch / GPUs images
(passed to ``megdet train`` as ``data.images_per_rank`` when it differs from the preset's). Those images
must fit one GPU of ``--gpu-memory`` GB by the peak-memory model of ``megdet.memory_model`` (default: the
memory of the paper's GPU, ``paper.gpu_memory_gb``: 12 for MegDet's Titan Xp, 32 for LargeDet's V100): if
they do not, more backbone stages are recomputed (``model.sublinear_stages``, said in the header), and
when none suffices the job is refused.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Dict

from hpc import batch_scripts
from hpc.errors import UserError
from megdet import config, memory_model

DEFAULT_PRESET = "megdet_r50_fpn_bs256_bn32"
# CPUs per rank where data.num_workers is null (the loader takes the rank's CPUs less one): the training
# process and 2 loading workers, which decode several times the images a GPU trains on per second
# (docs/benchmarks.md, `megdet bench loader`: the training worker's cost and the job scripts' CPUs).
DEFAULT_CPUS_PER_RANK = 3
# The scripts committed in jobs/: every preset of a paper row that gives its GPU count, on those GPUs
# (paper.gpus), as many per node as the paper's machines have (paper.gpus_per_node) and checked against
# the memory of the paper's GPU (paper.gpu_memory_gb). MegDet Table 3: 2 to 128 GPUs, 8 per machine;
# LargeDet Table 2: 8 to 96 GPUs, Table 4's 12-minute run: 160 GPUs, and Table 5 (Open Images, ResNet-50
# and -101): 8, 32 and 64 GPUs, on 16-GPU DGX-2 servers.
PAPER_JOBS = (
    "megdet_r50_fpn_bs16", "megdet_r50_fpn_bs2_bn2", "megdet_r50_fpn_bs4_bn4", "megdet_r50_fpn_bs8_bn8",
    "megdet_r50_fpn_bs16_bn2", "megdet_r50_fpn_bs16_bn16", "megdet_r50_fpn_bs32_bn32", "megdet_r50_fpn_bs64_bn64",
    "megdet_r50_fpn_bs64_bn32", "megdet_r50_fpn_bs64_bn16", "megdet_r50_fpn_bs128_bn32", "megdet_r50_fpn_bs128_bn16",
    "megdet_r50_fpn_bs256_bn32", "megdet_r50_fpn_bs256_bn16", "megdet_r50_fpn_bs16_bn16_long",
    "megdet_r50_fpn_bs32_bn32_long", "megdet_r50_fpn_bs64_bn32_long", "megdet_r50_fpn_bs128_bn32_long",
    "megdet_r50_fpn_bs256_bn32_long", "megdet_r50_fpn_bs256_bn16_long",
    "largedet_r50_fpn_bs16_sgd", "largedet_r50_fpn_bs128_lamb", "largedet_r50_fpn_bs128_pmdlamb",
    "largedet_r50_fpn_bs256_lamb", "largedet_r50_fpn_bs256_pmdlamb", "largedet_r50_fpn_bs512_lamb",
    "largedet_r50_fpn_bs512_pmdlamb", "largedet_r50_fpn_bs512_pmdlamb_1.4x", "largedet_r50_fpn_bs640_lamb",
    "largedet_r50_fpn_bs640_pmdlamb", "largedet_r50_fpn_bs640_pmdlamb_1.4x", "largedet_r50_fpn_bs1056_lamb",
    "largedet_r50_fpn_bs1056_pmdlamb", "largedet_r50_fpn_bs1056_pmdlamb_1.4x", "largedet_coco_12min",
    "largedet_mask_rcnn_coco_17min",
    "largedet_oi_r50_fpn_bs16", "largedet_oi_r50_fpn_bs320", "largedet_oi_r50_fpn_bs640",
    "largedet_oi_r101_fpn_bs16", "largedet_oi_r101_fpn_bs320", "largedet_oi_r101_fpn_bs640",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", choices=sorted(batch_scripts.SCHEDULERS), help="batch system of the script")
    parser.add_argument("--gpus", "--ranks", dest="gpus", type=int, help="GPUs (= ranks) in all (--ranks with --cpu)")
    parser.add_argument("--gpus-per-node", "--ranks-per-node", dest="gpus_per_node", type=int,
                        help="GPUs (= ranks) per node (default: the preset's paper setting, at most --gpus)")
    parser.add_argument("--config", default=DEFAULT_PRESET, metavar="PRESET",
                        help=f"preset name or YAML file to train (default {DEFAULT_PRESET})")
    parser.add_argument("--launcher", choices=batch_scripts.LAUNCHERS, default="mpirun",
                        help="what starts the ranks (default mpirun; srun needs an MPI with Slurm's PMI2)")
    parser.add_argument("--engine", choices=batch_scripts.ENGINES, default="horovod",
                        help="what averages the gradients: horovod (default; cross-GPU BN on torch.distributed) "
                        "or torch (torch.distributed for both; under srun or mpirun)")
    parser.add_argument("--time", default="24:00:00", help="time limit HH:MM:SS (default 24:00:00)")
    parser.add_argument("--partition", "--queue", dest="queue", help="Slurm partition / PBS queue")
    parser.add_argument("--account", help="account to charge")
    parser.add_argument("--data", metavar="SHARDS_DIR", help="training shards (default: the preset's data.train)")
    parser.add_argument("--stage-to-local", metavar="DIR",
                        help="copy the shards to this node-local folder, once per node, before the launch")
    parser.add_argument("--node-local-bn", action="store_true",
                        help="require every cross-GPU BN group to lie inside one node (model.bn_node_local=true, "
                        "checked here and by megdet train; the MegDet presets set it)")
    parser.add_argument("--gpu-memory", type=float, metavar="GB",
                        help="memory of one GPU, which the images per GPU must fit (default: the paper's GPU, "
                        "paper.gpu_memory_gb: 12 for the MegDet presets, 32 for LargeDet's)")
    parser.add_argument("--cpu", action="store_true", help="ranks compute on CPUs: request no GPUs "
                        "(--gpus then counts CPU ranks; the shapes demo, tests)")
    parser.add_argument("--cpus-per-rank", type=int,
                        help=f"CPU cores per rank (default: the preset's data.num_workers + 1, or "
                        f"{DEFAULT_CPUS_PER_RANK} where it leaves the loading workers to the launcher)")
    parser.add_argument("--command", dest="rank_command",
                        help="run this on every rank instead of 'megdet train PRESET ...' "
                        "(e.g. 'megdet doctor'); \"${RESUME_ARGS[@]}\" expands to --resume once the run folder holds a "
                        "checkpoint (*.pt), else to nothing")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the script here (default: stdout)")
    parser.add_argument("--regenerate", action="store_true",
                        help="render every script committed in jobs/slurm and jobs/pbs (the paper rows)")


def _bn_text(cfg: config.Config, gpus: int, gpus_per_node: int) -> str:
    if cfg.model.norm == "frozen":
        return "BN frozen (BN size 0)"
    if cfg.model.norm == "bn":
        return f"BN per GPU ({cfg.data.images_per_rank} images)"
    group = cfg.bn_groups.group_size or gpus
    where = "inside one node" if gpus_per_node % group == 0 else f"spanning {-(-group // gpus_per_node)} nodes"
    return f"cross-GPU BN size {group * cfg.data.images_per_rank} ({group} GPUs per group, {where})"


def _command_line(args, gpus_per_node: int) -> str:
    """The ``megdet job`` command that renders this script (the options that were given)."""
    words = ["megdet", "job", "--scheduler", args.scheduler, "--gpus", str(args.gpus),
             "--gpus-per-node", str(gpus_per_node), "--config", args.config]
    queue_flag = "--partition" if args.scheduler == "slurm" else "--queue"
    for flag, value, default in (("--launcher", args.launcher, "mpirun"), ("--engine", args.engine, "horovod"),
                                 ("--time", args.time, "24:00:00"),
                                 (queue_flag, args.queue, None), ("--account", args.account, None),
                                 ("--gpu-memory", args.gpu_memory, None),
                                 ("--data", args.data, None), ("--stage-to-local", args.stage_to_local, None),
                                 ("--cpus-per-rank", args.cpus_per_rank, None), ("--command", args.rank_command, None)):
        if value != default:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    words += [flag for flag, on in (("--node-local-bn", args.node_local_bn), ("--cpu", args.cpu)) if on]
    return " ".join(shlex.quote(word) for word in words)


def plan(args) -> batch_scripts.Job:
    """The checked job of ``args``; raises ``UserError`` (before anything is written) when it cannot run."""
    if args.scheduler is None or args.gpus is None:
        raise UserError("give --scheduler slurm|pbs and --gpus N (or --regenerate)")
    cfg = config.load(args.config)
    gpus, batch = args.gpus, cfg.solver.batch_size
    gpus_per_node = min(cfg.paper.gpus_per_node, gpus) if args.gpus_per_node is None else args.gpus_per_node
    batch_scripts.check_nodes(gpus, gpus_per_node)
    if batch % gpus:
        unit = "CPU ranks" if args.cpu else "GPUs"
        raise UserError(f"the batch of {args.config} ({batch} images) does not split over {gpus} {unit}: ask for a "
                        f"divisor of {batch} {unit} (the paper used {cfg.paper.gpus} GPUs)")
    preset_images = cfg.data.images_per_rank
    overrides = [] if batch // gpus == preset_images else [f"data.images_per_rank={batch // gpus}"]
    if args.node_local_bn and not cfg.model.bn_node_local:
        overrides.append("model.bn_node_local=true")
    cfg = config.load(args.config, overrides)
    cfg.check_world(gpus, gpus_per_node)
    memory_note = []
    if not args.cpu:
        gpu_memory = cfg.paper.gpu_memory_gb if args.gpu_memory is None else args.gpu_memory
        if gpu_memory is None:
            raise UserError(f"the preset {args.config} names no paper GPU (paper.gpu_memory_gb is null): give the "
                            "memory of one GPU, e.g. --gpu-memory 32, or --cpu for CPU ranks")
        if gpu_memory <= 0:
            raise UserError(f"--gpu-memory {gpu_memory:g} must be the positive memory of one GPU in GB, e.g. 32")
        estimate = memory_model.fit(cfg, gpu_memory)
        added = [stage for stage in estimate.recomputed if stage not in cfg.model.sublinear_stages]
        if added:
            overrides.append(f"model.sublinear_stages=[{','.join(estimate.recomputed)}]")
            cfg = config.load(args.config, overrides)
        recomputed = ", ".join(estimate.recomputed) or "no stage"
        memory_note = [f"  memory: about {estimate.gib:.1f} GB of the {gpu_memory:g} GB per GPU "
                       f"(megdet.memory_model), {recomputed} recomputed"
                       + (f": {', '.join(added)} added to fit {cfg.data.images_per_rank} images" if added else "")]
    data = args.data or (cfg.data.train if args.stage_to_local else None)

    command = args.rank_command or " ".join(
        ["megdet", "train", shlex.quote(args.config), *map(shlex.quote, overrides), 'train.output_dir="$RUN_DIR"',
         *(['data.train="$DATA"'] if data else []), '"${RESUME_ARGS[@]}"'])
    unit = "CPU ranks" if args.cpu else "GPUs"
    nodes = gpus // gpus_per_node
    job = batch_scripts.Job(
        scheduler=args.scheduler, name=f"{cfg.name}-{gpus}{'cpu' if args.cpu else 'gpu'}", gpus=gpus,
        gpus_per_node=gpus_per_node, command=command, run_dir=cfg.train.output_dir, launcher=args.launcher,
        engine=args.engine, time=args.time, cpu=args.cpu,
        cpus_per_rank=args.cpus_per_rank if args.cpus_per_rank is not None else (
            DEFAULT_CPUS_PER_RANK if cfg.data.num_workers is None else cfg.data.num_workers + 1),
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
    scripts = {}
    for preset in PAPER_JOBS:
        for scheduler in sorted(batch_scripts.SCHEDULERS):
            job = plan(_paper_args(scheduler, preset))
            scripts[batch_scripts.TEMPLATES.parent / scheduler / job.file_name] = batch_scripts.render(job)
    return scripts


def _paper_args(scheduler: str, preset: str) -> argparse.Namespace:
    """``megdet job``'s arguments for ``preset`` on the paper's GPUs."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--scheduler", scheduler, "--gpus", str(config.load(preset).paper.gpus),
                              "--config", preset])


def paper_table() -> str:
    """The Markdown table of the committed scripts (one row per preset of PAPER_JOBS), from the same
    plan as the scripts: jobs/README.md shows it between TABLE_BEGIN and TABLE_END."""
    rows = ["| Script (`.sbatch` / `.pbs`) | Paper row | GPUs = nodes x per node | Batch = GPUs x images | BN size | "
            "LR | Memory per GPU (model) | Paper time |", "|---|---|---|---|---|---|---|---|"]
    for preset in PAPER_JOBS:
        job = plan(_paper_args("slurm", preset))
        cfg = config.load(preset)
        gpus, per_node = job.gpus, job.gpus_per_node
        bn = {"frozen": "frozen", "bn": "per GPU"}.get(cfg.model.norm) or str(
            (cfg.bn_groups.group_size or gpus) * cfg.data.images_per_rank)
        estimate = memory_model.fit(cfg, cfg.paper.gpu_memory_gb)
        recomputed = f", {', '.join(estimate.recomputed)} recomputed" if estimate.recomputed else ""
        rows.append(f"| `{Path(job.file_name).stem}` | {cfg.paper.row} | {gpus} = {gpus // per_node} x {per_node} | "
                    f"{cfg.solver.batch_size} = {gpus} x {cfg.data.images_per_rank} | {bn} | {cfg.solver.lr:g} | "
                    f"{estimate.gib:.1f} of {cfg.paper.gpu_memory_gb:g} GB{recomputed} | "
                    f"{cfg.paper.expected_time or 'not reported'} |")
    return "\n".join(rows) + "\n"


TABLE_BEGIN = "<!-- rendered by `megdet job --regenerate` (megdet.job.paper_table): do not edit by hand -->\n"
TABLE_END = "<!-- end of the rendered table -->\n"
README = batch_scripts.TEMPLATES.parent / "README.md"


def paper_readme() -> str:
    """jobs/README.md with its table rendered afresh."""
    text = README.read_text()
    head, _, rest = text.partition(TABLE_BEGIN)
    _, _, tail = rest.partition(TABLE_END)
    return head + TABLE_BEGIN + paper_table() + TABLE_END + tail


def run(args) -> int:
    if args.regenerate:
        for path, text in {**paper_scripts(), README: paper_readme()}.items():
            path.write_text(text)
            print(f"wrote {path}")
        return 0
    text = batch_scripts.render(plan(args))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0

