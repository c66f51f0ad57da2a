"""Training metrics as JSON lines (and TensorBoard events), and the plot that ``megdet plot RUN_DIR``
draws from them (``megdet.commands.plot``, which also draws benchmark results: ``megdet.bench.plot``).

    logger = MetricsLogger(run_dir / METRICS_FILE, enabled=comm.rank == 0, resume_from=start_iter)
    logger.log(iteration, loss=0.83, loss_cls=0.4, lr=0.32, images_per_s=512.0)
    logger.log(iteration, AP=36.6, AP50=58.1)      # evaluation lines share the file

Each line is one JSON object: ``{"iter": int, "time": seconds since the epoch, NAME: number, ...}``;
a value that is not finite (a diverged loss) is written as null. ``megdet plot`` draws the loss
(``loss`` and every ``loss_*``), ``lr``, ``images_per_s`` and the AP curves (``AP``, ``AP50``,
``AP75``, or ``AP50_open_images`` on Open Images) against the iteration into ``RUN_DIR/metrics.png``.
"""
from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from hpc.errors import UserError
from hpc.files import write_atomic

METRICS_FILE = "metrics.jsonl"
EVAL_METRICS_FILE = "metrics.json"  # what one evaluation (megdet eval, the end of training) writes
PLOT_FILE = "metrics.png"
# The Open Images challenge mAP@0.5 (percent): what evaluation on Open Images shards gives instead of COCO's.
OPEN_IMAGES_METRIC = "AP50_open_images"
AP_CURVES = ("AP", "AP50", "AP75", OPEN_IMAGES_METRIC)
# segm metrics sit beside the box ones under this prefix: mask_AP, mask_AP50, ...
MASK_PREFIX = "mask_"
PLOT_SIZE_INCHES = (11, 8)
PLOT_DPI = 100


class MetricsLogger:
    """Appends metrics lines to ``path`` when ``enabled`` (rank 0 only); a no-op elsewhere.

    resume_from: the iteration a resumed run restarts at; lines of later iterations (written after that
    checkpoint by the interrupted run) are removed so the file has each iteration once, and so are the
    evaluation lines of ``rescored`` iterations (evaluations the checkpoint lists as still being scored,
    which the resumed run scores again).
    tensorboard: also write each scalar as a TensorBoard event in ``path``'s folder (``loss/NAME``,
    ``train/NAME``, ``eval/NAME``), events of a resumed run's later iterations purged likewise.
    """

    def __init__(self, path, *, enabled: bool, resume_from: Optional[int] = None, rescored: Sequence[int] = (),
                 tensorboard: bool = False):
        self.path = Path(path)
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from is not None and self.path.exists():
            kept = [line + "\n" for line in self.path.read_text().splitlines()
                    if _iteration_of(line) is not None and _iteration_of(line) <= resume_from
                    and not (_iteration_of(line) in rescored and _is_evaluation(line))]
            write_atomic(self.path, "".join(kept))
        if tensorboard:
            self.writer = tensorboard_writer(self.path.parent, purge_after=resume_from)

    def log(self, iteration: int, **scalars: float) -> None:
        if not self.enabled:
            return
        record = {"iter": int(iteration), "time": time.time()}
        for name, value in scalars.items():
            value = float(value)
            record[name] = value if math.isfinite(value) else None
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in record.items():
                if name not in ("iter", "time") and value is not None:
                    self.writer.add_scalar(tensorboard_tag(name), value, iteration, walltime=record["time"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def tensorboard_tag(name: str) -> str:
    """A metric's TensorBoard tag: losses under loss/, the COCO metrics under eval/, the rest under train/."""
    if name == "loss" or name.startswith("loss_"):
        return f"loss/{name}"
    return f"eval/{name}" if name.startswith(("AP", "AR")) else f"train/{name}"


def summary_writer_class():
    """torch's TensorBoard SummaryWriter; UserError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise UserError(f"train.tensorboard=true needs the tensorboard package ({error}): pip install "
                        "tensorboard (scripts/setup.sh installs it), or set train.tensorboard=false") from None
    return SummaryWriter


def tensorboard_writer(folder: Path, purge_after: Optional[int]):
    """A TensorBoard SummaryWriter into ``folder``; events of iterations after ``purge_after`` (a resumed
    run's checkpoint) that an interrupted run wrote are dropped."""
    return summary_writer_class()(log_dir=str(folder), purge_step=None if purge_after is None else purge_after + 1)


def _iteration_of(line: str) -> Optional[int]:
    """The "iter" of a metrics line; None for a line torn by a killed run (not JSON)."""
    try:
        return int(json.loads(line)["iter"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _is_evaluation(line: str) -> bool:
    """Whether a (parsed) metrics line holds an evaluation's numbers (box or mask AP curves)."""
    return any(key.removeprefix(MASK_PREFIX) in AP_CURVES for key in json.loads(line))


def read_metrics(path) -> List[Dict]:
    """The metrics lines of ``path``; UserError when it is missing, empty or not JSON lines."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no metrics file {path}: give the output folder of a training run (megdet train)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number} is not JSON ({error.msg}): remove or fix that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("iter"), int):
            raise UserError(f"{path} line {number} has no integer \"iter\": it is not a megdet metrics line")
        records.append(record)
    if not records:
        raise UserError(f"metrics file {path} is empty: the run has not logged an iteration yet")
    return records


def _series(records: List[Dict], name: str):
    points = [(r["iter"], r[name]) for r in records if r.get(name) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(records: List[Dict], out_path) -> Path:
    """Draw loss, learning rate, throughput and AP against the iteration into the PNG ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    names = sorted({key for record in records for key in record})
    losses = [n for n in names if n == "loss" or n.startswith("loss_")]
    panels = (("loss", losses, "log"), ("learning rate", ["lr"], "linear"),
              ("throughput (images/s)", ["images_per_s"], "linear"),
              ("box AP (%)", [n for n in AP_CURVES if n in names], "linear"))
    figure, axes = pyplot.subplots(2, 2, figsize=PLOT_SIZE_INCHES)
    for axis, (title, curves, scale) in zip(axes.ravel(), panels):
        drawn = False
        for name in curves:
            xs, ys = _series(records, name)
            if xs:
                axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
                drawn = True
        axis.set_title(title)
        axis.set_xlabel("iteration")
        if drawn:
            if scale == "log" and all(y > 0 for name in curves for y in _series(records, name)[1]):
                axis.set_yscale("log")
            axis.legend(fontsize="small")
            axis.grid(alpha=0.3)
        else:
            axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    return save_png(figure, out_path)


def save_png(figure, out_path) -> Path:
    """Write ``figure`` as a PNG of its size in inches x ``PLOT_DPI`` pixels, atomically, and close it."""
    from matplotlib import pyplot

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=PLOT_DPI)
    pyplot.close(figure)
    return write_atomic(out_path, buffer.getvalue())
