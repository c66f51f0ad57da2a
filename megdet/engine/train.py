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

Each rank computes on its own GPU (``train.device``: cuda:<local rank>, or the CPU) under the autocast
of ``train.amp``; rank 0 first prints a banner of what runs (engines, device, AMP, kernels, BN groups).

``--resume`` continues from the newest checkpoint of the run folder that loads (a truncated or corrupt
one is skipped with a warning naming it), or the file given, exactly: model, optimizer moments
(PMD-LAMB's cycle position), iteration (schedule and sampler position) and every rank's random state.
``train.keep_checkpoints: N`` keeps the newest N. A data error on one rank (a corrupt record: with
``data.skip_corrupt: true`` it is left out and counted instead) and a checkpoint that rank 0 cannot
write stop every rank with the one line; a rank that dies or stops ends the run (``hpc.comm.watchdog``).

SIGTERM or SIGUSR1 (Slurm's ``--signal=B:USR1@120``, which the job scripts in ``jobs/`` forward to the
launcher) make every rank stop at the same iteration, checkpoint, and exit with status 75
(``EXIT_PREEMPTED``) so a job script requeues. ``mpirun`` and ``srun`` pass that status on;
``horovodrun`` exits 1 and prints each rank's status.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

from hpc import checkpoint
from hpc import comm as comm_mod
from hpc.amp import LossScaler
from hpc.distributed import DistributedOptimizer
from hpc.errors import UserError
from hpc.files import write_atomic
from hpc.optim.pmd_lamb import check_compiled_kernel
from hpc.shards import DistributedShardSampler, ShardDataset
from megdet import config as config_mod
from megdet.data.segmentation import has_segmentations
from megdet.data.coco import export_coco
from megdet.data.transforms import build_transform, collate
from megdet.engine import evaluate as evaluate_mod
from megdet.engine import show
from megdet.engine.background_scoring import EVALUATIONS_DIR, BackgroundScoring
from megdet.engine.banner import describe_optimizer, run_banner
from megdet.engine.build import (Runtime, build_model, build_optimizer, build_runtime, build_schedule, init_rank,
                                 loader_workers, run_dir)
from megdet.engine.model_checkpoint import read_for
from megdet.model.detector import check_target_values
from megdet.weights import resolve as resolve_weights
from megdet.engine.metrics import (AP_CURVES, MASK_PREFIX, METRICS_FILE, PLOT_FILE, MetricsLogger, plot_metrics,
                                   read_metrics, summary_writer_class)

Batch = Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]
# The picture printed at the end of a run (megdet show draws others): the first 8 validation images,
# detections scoring at least 0.5.
SHOW_IMAGES = 8
SHOW_SCORE_THRESHOLD = 0.5


class _TrainingBatches(torch.utils.data.Dataset):
    """Decodes and transforms one rank's batch, keyed by (iteration, dataset indices).

    The random draws of the transform (size, flip) come from (seed, iteration, rank, position), not from a
    process-wide generator, so a batch is the same whichever worker makes it and after a resume; a record
    left out as corrupt (``data.skip_corrupt``) changes no other image's draws.

    An item is (batch, boxes dropped as degenerate, records left out as corrupt, error): a data error
    (a corrupt record, an unreadable shard, a target value that ``check_target_values`` refuses, which
    the detector does not read on the device) is its one-line message, with no batch, for the training
    loop to tell every rank (raised in a DataLoader worker, it would come back as torch's multi-line
    traceback).
    """

    def __init__(self, dataset: ShardDataset, transform, *, seed: int, rank: int, num_classes: int):
        self.dataset, self.transform, self.seed, self.rank = dataset, transform, seed, rank
        self.num_classes = num_classes

    def __getitem__(self, key: Tuple[int, List[int]]):
        iteration, indices = key
        samples = []
        try:
            for position, index in enumerate(indices):
                record = self.dataset[index]
                if record is not None:
                    samples.append(self.transform(record, np.random.default_rng((self.seed, iteration, self.rank,
                                                                                 position))))
            if not samples:
                raise UserError(f"all {len(indices)} images of rank {self.rank}'s batch at iteration {iteration} are "
                                "corrupt (left out by data.skip_corrupt=true): run the same 'megdet pack' command "
                                "again to repack the shards that fail their checksum")
            batch = collate(samples)
            check_target_values(batch[1], self.num_classes)
        except UserError as error:
            return None, 0, 0, str(error)
        return batch, sum(sample.num_degenerate for sample in samples), len(indices) - len(samples), None


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


def check_segmentations(dataset: ShardDataset, where: str, sample: int = 100) -> None:
    """UserError unless the first ``sample`` images of ``dataset`` have a segmentation somewhere: a mask
    head cannot train on a data set packed without them."""
    annotations = [{"segmentation": s} for i in range(min(sample, len(dataset))) for s in dataset.segmentations(i)]
    if not has_segmentations(annotations):
        raise UserError(f"model.mask_on=true but the training shards {where} have no segmentations in their first "
                        f"{min(sample, len(dataset))} images: pack a data set with instance masks (COCO "
                        "polygons or RLE), or set model.mask_on=false")


def _target_terms(metrics: Dict[str, float], target: List[float], metric: str) -> List[Tuple[str, bool, float]]:
    """Per entry of ``target``: ("box AP50 84.2", reached, wanted)."""
    names = (metric, MASK_PREFIX + metric)[:len(target)]
    return [(f"{'mask' if name.startswith(MASK_PREFIX) else 'box'} {metric} {metrics[name]:.1f}", metrics[name] >= wanted,
             wanted) for name, wanted in zip(names, target)]


def target_reached(metrics: Dict[str, float], target: Optional[List[float]], metric: str = "AP") -> Optional[str]:
    """What ``metrics`` reached of ``train.target_ap`` ([box, mask] ``metric``, e.g. AP or AP50, in
    percent), when all of it is reached; else None."""
    if target is None:
        return None
    terms = _target_terms(metrics, target, metric)
    if all(reached for _, reached, _ in terms):
        return " and ".join(f"{score} >= target {wanted}" for score, _, wanted in terms)
    return None


def target_missed(metrics: Dict[str, float], target: Optional[List[float]], metric: str = "AP") -> Optional[str]:
    """How ``metrics`` fall short of ``train.target_ap`` ("box AP50 84.2 < target 85.0"), or None when
    there is no target or it is reached."""
    if target is None:
        return None
    terms = _target_terms(metrics, target, metric)
    if all(reached for _, reached, _ in terms):
        return None
    return " and ".join(f"{score} {'>=' if reached else '<'} target {wanted}" for score, reached, wanted in terms)


def to_device(images: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]], device: torch.device) -> Batch:
    """A batch from the loader (uint8 images, pinned when the device is a GPU) onto ``device``, with
    copies that do not wait for the host."""
    return ([image.to(device, non_blocking=True) for image in images],
            [{key: value.to(device, non_blocking=True) for key, value in target.items()} for target in targets])


@dataclass
class MetricsWindow:
    """What happened since the last metrics line: images, wall and data-wait seconds, boxes dropped as
    degenerate, records left out as corrupt (this rank's), steps, and each loss summed over the steps (on
    the device: no host sync per step)."""

    images: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0
    degenerate: int = 0
    corrupt: int = 0
    steps: int = 0
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, losses: Dict[str, torch.Tensor], images: int, seconds: float, data_seconds: float,
            degenerate: int, corrupt: int) -> None:
        self.images += images
        self.seconds += seconds
        self.data_seconds += data_seconds
        self.degenerate += degenerate
        self.corrupt += corrupt
        self.steps += 1
        for name, value in losses.items():
            self.losses[name] = self.losses[name] + value.detach() if name in self.losses else value.detach()


class Trainer:
    """One training run of ``cfg`` on ``comm``'s ranks, each on ``runtime.device``; see the module
    docstring."""

    def __init__(self, cfg: config_mod.Config, comm: comm_mod.Communicator, runtime: Runtime, *,
                 resume: Optional[str] = None):
        self.cfg, self.comm, self.runtime = cfg, comm, runtime
        self.device = runtime.device
        self.out = run_dir(cfg)
        self.stop = checkpoint.StopSignals()
        with comm.all_or_none():  # a missing shard on one node stops every rank, not only that one
            self._check_launch_and_inputs(resume)
        self._build_model()
        self._build_optimizer()
        self.start_iter = 0
        pending: List[Dict[str, int]] = []
        if resume is not None:
            pending = self._resume(resume)
        self._start_sampling_and_outputs(rescored=[p["iteration"] for p in pending])
        self.scoring: Optional[BackgroundScoring] = None
        self.result: Optional[Path] = None  # the checkpoint whose background score reached the target
        if cfg.train.async_eval:
            coco_gt = evaluate_mod.ground_truth_from_dict(export_coco(self.val_set), cfg.data.val)
            self.scoring = BackgroundScoring(comm, coco_gt, self.out / EVALUATIONS_DIR, cfg.model.with_masks)
            self.scoring.resume(pending)

    def _check_launch_and_inputs(self, resume: Optional[str]) -> None:
        """Everything a user gave that this rank can check before building: the launch's size, the shards,
        the run folder, the weights' cache, TensorBoard, the optimizer's compiled kernel."""
        cfg = self.cfg
        cfg.check_world(self.comm.size, self.comm.local_size)
        masks = cfg.model.with_masks
        self.train_set = ShardDataset(cfg.data.train, with_segmentation=masks, skip_corrupt=cfg.data.skip_corrupt)
        self.val_set = ShardDataset(cfg.data.val, with_segmentation=masks) if cfg.data.val else None
        cfg.fill_from_shards(num_classes=len(self.train_set.categories), num_images=len(self.train_set))
        if cfg.train.target_ap is not None and self.val_set is not None and self.val_set.kind == "open-images":
            raise UserError(f"train.target_ap={cfg.train.target_ap} is a COCO AP, but {cfg.data.val} holds Open Images "
                            "shards, which are scored by the Open Images mAP@0.5: set train.target_ap=null")
        if cfg.train.async_eval and self.val_set is not None and self.val_set.kind == "open-images":
            raise UserError(f"train.async_eval=true splits COCO scoring by category, but {cfg.data.val} holds Open "
                            "Images shards, scored on rank 0 in step: set train.async_eval=false")
        if masks:
            check_segmentations(self.train_set, cfg.data.train)
        self.transform = build_transform(cfg, categories=self.train_set.categories, train=True)
        if resume is None:
            self._check_fresh_start()
        if cfg.model.backbone_weights is not None:
            resolve_weights(cfg.model.backbone_weights)  # a cache that differs between nodes stops every rank
        if cfg.train.tensorboard:
            summary_writer_class()
        if cfg.solver.pmd_kernel == "compiled":
            check_compiled_kernel(self.device, key="solver.pmd_kernel=compiled", fix="solver.pmd_kernel=multi_tensor")

    def _build_model(self) -> None:
        """The detector, initialised alike on every rank (the seed), then each rank's own random stream."""
        torch.manual_seed(self.cfg.train.seed)
        self.model = build_model(self.cfg).to(self.device)
        self.model.train()
        torch.manual_seed(self.cfg.train.seed + self.comm.rank)  # the detector's sampling differs between ranks

    def _build_optimizer(self) -> None:
        """The optimizer inside the distributed one, the schedule, and the banner that says which run."""
        cfg, comm = self.cfg, self.comm
        self.workers = loader_workers(cfg, comm)
        optimizer = build_optimizer(cfg, self.model)
        banner = run_banner(cfg, comm, self.runtime, workers=self.workers,
                            optimizer=describe_optimizer(optimizer, self.device))
        if comm.rank == 0:
            print(banner, flush=True)
        self.passes = cfg.solver.backward_passes_per_step
        self.optimizer = DistributedOptimizer(optimizer, self.model,
                                              batch_size=cfg.solver.batch_size, comm=comm,
                                              backward_passes_per_step=self.passes,
                                              compression=cfg.train.grad_compression,
                                              loss_scaler=LossScaler() if self.runtime.loss_scaling else None)
        self.schedule = build_schedule(cfg)

    def _start_sampling_and_outputs(self, rescored: List[int]) -> None:
        """The sampler from ``start_iter``, the metrics log (without the numbers of ``rescored``
        evaluations, scored again), and the run's config in its folder."""
        cfg, comm = self.cfg, self.comm
        self.sampler = DistributedShardSampler(self.train_set.aspect_groups, batch_size=cfg.data.images_per_rank,
                                               rank=comm.rank, world_size=comm.size, seed=cfg.train.seed)
        self.metrics = MetricsLogger(self.out / METRICS_FILE, enabled=comm.rank == 0, resume_from=self.start_iter,
                                     rescored=rescored, tensorboard=cfg.train.tensorboard)
        if comm.rank == 0:
            write_atomic(self.out / "config.yaml", cfg.to_yaml())
            if cfg.train.tensorboard:
                print(f"megdet train: TensorBoard events in {self.out}: tensorboard --logdir {self.out.parent}",
                      flush=True)

    def _check_fresh_start(self) -> None:
        """UserError when a run without --resume would write into a run folder that holds checkpoints."""
        existing = checkpoint.latest(self.out)
        if existing is not None:
            raise UserError(f"{self.out} already holds checkpoints (latest {existing.name}): pass --resume to "
                            "continue that run, or set train.output_dir to a new folder")

    def _resume(self, resume: str) -> List[Dict[str, int]]:
        """Continue from the checkpoint ``--resume`` names, or ("auto") from the run folder's newest one
        that loads: rank 0 chooses, skipping truncated or corrupt ones with a warning naming each, and
        tells the others; none there starts afresh. A checkpoint of another model stops every rank.
        Returns the evaluations it lists as still being scored (``BackgroundScoring.pending``)."""
        path, state = None, None
        where = self.out if resume == "auto" else Path(resume)
        with self.comm.all_or_none():
            if self.comm.rank == 0 and (resume != "auto" or where.is_dir()):  # no run folder yet: none there
                path, state = self._load_checked(where)
        path = self.comm.broadcast_object(path)
        if path is None:
            return []
        with self.comm.all_or_none():  # a file that a rank on another node cannot read
            if self.comm.rank != 0:
                _, state = self._load_checked(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_iter = int(state["iteration"])
        if state.get("world_size") == self.comm.size:
            checkpoint.set_rng_state(state["rng"][self.comm.rank])
        elif self.comm.rank == 0:
            print(f"megdet train: {path} was written by {state.get('world_size')} ranks, this run has "
                  f"{self.comm.size}: random states are not restored (the run is not bit-exact)", file=sys.stderr)
        pending = list(state.get("pending_evaluations", []))
        iterations = ", ".join(str(p["iteration"]) for p in pending)
        if pending and not self.cfg.train.async_eval:
            raise UserError(f"{path} lists evaluations still being scored beside training (iteration(s) {iterations}) "
                            "but train.async_eval=false: resume with train.async_eval=true")
        if self.comm.rank == 0:
            scoring = f"; scoring again the evaluation(s) of iteration(s) {iterations}" if pending else ""
            print(f"megdet train: resumed from {path} at iteration {self.start_iter}{scoring}", flush=True)
        return pending

    def _load_checked(self, where: Path) -> Tuple[Optional[Path], Optional[dict]]:
        """(path, state) of the checkpoint at ``where`` (the run folder: its newest that loads, or (None,
        None)), CheckpointError unless it holds this config's model."""
        return read_for(self.cfg, where, ("model", "optimizer", "iteration"), warn=_warn,
                        advice="resume with the config that wrote it, or start a new output_dir")

    def save(self, iteration: int) -> Optional[Path]:
        """Checkpoint the state after ``iteration`` steps, then keep the newest ``train.keep_checkpoints``.
        Collective: gathers every rank's random state, and every rank raises if rank 0 could not write it
        (a full disk), the previous checkpoint intact."""
        rng = checkpoint.gather_rng_states(self.comm)
        path = None
        with self.comm.all_or_none():
            if self.comm.rank == 0:
                pending = self.scoring.pending if self.scoring is not None else []
                # the weights an evaluation scores stay until its score arrives, and those that reached the target
                protect = [checkpoint.checkpoint_path(self.out, p["iteration"]) for p in pending] + (
                    [self.result] if self.result is not None else [])
                path = checkpoint.save(checkpoint.checkpoint_path(self.out, iteration), {
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "iteration": iteration, **self.cfg.identity.fields(), "config": self.cfg.to_dict(), "rng": rng,
                    "world_size": self.comm.size, "pending_evaluations": pending})
                if self.cfg.train.keep_checkpoints:
                    checkpoint.prune(self.out, self.cfg.train.keep_checkpoints, protect=protect)
        return path

    def loader(self) -> torch.utils.data.DataLoader:
        """This rank's micro-batches of iterations start_iter..max_iter-1 (``backward_passes_per_step`` per
        iteration, each of ``data.images_per_rank`` images), as ((images, targets, ids, sizes), boxes
        dropped as degenerate); pinned for a GPU."""
        batches = _TrainingBatches(self.train_set, self.transform, seed=self.cfg.train.seed, rank=self.comm.rank,
                                   num_classes=self.cfg.model.num_classes)
        micro = _batch_keys(self.sampler, self.start_iter * self.passes, self.cfg.solver.max_iter * self.passes)
        return torch.utils.data.DataLoader(
            batches, sampler=micro, batch_size=None,
            collate_fn=_as_is, num_workers=self.workers, prefetch_factor=2 if self.workers else None,
            pin_memory=self.device.type == "cuda",
            # its own generator: a DataLoader draws a seed from the global one, which a resume restores
            generator=torch.Generator().manual_seed(self.cfg.train.seed))

    def step(self, iteration: int, batches: List[Batch],
             mark: Optional[Callable[[str], None]] = None) -> Dict[str, torch.Tensor]:
        """One training step at ``iteration`` on ``backward_passes_per_step`` micro-batches already on
        the device: the schedule's learning rate, forward and losses under autocast and backward for
        each (the gradient allreduces start from the last one's hooks), the wait for them, and the
        guarded optimizer step. Returns the losses averaged over the micro-batches ("loss" is their
        sum), on the device. ``mark(phase)``, when given, is called as each phase ends:
        "forward_backward", "communication", "optimizer" (``megdet bench train`` times them)."""
        lr = self.schedule.lr_at(iteration)
        for group in self.optimizer.optimizer.param_groups:
            group["lr"] = lr
        summed: Dict[str, torch.Tensor] = {}
        for images, targets in batches:
            with self.runtime.autocast():
                losses = self.model(images, targets)
            total = sum(losses.values())
            self.optimizer.backward(total)
            for name, value in {"loss": total, **losses}.items():
                summed[name] = summed[name] + value.detach() if name in summed else value.detach()
        if mark:
            mark("forward_backward")
        self.optimizer.synchronize()
        if mark:
            mark("communication")
        self.optimizer.step()
        self.optimizer.zero_grad()
        if mark:
            mark("optimizer")
        return {name: value / len(batches) for name, value in summed.items()} if len(batches) > 1 else summed

    def train(self) -> int:
        """Run to ``solver.max_iter`` (or the target AP); returns the process exit status."""
        # A bar on a terminal only: in a batch job's file its unfinished line would take in the next
        # rank's error line; there rank 0 prints a line per metrics line instead (_log).
        progress = tqdm(total=self.cfg.solver.max_iter, initial=self.start_iter,
                        disable=self.comm.rank != 0 or not sys.stderr.isatty(),
                        desc=self.cfg.name, unit="it", dynamic_ncols=True, mininterval=2.0)
        try:
            return self._train(progress)
        except BaseException:
            progress.close()  # its line ends before the error's
            if self.scoring is not None:
                self.scoring.close()
            raise

    def _train(self, progress: tqdm) -> int:
        cfg, comm = self.cfg, self.comm
        window = MetricsWindow()
        tick = self.started = time.perf_counter()
        micro_batches, degenerate, corrupt, data_error = [], 0, 0, None
        for index, (batch, dropped, skipped, error) in enumerate(self.loader(), start=self.start_iter * self.passes):
            if error is None:
                images, targets, _, _ = batch
                micro_batches.append(to_device(images, targets, self.device))
            data_error = data_error or error
            degenerate += dropped
            corrupt += skipped
            if (index + 1) % self.passes:
                continue
            iteration = index // self.passes
            scoring_was_running = bool(self.scoring and self.scoring.running)
            scoring_running, scoring_failed = self.agree_before_step(data_error)
            data_done = time.perf_counter()
            losses = self.step(iteration, micro_batches)
            now = time.perf_counter()
            window.add(losses, cfg.solver.batch_size, now - tick, data_done - tick, degenerate, corrupt)
            micro_batches, degenerate, corrupt, data_error = [], 0, 0, None
            tick = now
            done = iteration + 1
            progress.update(1)
            if iteration == self.start_iter:
                self.check_replicas(done)

            stop_requested = False
            if done % cfg.train.log_period == 0 or done == cfg.solver.max_iter:
                logged, stop_requested = self._log(done, self.schedule.lr_at(iteration), window)
                progress.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{logged['lr']:.3g}",
                                     img_s=f"{logged['images_per_s']:.1f}", refresh=False)
                if progress.disable and comm.rank == 0:
                    print(f"megdet train: iteration {done}/{cfg.solver.max_iter}: loss {logged['loss']:.3f}, "
                          f"lr {logged['lr']:.3g}, {logged['images_per_s']:.1f} images/s", flush=True)
                window = MetricsWindow()
            evaluating = cfg.train.eval_period and done % cfg.train.eval_period == 0 and done < cfg.solver.max_iter
            if evaluating and self.scoring is not None:
                self.start_scoring(done)
            elif done % cfg.train.checkpoint_period == 0 and done < cfg.solver.max_iter:
                self.save(done)
            if evaluating and self.scoring is None:
                metrics = self.evaluate(done)
                reached = target_reached(metrics, cfg.train.target_ap, cfg.train.target_metric)
                if reached:
                    if comm.rank == 0:
                        print(f"megdet train: target reached: {reached} at iteration {done}, "
                              f"{time.perf_counter() - self.started:.1f} s into training; stopping", flush=True)
                    progress.close()
                    return self._finish(done, evaluated=True)
            if scoring_was_running and (scoring_running == 0 or scoring_failed):
                scored = self.scores_arrived(done, scoring_failed)
                if scored is not None:
                    progress.close()
                    return self._finish(done, result=scored)
            if stop_requested:
                path = self.save(done)
                if comm.rank == 0:
                    print(f"megdet train: stop signal: checkpoint {path} at iteration {done}; exiting with "
                          f"{checkpoint.EXIT_PREEMPTED} so the job can be requeued", flush=True)
                progress.close()
                return checkpoint.EXIT_PREEMPTED
        progress.close()
        return self._finish(cfg.solver.max_iter, result=self.wait_for_scores(cfg.solver.max_iter))

    def check_replicas(self, iteration: int) -> None:
        """Once per run, after its first step: every rank must hold the same parameters, bit for bit (a
        rank with other code, data or seed, or a gradient it did not average, shows here). Rank 0 says so
        with the digest; a difference is a bug, raised on every rank. Collective."""
        digest = hashlib.sha256()
        for parameter in self.model.parameters():
            digest.update(parameter.detach().cpu().numpy().tobytes())
        digests = self.comm.allgather_object(digest.hexdigest())
        differ = [rank for rank, value in enumerate(digests) if value != digests[0]]
        if differ:
            raise RuntimeError(f"after iteration {iteration} the parameters of rank(s) {differ} differ from rank "
                               f"0's (sha256 {digests[0][:12]}): the replicas have diverged")
        if self.comm.rank == 0:
            print(f"megdet train: parameters after iteration {iteration} identical on all {self.comm.size} ranks "
                  f"(sha256 {digests[0][:12]})", flush=True)

    def agree_before_step(self, error: Optional[str]) -> Tuple[int, int]:
        """Raise ``error`` (this rank's data error for the coming step, or None) on every rank if any rank
        has one, before the forward pass's collectives, which a rank without its batch would never join;
        returns how many ranks' oldest background scoring is (running, failed), so that every rank
        collects a score at the same step. One three-element allreduce per step, and the messages
        (``agree``) only after a failure. The flag
        is known on the host and stays there: a CPU tensor, which the engines move on their host
        transport (gloo beside NCCL, Horovod's CPU ops), so the step neither waits for the GPU nor
        stops the host from queueing work ahead of it. It goes through cross-GPU BN's communicator,
        the one for small latency-bound collectives (its cost beside Horovod's cycle: docs/benchmarks.md,
        the demo's step under each engine). One rank alone raises its own error at once."""
        scoring = self.scoring.state() if self.scoring is not None else (0, 0)
        if self.comm.size == 1:
            self.comm.agree(error)
            return scoring
        flags = torch.tensor([0.0 if error is None else 1.0, *scoring], dtype=torch.float32)
        data_failed, running, failed = comm_mod.get_cgbn().allreduce(flags, op="sum", name="step_flags").tolist()
        if data_failed > 0:
            self.comm.agree(error)
        return round(running), round(failed)

    def start_scoring(self, iteration: int) -> None:
        """Infer every rank's share of data.val, hand the detections to the background scoring, and
        checkpoint ``iteration`` (collective): its weights are the result if the score reaches the
        target, and the checkpoint lists the evaluation as pending, for a resume to score it again."""
        began = time.perf_counter()
        local, masks = evaluate_mod.infer_on_shards(
            self.model, self.val_set, build_transform(self.cfg, categories=self.val_set.categories, train=False),
            self.comm, self.cfg.eval.images_per_rank, device=self.device, num_workers=self.workers,
            autocast=self.runtime.autocast)
        self.model.train()
        self.scoring.start(iteration, local, masks)
        self.save(iteration)
        if self.comm.rank == 0:
            print(f"megdet train: evaluation at iteration {iteration}: inferred in "
                  f"{time.perf_counter() - began:.1f} s; scoring beside training", flush=True)

    def scores_arrived(self, iteration: int, failed_ranks: int) -> Optional[Path]:
        """Collect the oldest background score (collective, at the same ``iteration`` on every rank), log
        it against the iteration it scored; the checkpoint of that iteration when it reaches the target."""
        arrived = self.scoring.collect(failed_ranks)
        self.metrics.log(arrived.iteration, **{k: v for k, v in arrived.metrics.items()
                                               if k.removeprefix(MASK_PREFIX) in AP_CURVES})
        seconds = time.perf_counter() - self.started
        reached = target_reached(arrived.metrics, self.cfg.train.target_ap, self.cfg.train.target_metric)
        if self.comm.rank == 0:
            print(f"megdet train: evaluation at iteration {arrived.iteration} (scored by iteration {iteration}, "
                  f"{seconds:.1f} s into training)\n{arrived.table}", end="", flush=True)
            if reached:
                print(f"megdet train: target reached: {reached} at iteration {arrived.iteration}, "
                      f"{seconds:.1f} s into training; stopping at iteration {iteration}", flush=True)
        if reached:
            self.result = checkpoint.checkpoint_path(self.out, arrived.iteration)
        return self.result if reached else None

    def wait_for_scores(self, iteration: int) -> Optional[Path]:
        """At the end of the run: every background score still running, in order (collective); the
        checkpoint of the first that reaches the target, if one does."""
        result = None
        while self.scoring is not None and self.scoring.running:
            failed = self.comm.allreduce(torch.tensor([float(self.scoring.wait_oldest())]), op="sum",
                                         name="scoring_failed").item()
            result = self.scores_arrived(iteration, round(failed)) or result
        return result

    def _log(self, iteration: int, lr: float, window: MetricsWindow) -> Tuple[Dict[str, float], bool]:
        """Average the window's losses over its steps and the ranks and write a metrics line; returns what
        was logged and whether any rank has received a stop signal. One allreduce carries both, and the
        records that the ranks left out as corrupt, so stop signals cost no collective of their own: every
        rank learns of one at the same metrics line (``train.log_period`` iterations, well inside Slurm's
        120 s warning)."""
        names = sorted(window.losses)
        sums = torch.stack([window.losses[n].float() for n in names])
        flags = torch.tensor([float(self.stop.received is not None), float(window.corrupt)], device=sums.device)
        averaged = self.comm.allreduce(torch.cat([sums / window.steps, flags]), op="average",
                                       name="train_log").tolist()
        scalars = dict(zip(names, averaged[:-2]))
        seconds = max(window.seconds, 1e-9)
        scalars.update(lr=lr, images_per_s=window.images / seconds, data_fraction=window.data_seconds / seconds,
                       skipped_steps=self.optimizer.skipped_steps, dropped_boxes=window.degenerate,
                       corrupt_records=round(averaged[-1] * self.comm.size))
        if self.optimizer.loss_scaler is not None:
            scalars.update(loss_scale=self.optimizer.loss_scaler.scale, overflow_steps=self.optimizer.overflow_steps)
        self.metrics.log(iteration, **scalars)
        return scalars, averaged[-2] > 0

    def evaluate(self, iteration: int) -> Dict[str, float]:
        """Box AP on the validation shards (every rank infers its share; Open Images shards: the Open Images
        mAP@0.5), logged; returns the metrics."""
        if self.val_set is None:
            raise UserError(f"{self.cfg.name} evaluates during training but data.val is empty: set data.val=SHARDS")
        metrics, table = evaluate_mod.evaluate_on_shards(self.model, self.val_set, self.cfg, self.comm, self.runtime,
                                                         workers=self.workers,
                                                         out_dir=self.out if self.comm.rank == 0 else None)
        self.model.train()
        self.metrics.log(iteration, **{k: v for k, v in metrics.items() if k.removeprefix(MASK_PREFIX) in AP_CURVES})
        if self.comm.rank == 0:
            print(f"megdet train: evaluation at iteration {iteration}\n{table}", end="", flush=True)
        return metrics

    def _finish(self, iteration: int, evaluated: bool = False, result: Optional[Path] = None) -> int:
        """The last checkpoint (``iteration``'s) and evaluation, unless ``evaluated`` or a background score
        reached the target (``result``: the checkpoint it scored, which is then the run's result)."""
        path = self.save(iteration)
        if result is None and not evaluated and self.val_set is not None:
            metrics = self.evaluate(iteration)
            target, metric = self.cfg.train.target_ap, self.cfg.train.target_metric
            reached, missed = target_reached(metrics, target, metric), target_missed(metrics, target, metric)
            if reached and self.comm.rank == 0:
                print(f"megdet train: target reached: {reached} at iteration {iteration} (the last), "
                      f"{time.perf_counter() - self.started:.1f} s into training", flush=True)
            if missed and self.comm.rank == 0:
                print(f"megdet train: target not reached in {iteration} iterations: {missed} at the last "
                      "evaluation", flush=True)
        if self.comm.rank == 0:
            plot = plot_metrics(read_metrics(self.out / METRICS_FILE), self.out / PLOT_FILE)
            pictures = "" if self.val_set is None else "; pictures " + str(show.show(
                self.model, self.val_set, self.cfg, self.device, self.out / show.SHOW_FILE, images=SHOW_IMAGES,
                score_threshold=SHOW_SCORE_THRESHOLD, autocast=self.runtime.autocast))
            target = "" if result is None else f"; result (the weights that reached the target) {result}"
            print(f"megdet train: finished {iteration} iterations on {self.comm.size} ranks; checkpoint {path}"
                  f"{target}; plot {plot}{pictures}", flush=True)
        self.metrics.close()
        self.stop.restore()
        return 0


def _warn(line: str) -> None:
    print(f"megdet train: warning: {line}", file=sys.stderr, flush=True)


def run(cfg: config_mod.Config, resume: Optional[str] = None) -> int:
    """``megdet train``: the run of ``cfg`` on this launch (``megdet.commands.train`` parses the command)."""
    runtime = build_runtime(cfg)  # this rank's GPU, before any CUDA or NCCL work
    comm = init_rank(runtime.device)
    return Trainer(cfg, comm, runtime, resume=resume).train()
