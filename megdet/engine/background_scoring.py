"""Evaluations scored beside training (``train.async_eval``): the ranks infer their shares of the
validation images in step, then each rank's share of the categories is scored by a process of its own
(``megdet.engine.scoring_worker``) while training goes on.

    scoring = BackgroundScoring(comm, coco_gt, run_dir / "evaluations", with_masks)
    scoring.start(iteration, local, masks)     # collective: one allgather of boxes and masks, a process per rank
    running, failed = scoring.state()          # this rank's oldest evaluation: each 0 or 1, summed over ranks
    outcome = scoring.collect(failed)          # collective, at the same step on every rank, once all are done

Scores arrive in the order the evaluations started. ``collect`` gathers the ranks' per-category arrays
to rank 0 and summarizes them (``megdet.engine.coco_split.combine``): the numbers equal pycocotools'
on the whole set. A scoring process that fails or is killed stops the run on every rank with one line
naming the evaluation, the rank and its log. ``pending`` goes into each checkpoint; ``resume`` starts
the scoring of those evaluations again from the shares their ranks wrote (any number of ranks).

Files, in ``folder/iter_<K>/`` (K: the iteration whose weights were scored): ``share_rank<r>_of<N>.pkl``
(that rank's detections and categories, kept: a resume from a checkpoint written before the score
arrived scores K again from them),
``pieces_rank<r>_of<N>.pkl`` (its arrays), ``scoring_rank<r>_of<N>.log`` (the process's output) and,
from rank 0 once scored, ``metrics.json``.
"""
from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from pycocotools.coco import COCO

from hpc.errors import UserError
from hpc.files import write_atomic, write_json_atomic
from megdet.engine import coco_split
from megdet.engine.evaluate import arrays_to_results, share_detections, summarized
from megdet.engine.metrics import EVAL_METRICS_FILE, MASK_PREFIX

EVALUATIONS_DIR = "evaluations"  # in the run folder
GROUND_TRUTH_FILE = "ground_truth.json"


@dataclass
class Scoring:
    """One evaluation being scored: the iteration whose weights it scored, the world that dealt its
    categories, and this rank's process (None once reaped)."""

    iteration: int
    ranks: int
    process: Optional[subprocess.Popen] = None
    return_code: Optional[int] = None

    def folder(self, root: Path) -> Path:
        return root / f"iter_{self.iteration:07d}"


@dataclass
class Arrived:
    """A scored evaluation: its iteration, metrics in percent (box, and mask under ``mask_``) and the
    printed table."""

    iteration: int
    metrics: Dict[str, float]
    table: str


class BackgroundScoring:
    """The evaluations of one run being scored in background processes, oldest first; see the module
    docstring. Every method but ``state`` is collective."""

    def __init__(self, comm, coco_gt: COCO, folder: Path, with_masks: bool):
        self.comm, self.coco_gt, self.folder = comm, coco_gt, Path(folder)
        self.iou_types = ["bbox", "segm"] if with_masks else ["bbox"]
        self.running: List[Scoring] = []
        self.ground_truth = self.folder / GROUND_TRUTH_FILE
        with comm.all_or_none():
            if comm.rank == 0:
                self._write(lambda: write_json_atomic(self.ground_truth, coco_gt.dataset), self.ground_truth)
        comm.barrier()  # the processes of every rank read it

    @property
    def pending(self) -> List[Dict[str, int]]:
        """What a checkpoint keeps: the evaluations not yet scored, oldest first."""
        return [{"iteration": s.iteration, "ranks": s.ranks} for s in self.running]

    def start(self, iteration: int, local: Dict[int, object], masks: Optional[Dict[int, List[Dict]]]) -> None:
        """Share every rank's detections of ``iteration``'s evaluation (one allgather), deal the categories
        and start this rank's scoring process on its deal."""
        merged, merged_masks = share_detections(self.comm, local, masks)
        self._launch(Scoring(iteration, self.comm.size), arrays_to_results(merged, merged_masks))

    def resume(self, pending: Sequence[Dict[str, int]]) -> None:
        """Score again the evaluations a checkpoint lists as pending, from the shares their ranks wrote."""
        for entry in pending:
            earlier = Scoring(int(entry["iteration"]), int(entry["ranks"]))
            with self.comm.all_or_none():
                results = self._read_shares(earlier)
            self._launch(Scoring(earlier.iteration, self.comm.size), results)

    def state(self) -> Tuple[int, int]:
        """(running, failed) of this rank's oldest evaluation, each 0 or 1; (0, 0) when it is done or
        there is none. Not collective: the trainer sums them over the ranks with the step's flags."""
        if not self.running:
            return 0, 0
        oldest = self.running[0]
        if oldest.return_code is None:
            oldest.return_code = oldest.process.poll()
        if oldest.return_code is None:
            return 1, 0
        return 0, int(oldest.return_code != 0)

    def wait_oldest(self) -> int:
        """Block until this rank's oldest process ends; 1 when it failed, else 0."""
        oldest = self.running[0]
        oldest.return_code = oldest.process.wait()
        return int(oldest.return_code != 0)

    def collect(self, failed_ranks: int) -> Arrived:
        """The oldest evaluation's scores, on every rank; ``failed_ranks`` (summed over the ranks) > 0
        raises the same one-line UserError on every rank, naming the first failed rank and its log."""
        oldest = self.running[0]
        folder = oldest.folder(self.folder)
        if failed_ranks:
            self.comm.agree(self._failure(oldest) if oldest.return_code else None)
        with self.comm.all_or_none():
            pieces = self._read(lambda: pickle.loads(self._path(folder, "pieces", oldest).read_bytes()),
                                self._path(folder, "pieces", oldest))
        gathered = self.comm.gather_object(pieces, root=0)
        outcome: Tuple[Dict[str, float], str] = ({}, "")
        if self.comm.rank == 0:
            outcome = self._combine(gathered)
            write_json_atomic(folder / EVAL_METRICS_FILE, {**outcome[0], "iteration": oldest.iteration})
        metrics, table = self.comm.broadcast_object(outcome)
        self.running.pop(0)
        return Arrived(oldest.iteration, metrics, table)

    def close(self) -> None:
        """Stop the processes still running (a run that ends on an error)."""
        for scoring in self.running:
            if scoring.process is not None and scoring.process.poll() is None:
                scoring.process.kill()
                scoring.process.wait()

    def _combine(self, gathered: Sequence[Dict[str, coco_split.CategoryScores]]) -> Tuple[Dict[str, float], str]:
        metrics, tables = {}, []
        for iou_type in self.iou_types:
            evaluator = coco_split.combine(self.coco_gt, [pieces[iou_type] for pieces in gathered], iou_type)
            numbers, table = summarized(evaluator)
            prefix = MASK_PREFIX if iou_type == "segm" else ""
            metrics.update({prefix + name: value for name, value in numbers.items()})
            tables.append(table if len(self.iou_types) == 1 else f"{iou_type}:\n{table}")
        return metrics, "".join(tables)

    def _launch(self, scoring: Scoring, results: List[Dict]) -> None:
        shares = coco_split.deal_categories(sorted(self.coco_gt.getCatIds()),
                                            coco_split.detections_per_category(results), self.comm.size)
        mine = set(shares[self.comm.rank])
        folder = scoring.folder(self.folder)
        share_path = self._path(folder, "share", scoring)
        share = {"ground_truth": str(self.ground_truth), "categories": shares[self.comm.rank],
                 "iou_types": self.iou_types, "results": [r for r in results if r["category_id"] in mine]}
        with self.comm.all_or_none():
            self._write(lambda: write_atomic(share_path, pickle.dumps(share)), share_path)
            log = self._path(folder, "scoring", scoring)
            with log.open("w") as output:
                scoring.process = subprocess.Popen(
                    [sys.executable, "-m", "megdet.engine.scoring_worker", str(share_path),
                     str(self._path(folder, "pieces", scoring))], stdout=output, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL)
        self.running.append(scoring)

    def _read_shares(self, scoring: Scoring) -> List[Dict]:
        """Every rank's share of an evaluation dealt over ``scoring.ranks`` ranks, as one results list. A
        category lies in one share, so each (image, category)'s detections keep their order, which breaks
        pycocotools' score ties: the scores equal those of the first try."""
        folder = scoring.folder(self.folder)
        results: List[Dict] = []
        for rank in range(scoring.ranks):
            path = self._path(folder, "share", scoring, rank)
            results += self._read(lambda: pickle.loads(path.read_bytes()), path)["results"]
        return results

    def _failure(self, scoring: Scoring) -> str:
        log = self._path(scoring.folder(self.folder), "scoring", scoring)
        lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
        how = (f"was killed by signal {-scoring.return_code}" if scoring.return_code < 0
               else f"failed with exit code {scoring.return_code}")
        said = f" ({lines[-1]})" if lines else ""
        return (f"scoring of the evaluation at iteration {scoring.iteration} on rank {self.comm.rank} {how}{said}: "
                f"its log is {log}; resume the run (megdet train ... --resume) to score it again, or set "
                "train.async_eval=false to score in step")

    def _path(self, folder: Path, kind: str, scoring: Scoring, rank: Optional[int] = None) -> Path:
        suffix = "log" if kind == "scoring" else "pkl"
        return folder / f"{kind}_rank{self.comm.rank if rank is None else rank}_of{scoring.ranks}.{suffix}"

    @staticmethod
    def _write(action, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            action()
        except OSError as error:
            raise UserError(f"cannot write {path} ({error.strerror or error}): train.output_dir must be a "
                            "writable folder with free space") from None

    @staticmethod
    def _read(action, path: Path):
        try:
            return action()
        except OSError as error:
            raise UserError(f"cannot read {path} ({error.strerror or error}), which background scoring needs: "
                            "resume from a checkpoint of this run folder, or set train.async_eval=false") from None
