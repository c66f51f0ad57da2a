"""``megdet plot PATH [--out PNG]``: a training run's curves (``megdet.engine.metrics``) or a
benchmark's results (``megdet.bench.plot``), whichever PATH holds."""
from __future__ import annotations

from pathlib import Path

from megdet.engine.metrics import METRICS_FILE, PLOT_FILE


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help=f"output folder of a training run (holds {METRICS_FILE}), "
                        "or a benchmark's results JSON or --out folder (allreduce.json, train.json, project.json)")
    parser.add_argument("--out", help=f"PNG to write (default: RUN_DIR/{PLOT_FILE}, or the results JSON with .png)")


def run(args) -> int:
    path = Path(args.run_dir)
    if path.suffix == ".json" or (path.is_dir() and not (path / METRICS_FILE).exists()):
        from megdet.bench import plot as bench_plot  # a benchmark's results, not a training run

        return bench_plot.run(path, args.out)
    from megdet.engine import metrics

    records = metrics.read_metrics(path / METRICS_FILE)
    png = metrics.plot_metrics(records, args.out or path / PLOT_FILE)
    print(f"plot of {len(records)} metrics lines: {png}")
    return 0
