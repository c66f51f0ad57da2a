"""``megdet plot RESULTS``: curves of benchmark results (the ``<name>.json`` that ``megdet bench NAME``
writes with ``megdet.bench.report.write``).

    megdet plot runs/bench/allreduce                 # the folder holding allreduce.json -> allreduce.png
    megdet plot runs/bench/train/train.json --out scaling.png

  allreduce  bus bandwidth (solid) and algorithm bandwidth (dashed) in GB/s against the message size in
             bytes (log2 axis), one colour per (engine, fusion, tensors) variant
  train      total images/s against ranks, with the ideal line ranks x images/s(1 rank) and each run's
             scaling efficiency; beside it the step time's shares (data, forward+backward,
             communication, optimizer) as stacked bars per rank count
  project    projected time to train in hours (log axis) against GPUs, one point per configuration,
             joined by a dotted line to the paper's reported time for it (black marker)
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from hpc.errors import UserError
from megdet.bench.allreduce import format_size
from megdet.engine.metrics import METRICS_FILE, save_png

# benchmark name: figure size in inches (width, height)
SIZES = {"allreduce": (9, 6), "train": (12, 5), "project": (9, 6)}
MAX_SIZE_TICKS = 12
SHARES = (("data_share", "data"), ("forward_backward_share", "forward + backward"),
          ("communication_share", "communication"), ("optimizer_share", "optimizer"))


def run(path: Path, out: Optional[str]) -> int:
    """Plot the results file ``path``, or every known results file in the folder ``path``."""
    files = [path] if path.suffix == ".json" else [path / f"{name}.json" for name in SIZES
                                                   if (path / f"{name}.json").is_file()]
    if not files:
        raise UserError(f"{path} holds neither a training run's {METRICS_FILE} nor benchmark results "
                        f"({', '.join(f'{name}.json' for name in SIZES)}): give a run folder (megdet train) "
                        "or a benchmark's --out folder (run `megdet bench allreduce` first, or train, project)")
    if out and len(files) > 1:
        raise UserError(f"{path} holds {len(files)} results files: give one of them (e.g. {files[0]}) with --out")
    for results in files:
        name, rows = read_results(results)
        png = plot_results(name, rows, out or results.with_suffix(".png"))
        print(f"plot of {len(rows)} {name} rows: {png}")
    return 0


def read_results(path: Path):
    """(benchmark name, rows) of a results JSON; UserError naming the fix when it is missing, not a
    results file, or of a benchmark without a plot."""
    hint = (f"run `megdet bench {path.stem}` first" if path.stem in SIZES
            else f"run `megdet bench {', '.join(SIZES)}` (one of them) first")
    if not path.is_file():
        raise UserError(f"no results file {path}: {hint}, or give the JSON it wrote")
    try:
        payload = json.loads(path.read_text())
        name, rows = payload["benchmark"], payload["rows"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a benchmark results file (JSON with \"benchmark\" and \"rows\"): "
                        f"{hint}") from None
    if name not in SIZES:
        raise UserError(f"{path} holds results of benchmark {name!r}, which megdet plot does not draw: give the "
                        f"results of {', '.join(SIZES)}")
    if not rows:
        raise UserError(f"{path} has no rows: run `megdet bench {name}` again")
    return name, rows


def plot_results(name: str, rows: List[Dict], out_path) -> Path:
    """Draw the rows of benchmark ``name`` into the PNG ``out_path``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure = pyplot.figure(figsize=SIZES[name])
    {"allreduce": _allreduce, "train": _train, "project": _project}[name](figure, rows)
    figure.tight_layout()
    return save_png(figure, out_path)


def _allreduce(figure, rows: List[Dict]) -> None:
    axis = figure.add_subplot()
    variants: Dict[tuple, List[Dict]] = {}
    for row in rows:
        variants.setdefault((row["engine"], row["fusion"], row["tensors"]), []).append(row)
    for index, ((engine, fusion, tensors), points) in enumerate(variants.items()):
        points.sort(key=lambda r: r["bytes"])
        sizes = [r["bytes"] for r in points]
        colour = f"C{index % 10}"
        axis.plot(sizes, [r["busbw_GBps"] for r in points], color=colour, marker="o",
                  label=f"{engine}, fusion {fusion}, {tensors} tensor(s)")
        axis.plot(sizes, [r["algbw_GBps"] for r in points], color=colour, linestyle="--")
    axis.set_xscale("log", base=2)
    ticks = sorted({r["bytes"] for r in rows})
    ticks = ticks[::math.ceil(len(ticks) / MAX_SIZE_TICKS)]  # every k-th size, at most MAX_SIZE_TICKS
    axis.set_xticks(ticks, [format_size(b).replace(" ", "").replace("iB", "") for b in ticks])
    axis.minorticks_off()
    axis.set_xlabel("message size per rank (bytes)")
    axis.set_ylabel("bandwidth (GB/s)")
    axis.set_title(f"allreduce bandwidth, {rows[0]['ranks']} ranks (solid: bus, dashed: algorithm)")
    axis.legend(fontsize="small")
    axis.grid(alpha=0.3)


def _train(figure, rows: List[Dict]) -> None:
    rows = sorted(rows, key=lambda r: r["ranks"])
    ranks = [r["ranks"] for r in rows]
    speed, shares = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    speed.plot(ranks, [r["images_per_s"] for r in rows], marker="o", label="measured")
    one = next((r for r in rows if r["ranks"] == 1), None)
    if one is not None:
        speed.plot(ranks, [n * one["images_per_s"] for n in ranks], linestyle="--", color="grey",
                   label="ideal (linear from 1 rank)")
    for row in rows:
        if row.get("scaling_efficiency") is not None:
            speed.annotate(f"{row['scaling_efficiency']:.0%}", (row["ranks"], row["images_per_s"]),
                           textcoords="offset points", xytext=(6, -12))
    speed.set_xticks(ranks)
    speed.set_xlabel("ranks")
    speed.set_ylabel("images/s (all ranks)")
    speed.set_title("throughput and scaling efficiency")
    speed.legend(fontsize="small")
    speed.grid(alpha=0.3)
    positions = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for key, label in SHARES:
        values = [r[key] for r in rows]
        shares.bar(positions, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    shares.set_xticks(positions, [str(n) for n in ranks])
    shares.set_xlabel("ranks")
    shares.set_ylim(0, 1.25)  # room for the legend above the bars
    shares.set_ylabel("share of step time")
    shares.set_title("where the step's time goes")
    shares.legend(fontsize="small", ncol=2, loc="upper center")


def _hours(row: Dict, kind: str) -> Optional[float]:
    """``{kind}_s`` (projected_s, paper_s) in hours; None where the row has none."""
    return row[f"{kind}_s"] / 3600 if row.get(f"{kind}_s") is not None else None


def _project(figure, rows: List[Dict]) -> None:
    from matplotlib import ticker

    axis = figure.add_subplot()
    projected = [r for r in rows if _hours(r, "projected") is not None]
    paper = [r for r in projected if _hours(r, "paper") is not None]
    for row in paper:  # each configuration's projection joined to the paper's time for it
        axis.plot([row["gpus"]] * 2, [_hours(row, "projected"), _hours(row, "paper")], color="grey",
                  linestyle=":", linewidth=1)
    axis.scatter([r["gpus"] for r in projected], [_hours(r, "projected") for r in projected], marker="o",
                 label="projected")
    if paper:
        axis.scatter([r["gpus"] for r in paper], [_hours(r, "paper") for r in paper], marker="X", s=80,
                     color="black", zorder=3, label="paper (same configuration)")
    axis.set_xscale("log", base=2)
    gpus = sorted({r["gpus"] for r in rows})
    axis.set_xticks(gpus, [str(n) for n in gpus])
    axis.minorticks_off()
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda hours, _: f"{hours:g}"))
    axis.yaxis.set_minor_formatter(ticker.FuncFormatter(  # 2 and 5 x 10^k labelled too
        lambda hours, _: f"{hours:g}" if f"{hours:.0e}"[0] in "25" else ""))
    axis.set_xlabel("GPUs")
    axis.set_ylabel("time to train (hours)")
    axis.set_title("projected time to train vs the papers")
    axis.legend(fontsize="small")
    axis.grid(alpha=0.3, which="both")
