"""``megdet train CONFIG [key=value ...]``: the large mini-batch training run, with evaluation at the end.

    horovodrun -np 8 -H localhost:8 megdet train megdet_r50_fpn_bs16        # 8 GPUs, Horovod
    mpirun -np 160 -hosts ... megdet train largedet_coco_12min --resume     # Horovod over MPI
    srun --ntasks 128 --mpi=pmi2 megdet train megdet_r50_fpn_bs256_bn32
    horovodrun --gloo -np 2 -H localhost:2 megdet train shapes_r18_cpu      # the demo, 2 CPU ranks
    megdet train shapes_r18_cpu solver.max_iter=50 data.images_per_rank=8 solver.batch_size=8   # 1 process

Each rank reads its share of the training shards, the detector's batch norm shares statistics over
``model.bn_size`` images (cross-GPU BN groups), gradients are averaged over all ranks, and the learning
rate follows the schedule as a pure function of the iteration. Rank 0 writes into the run folder
(``train.output_dir``, default ``runs/<config name>``): ``config.yaml``, ``metrics.jsonl``,
checkpoints ``model_<iteration>.pt``, and at the end ``bbox_results.json``, ``metrics.json`` and the
``metrics.png`` plot.

``--resume`` continues from the latest checkpoint of the run folder (or the file given) exactly:
model, optimizer moments (PMD-LAMB's cycle position), iteration (schedule and sampler position) and
every rank's random state. SIGTERM or SIGUSR1 (Slurm's ``--signal=B:USR1@120``, which the job scripts in
``jobs/`` forward to the launcher) make every rank stop at the same iteration, checkpoint, and exit with
status 75 (``EXIT_PREEMPTED``) so a job script requeues. ``mpirun`` and ``srun`` pass that status on;
``horovodrun`` exits 1 and prints each rank's status.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from hpc import checkpoint
from hpc import comm as comm_mod
from hpc import launch
from hpc.errors import UserError
from hpc.files import write_atomic
from hpc.distributed import DistributedOptimizer
from hpc.optim import LAMB, LARS, PMDLAMB, param_groups
from hpc.schedule import Schedule
from hpc.shards import DistributedShardSampler, ShardDataset
from megdet import config as config_mod
from megdet.data.transforms import build_transform, collate
from megdet.engine import evaluate as evaluate_mod
from megdet.engine.metrics import METRICS_FILE, PLOT_FILE, MetricsLogger, plot_metrics, read_metrics
from megdet.model import build_detector


def build_model(cfg: config_mod.Config, *, inference: bool = False) -> torch.nn.Module:
    """The detector of ``cfg.model`` (a collective under cross-GPU BN: call it on every rank).

    inference: for evaluation only. Batch norm in eval mode uses the running statistics, so cross-GPU
    BN becomes plain BN (same parameters and buffers) and any number of ranks can evaluate.
    """
    cross_gpu = cfg.model.norm == "cgbn" and not inference
    model = build_detector(cfg.model.name, num_classes=cfg.model.num_classes,
                           norm="bn" if cfg.model.norm == "cgbn" and inference else cfg.model.norm,
                           bn_group_size=cfg.bn_group_ranks() if cross_gpu else None,
                           backbone_weights=cfg.model.backbone_weights,
                           sublinear_stages=tuple(cfg.model.sublinear_stages),
                           score_threshold=cfg.eval.score_thresh, nms_threshold=cfg.eval.nms_thresh,
                           detections_per_image=cfg.eval.detections_per_image, **model_settings(cfg))
    # Activations only: channels-last weights would give channels-last gradients, which Horovod refuses.
    model.channels_last = cfg.train.channels_last
    return model


def model_settings(cfg: config_mod.Config) -> Dict:
    """The detector settings ``cfg.model`` overrides (``megdet.model.detector.DEFAULTS`` keys)."""
    settings = {}
    if cfg.model.anchor_sizes is not None:
        settings["anchor_sizes"] = tuple(cfg.model.anchor_sizes)
    if cfg.model.rois_per_image is not None:
        settings["roi_batch_size_per_image"] = cfg.model.rois_per_image
    if cfg.model.roi_positive_fraction is not None:
        settings["roi_positive_fraction"] = cfg.model.roi_positive_fraction
    for key in ("fpn_channels", "box_head_dim"):
        if getattr(cfg.model, key) is not None:
            settings[key] = getattr(cfg.model, key)
    if cfg.model.proposals_per_image is not None:
        kept = cfg.model.proposals_per_image
        settings["rpn_post_nms_topk"] = (kept, kept)
        settings["rpn_pre_nms_topk"] = (2 * kept, 2 * kept)
    return settings


def autocast(cfg: config_mod.Config):
    """The context the training forward pass runs in: bf16 autocast for ``train.amp=bf16``. The detector
    decodes boxes, pools RoIs and takes its softmax in float32 (megdet.model), so only the convolutions
    and FC layers run in bf16."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.amp == "bf16")


def build_optimizer(cfg: config_mod.Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``cfg.solver.optimizer`` over ``model``'s parameters, no weight decay on norm and bias parameters."""
    solver = cfg.solver
    groups = param_groups(model, weight_decay=solver.weight_decay)
    for group in groups:
        group["layer_adaptation"] = group["name"] in config_mod.LAYER_ADAPTATION[solver.layer_adaptation]
    if solver.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=solver.lr, momentum=solver.momentum)
    if solver.optimizer == "pmd_lamb":
        return PMDLAMB(groups, lr=solver.lr, alpha=solver.pmd_alpha, T=solver.pmd_cycle, betas=tuple(solver.betas),
                       weight_decay=solver.weight_decay, eps=solver.eps)
    if solver.optimizer == "lamb":
        return LAMB(groups, lr=solver.lr, betas=tuple(solver.betas), weight_decay=solver.weight_decay, eps=solver.eps)
    return LARS(groups, lr=solver.lr, momentum=solver.momentum, weight_decay=solver.weight_decay)


def build_schedule(cfg: config_mod.Config) -> Schedule:
    solver = cfg.solver
    return Schedule(lr=solver.lr, max_iter=solver.max_iter, steps=tuple(solver.steps),
                    decay_factors=tuple(solver.decay_factors), warmup_iters=solver.warmup_iters,
                    warmup_factor=solver.warmup_factor)


def run_dir(cfg: config_mod.Config) -> Path:
    return Path(cfg.train.output_dir or Path("runs") / cfg.name)


class _TrainingBatches(torch.utils.data.Dataset):
    """Decodes and transforms one rank's batch, keyed by (iteration, dataset indices).

    The random draws of the transform (size, flip) come from (seed, iteration, rank, position), not from a
    process-wide generator, so a batch is the same whichever worker makes it and after a resume.
    """

    def __init__(self, dataset: ShardDataset, transform, *, seed: int, rank: int):
        self.dataset, self.transform, self.seed, self.rank = dataset, transform, seed, rank

    def __getitem__(self, key: Tuple[int, List[int]]):
        iteration, indices = key
        samples = [self.transform(self.dataset[index], np.random.default_rng((self.seed, iteration, self.rank, position)))
                   for position, index in enumerate(indices)]
        return collate(samples), sum(sample.num_degenerate for sample in samples)


def _batch_keys(sampler: DistributedShardSampler, start: int, stop: int) -> Iterator[Tuple[int, List[int]]]:
    """(iteration, indices) for iterations start..stop-1, crossing epochs."""
    iteration = start
    while iteration < stop:
        epoch, offset = divmod(iteration, sampler.iterations_per_epoch)
        sampler.set_epoch(epoch, start_iteration=offset)
        for indices in sampler:
            yield iteration, list(indices)
            iteration += 1
            if iteration == stop:
                return


def _as_is(batch):
    return batch


class Trainer:
    """One training run of ``cfg`` on ``comm``'s ranks; see the module docstring."""

    def __init__(self, cfg: config_mod.Config, comm: comm_mod.Communicator, *, resume: Optional[str] = None):
        self.cfg, self.comm = cfg, comm
        self.out = run_dir(cfg)
        self.stop = checkpoint.StopSignals()
        error = None
        try:
            cfg.check_world(comm.size, comm.local_size)
            self.train_set = ShardDataset(cfg.data.train)
            self.val_set = ShardDataset(cfg.data.val) if cfg.data.val else None
            self.transform = build_transform(cfg, categories=self.train_set.categories, train=True)
            self.resume_path = self._resume_path(resume)
        except UserError as failure:
            error = str(failure)
        comm.agree(error)  # a missing shard on one node stops every rank, not only that one

        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg)
        self.model.train()
        torch.manual_seed(cfg.train.seed + comm.rank)  # the detector's sampling differs between ranks
        self.optimizer = DistributedOptimizer(build_optimizer(cfg, self.model), self.model,
                                              batch_size=cfg.solver.batch_size, comm=comm)
        self.schedule = build_schedule(cfg)
        self.start_iter = 0
        if self.resume_path is not None:
            self._load(self.resume_path)
        self.sampler = DistributedShardSampler(self.train_set.aspect_groups, batch_size=cfg.data.images_per_rank,
                                               rank=comm.rank, world_size=comm.size, seed=cfg.train.seed)
        self.metrics = MetricsLogger(self.out / METRICS_FILE, enabled=comm.rank == 0, resume_from=self.start_iter)
        if comm.rank == 0:
            write_atomic(self.out / "config.yaml", cfg.to_yaml())

    def _resume_path(self, resume: Optional[str]) -> Optional[Path]:
        if resume is None:
            existing = checkpoint.latest(self.out)
            if existing is not None:
                raise UserError(f"{self.out} already holds checkpoints (latest {existing.name}): pass --resume to "
                                "continue that run, or set train.output_dir to a new folder")
            return None
        if resume == "auto":
            return checkpoint.latest(self.out)
        return Path(resume)

    def _load(self, path: Path) -> None:
        error = None
        try:
            state = checkpoint.load(path, required_keys=("model", "optimizer", "iteration", "model_name"))
            if (state["model_name"], state["num_classes"]) != (self.cfg.model.name, self.cfg.model.num_classes):
                raise checkpoint.CheckpointError(
                    f"checkpoint {path} holds a {state['model_name']} with {state['num_classes']} classes, but "
                    f"{self.cfg.name} builds a {self.cfg.model.name} with {self.cfg.model.num_classes}: resume with "
                    "the config that wrote it, or start a new output_dir")
        except UserError as failure:
            error = str(failure)
        self.comm.agree(error)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_iter = int(state["iteration"])
        if state.get("world_size") == self.comm.size:
            checkpoint.set_rng_state(state["rng"][self.comm.rank])
        elif self.comm.rank == 0:
            print(f"megdet train: {path} was written by {state.get('world_size')} ranks, this run has "
                  f"{self.comm.size}: random states are not restored (the run is not bit-exact)", file=sys.stderr)
        if self.comm.rank == 0:
            print(f"megdet train: resumed from {path} at iteration {self.start_iter}", flush=True)

    def save(self, iteration: int) -> Optional[Path]:
        """Checkpoint the state after ``iteration`` steps (collective: gathers every rank's random state)."""
        rng = checkpoint.gather_rng_states(self.comm)
        if self.comm.rank != 0:
            return None
        return checkpoint.save(checkpoint.checkpoint_path(self.out, iteration), {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "iteration": iteration,
            "model_name": self.cfg.model.name, "num_classes": self.cfg.model.num_classes,
            "config": self.cfg.to_dict(), "rng": rng, "world_size": self.comm.size})

    def loader(self) -> torch.utils.data.DataLoader:
        """This rank's batches of iterations start_iter..max_iter-1, as ((images, targets, ids, sizes),
        boxes dropped as degenerate)."""
        batches = _TrainingBatches(self.train_set, self.transform, seed=self.cfg.train.seed, rank=self.comm.rank)
        workers = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(
            batches, sampler=_batch_keys(self.sampler, self.start_iter, self.cfg.solver.max_iter), batch_size=None,
            collate_fn=_as_is, num_workers=workers, prefetch_factor=2 if workers else None,
            # its own generator: a DataLoader draws a seed from the global one, which a resume restores
            generator=torch.Generator().manual_seed(self.cfg.train.seed))

    def train(self) -> int:
        """Run to ``solver.max_iter`` (or the target AP); returns the process exit status."""
        cfg, comm = self.cfg, self.comm
        window = {"images": 0, "time": 0.0, "data": 0.0, "degenerate": 0, "steps": 0, "losses": {}}
        progress = tqdm(total=cfg.solver.max_iter, initial=self.start_iter, disable=comm.rank != 0,
                        desc=cfg.name, unit="it", dynamic_ncols=True, mininterval=2.0)
        tick = time.perf_counter()
        for iteration, ((images, targets, _, _), degenerate) in enumerate(self.loader(), start=self.start_iter):
            data_done = time.perf_counter()
            lr = self.schedule.lr_at(iteration)
            for group in self.optimizer.optimizer.param_groups:
                group["lr"] = lr
            with autocast(cfg):
                losses = self.model(images, targets)
            total = sum(losses.values())
            self.optimizer.backward(total)
            self.optimizer.step()
            self.optimizer.zero_grad()
            now = time.perf_counter()
            window["images"] += cfg.solver.batch_size
            window["time"] += now - tick
            window["data"] += data_done - tick
            window["degenerate"] += degenerate
            window["steps"] += 1
            for name, value in {"loss": total, **losses}.items():
                window["losses"][name] = window["losses"].get(name, 0.0) + value.detach()
            tick = now
            done = iteration + 1
            progress.update(1)

            stop_requested = False
            if done % cfg.train.log_period == 0 or done == cfg.solver.max_iter:
                logged_losses, stop_requested = self._log(done, lr, window)
                progress.set_postfix(loss=f"{logged_losses['loss']:.3f}", lr=f"{lr:.3g}",
                                     img_s=f"{logged_losses['images_per_s']:.1f}", refresh=False)
                window = {**dict.fromkeys(window, 0), "losses": {}}
            if done % cfg.train.checkpoint_period == 0 and done < cfg.solver.max_iter:
                self.save(done)
            if cfg.train.eval_period and done % cfg.train.eval_period == 0 and done < cfg.solver.max_iter:
                metrics = self.evaluate(done)
                if cfg.train.target_ap is not None and metrics["AP"] >= cfg.train.target_ap:
                    if comm.rank == 0:
                        print(f"megdet train: box AP {metrics['AP']:.1f} >= target {cfg.train.target_ap} at "
                              f"iteration {done}: stopping", flush=True)
                    self.save(done)
                    return self._finish(done, evaluated=True)
            if stop_requested:
                path = self.save(done)
                if comm.rank == 0:
                    print(f"megdet train: stop signal: checkpoint {path} at iteration {done}; exiting with "
                          f"{checkpoint.EXIT_PREEMPTED} so the job can be requeued", flush=True)
                progress.close()
                return checkpoint.EXIT_PREEMPTED
        progress.close()
        return self._finish(cfg.solver.max_iter)

    def _log(self, iteration: int, lr: float, window: Dict) -> Tuple[Dict[str, float], bool]:
        """Average the window's losses over its steps and the ranks and write a metrics line; returns what
        was logged and whether any rank has received a stop signal. One allreduce carries both, so stop
        signals cost no collective of their own: every rank learns of one at the same metrics line
        (``train.log_period`` iterations, well inside Slurm's 120 s warning)."""
        names = sorted(window["losses"])
        sums = torch.stack([window["losses"][n].float() for n in names])
        stop_flag = torch.tensor([float(self.stop.received is not None)])
        averaged = self.comm.allreduce(torch.cat([sums / window["steps"], stop_flag]), op="average", name="train_log")
        scalars = {name: value for name, value in zip(names, averaged[:-1].tolist())}
        seconds = max(window["time"], 1e-9)
        scalars.update(lr=lr, images_per_s=window["images"] / seconds, data_fraction=window["data"] / seconds,
                       skipped_steps=self.optimizer.skipped_steps, dropped_boxes=window["degenerate"])
        self.metrics.log(iteration, **scalars)
        return scalars, averaged[-1].item() > 0

    def evaluate(self, iteration: int) -> Dict[str, float]:
        """Box AP on the validation shards (every rank infers its share), logged; returns the metrics."""
        if self.val_set is None:
            raise UserError(f"{self.cfg.name} evaluates during training but data.val is empty: set data.val=SHARDS")
        metrics, table = evaluate_mod.evaluate_on_shards(self.model, self.val_set, self.cfg, self.comm,
                                                         out_dir=self.out if self.comm.rank == 0 else None)
        self.model.train()
        self.metrics.log(iteration, **{k: metrics[k] for k in ("AP", "AP50", "AP75")})
        if self.comm.rank == 0:
            print(f"megdet train: evaluation at iteration {iteration}\n{table}", end="", flush=True)
        return metrics

    def _finish(self, iteration: int, evaluated: bool = False) -> int:
        path = self.save(iteration)
        if not evaluated and self.val_set is not None:
            self.evaluate(iteration)
        if self.comm.rank == 0:
            plot = plot_metrics(read_metrics(self.out / METRICS_FILE), self.out / PLOT_FILE)
            print(f"megdet train: finished {iteration} iterations on {self.comm.size} ranks; checkpoint {path}; "
                  f"plot {plot}", flush=True)
        self.stop.restore()
        return 0


def add_arguments(parser) -> None:
    parser.add_argument("config", help=f"a preset ({', '.join(config_mod.PRESETS)}) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. solver.max_iter=100 data.train=DIR")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT, or (no value) from the run folder's latest one if any")


def init_rank() -> comm_mod.Communicator:
    """Start the communicator and share the host's cores out between its ranks."""
    comm = comm_mod.init()
    threads = launch.threads_per_rank(comm.local_size)
    if threads is not None:
        torch.set_num_threads(threads)
    return comm


def run(args) -> int:
    comm = init_rank()
    cfg = config_mod.load(args.config, args.overrides)
    return Trainer(cfg, comm, resume=args.resume).train()
