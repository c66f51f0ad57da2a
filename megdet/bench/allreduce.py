"""``megdet bench allreduce``: time of one allreduce and its bandwidth, Horovod (fusion on and off)
against torch.distributed, from 4 KiB to 256 MiB, measured on the same ranks in one run.

    megdet bench allreduce --ranks 2             # starts horovodrun twice (fusion on, off) and torchrun
    horovodrun --gloo -np 2 -H localhost:2 megdet bench allreduce --out runs/bench/allreduce-horovod
    HOROVOD_FUSION_THRESHOLD=0 horovodrun --gloo -np 2 -H localhost:2 megdet bench allreduce --out ...
    MEGDET_COMM=torch torchrun --nproc-per-node 2 $(which megdet) bench allreduce --out ...

Each size is an fp32 sum, in place, of ``bytes`` per rank (Horovod over Gloo; torch.distributed over
Gloo on CPU, NCCL on GPU), in two shapes: one tensor, and the same bytes split into ``--tensors``
tensors started asynchronously and then waited, as a gradient allreduce does. Horovod's tensor fusion
packs such outstanding tensors into one buffer of ``HOROVOD_FUSION_THRESHOLD`` bytes (64 MiB, Horovod's
default, for "on"; 0 for "off"; read at ``hvd.init``, hence one launch per setting); a single tensor is
not affected, so its on/off rows show the run's noise. torch.distributed has no fusion outside DDP's
buckets: its rows say "n/a".

Timing: a barrier, then the call until every result is back; an iteration's time is the slowest
rank's; ``time_us`` is the median over ``--iters`` after ``--warmup``. Bandwidths as nccl-tests
defines them (doc/PERFORMANCE.md there), in GB/s = 1e9 bytes/s, for n ranks:
    algbw = bytes / time
    busbw = algbw * 2 (n - 1) / n        # a ring allreduce moves 2 (n - 1) / n of the data per rank
busbw is comparable across rank counts and with the link's peak. Every size is checked once: each
element must equal the sum of the ranks' values, or the run stops.
"""
from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from hpc import comm as comm_mod
from hpc import launch, perfmodel
from hpc.errors import UserError
from megdet.bench import report, spawn

NAME = "allreduce"
COLUMNS = ("engine", "fusion", "tensors", "ranks", "size", "bytes", "time_us", "algbw_GBps", "busbw_GBps")
FORWARDED = ("min_bytes", "max_bytes", "factor", "tensors", "iters", "warmup")
FP32_BYTES = 4
MEMORY_PER_BYTE = 3  # our buffer, Horovod's fusion buffer or Gloo's copies, and headroom
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
HOROVOD_DEFAULT_FUSION_BYTES = 64 * 2**20
# (run name, engine, extra environment): one launch each when no launcher started us
LAUNCHES = (("horovod-fusion-on", "horovod", {"HOROVOD_FUSION_THRESHOLD": str(HOROVOD_DEFAULT_FUSION_BYTES)}),
            ("horovod-fusion-off", "horovod", {"HOROVOD_FUSION_THRESHOLD": "0"}),
            ("torch", "torch", {}))


def add_arguments(parser) -> None:
    parser.add_argument("--ranks", type=int, default=None,
                        help="ranks to start per engine when no launcher started us (default: 2); "
                             "under a launcher it must equal the launched world (default: that world)")
    parser.add_argument("--engines", default=",".join(spawn.ENGINES),
                        help="when no launcher started us: engines to run, comma-separated (default: %(default)s)")
    parser.add_argument("--min-bytes", default="4K",
                        help="smallest message per rank, bytes with K/M/G = 2^10/2^20/2^30 (default: %(default)s)")
    parser.add_argument("--max-bytes", default="256M", help="largest message per rank (default: %(default)s)")
    parser.add_argument("--factor", type=int, default=4, help="ratio of consecutive sizes (default: %(default)s)")
    parser.add_argument("--tensors", type=int, default=32,
                        help="tensors the gradient-like case splits each size into (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=10,
                        help="timed allreduces per size and case (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed allreduces first (default: %(default)s)")


def parse_size(text: str, option: str = "--min-bytes") -> int:
    """Bytes in ``text``: an integer with an optional K, M, G or T suffix (powers of 1024, "KiB" and
    "KB" read the same); UserError unless it is a positive multiple of 4 (fp32 elements)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise UserError(f"Invalid {option}: {text!r}; use bytes with an optional K, M or G suffix, e.g. 4K or 256M")
    nbytes = int(match.group(1)) * UNITS[match.group(2).upper()]
    if nbytes < FP32_BYTES or nbytes % FP32_BYTES:
        raise UserError(f"Invalid {option}: {text!r} = {nbytes} bytes; use a positive multiple of {FP32_BYTES} "
                        "(fp32 elements)")
    return nbytes


def format_size(nbytes: int) -> str:
    """``4 KiB``, ``256 MiB``, or plain bytes when no unit divides them."""
    for suffix, unit in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit} {suffix}"
    return f"{nbytes} B"


def sizes(min_bytes: int, max_bytes: int, factor: int) -> List[int]:
    """min_bytes, min_bytes * factor, ... up to max_bytes, which is always the last."""
    out = [min_bytes]
    while out[-1] * factor <= max_bytes:
        out.append(out[-1] * factor)
    return out if out[-1] == max_bytes else out + [max_bytes]


def bandwidths(nbytes: int, seconds: float, ranks: int) -> Tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 bytes/s) of an allreduce of ``nbytes`` per rank over ``ranks``
    ranks that took ``seconds``, as nccl-tests defines them."""
    algbw_Bps = perfmodel.algbw(nbytes, seconds)
    return algbw_Bps / 1e9, perfmodel.busbw_allreduce(algbw_Bps, ranks) / 1e9


def available_bytes() -> int:
    """Memory that new allocations can use on this host (psutil, else /proc/meminfo MemAvailable)."""
    try:
        import psutil
    except ImportError:
        meminfo = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo).group(1)) * 1024
    return psutil.virtual_memory().available


def _check(args) -> Tuple[List[int], int]:
    """The sizes to run (bytes) and the world size; UserError (one line, the fix) for bad input."""
    for name, least in (("factor", 2), ("tensors", 1), ("iters", 1)):
        if getattr(args, name) < least:
            raise UserError(f"Invalid --{name}: {getattr(args, name)}; need at least {least}")
    if args.warmup < 0:
        raise UserError(f"Invalid --warmup: {args.warmup}; need 0 or more")
    min_bytes, max_bytes = parse_size(args.min_bytes, "--min-bytes"), parse_size(args.max_bytes, "--max-bytes")
    if min_bytes > max_bytes:
        raise UserError(f"Invalid --min-bytes: {args.min_bytes} is more than --max-bytes {args.max_bytes}; "
                        "lower --min-bytes or raise --max-bytes")
    if args.tensors * FP32_BYTES > min_bytes:
        raise UserError(f"Invalid --tensors: {args.tensors} fp32 tensors do not fit in --min-bytes {args.min_bytes}; "
                        f"raise --min-bytes to at least {args.tensors * FP32_BYTES} or lower --tensors")
    started = launch.detect()
    if (started.size or 1) > 1 and args.ranks is not None and args.ranks != started.size:
        raise UserError(f"Invalid --ranks: {args.ranks}, but {started.launcher} started {started.size} ranks; "
                        f"drop --ranks or launch {args.ranks} ranks")
    ranks = started.size if (started.size or 1) > 1 else 2 if args.ranks is None else args.ranks
    if ranks < 2:
        raise UserError(f"Invalid --ranks: {ranks}; an allreduce needs at least 2 ranks")
    local_ranks = started.local_size or ranks
    needed, free = MEMORY_PER_BYTE * max_bytes * local_ranks, available_bytes()
    if needed > free:
        raise UserError(f"--max-bytes {args.max_bytes} needs about {needed / 2**30:.1f} GiB on this host "
                        f"({free / 2**30:.1f} GiB free): lower --max-bytes")
    return sizes(min_bytes, max_bytes, args.factor), ranks


def run(args) -> int:
    size_list, ranks = _check(args)
    if (launch.detect().size or 1) > 1:
        return _run_rank(args, size_list)
    return _spawn(args, ranks)


def _spawn(args, ranks: int) -> int:
    """Launch the ranks once per engine and fusion setting, each into its own folder; merge the rows."""
    engines = spawn.parse_engines(args.engines)
    forwarded = [f"--ranks={ranks}"] + [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in FORWARDED]
    rows: List[Dict] = []
    for folder, engine, env in LAUNCHES:
        if engine in engines:
            rows += spawn.run_ranks(NAME, engine, ranks, Path(args.out) / folder, forwarded, env=env)
    print(report.write(args.out, NAME, rows, COLUMNS, inputs={**_inputs(args), "ranks": ranks}))
    print(summary(rows))
    return 0


def _inputs(args) -> Dict:
    return {name: getattr(args, name) for name in ("ranks", "engines", *FORWARDED)}


def _run_rank(args, size_list: List[int]) -> int:
    comm = comm_mod.init()
    device = torch.device("cuda", comm.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    fusion = "n/a" if comm.engine == "torch" else \
        "off" if os.environ.get("HOROVOD_FUSION_THRESHOLD") == "0" else "on"
    expected = comm.size * (comm.size + 1) / 2  # rank r contributes r + 1
    seconds: Dict[Tuple[int, int], List[float]] = {}
    for nbytes in size_list:
        buffer = torch.empty(nbytes // FP32_BYTES, dtype=torch.float32, device=device)
        for step in range(args.warmup + args.iters):
            for tensors in (1, args.tensors):
                buffer.fill_(comm.rank + 1)
                pieces = buffer.tensor_split(tensors)  # views: the same bytes in `tensors` tensors
                comm.barrier()
                start = time.perf_counter()
                handles = [comm.allreduce_async(piece, op="sum", name=f"bench.{nbytes}.{tensors}.{i}")
                           for i, piece in enumerate(pieces)]
                for handle in handles:
                    handle.wait()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start
                if step == 0:
                    comm.agree(_wrong_sum(buffer, expected, nbytes, tensors, comm.engine))
                if step >= args.warmup:
                    seconds.setdefault((nbytes, tensors), []).append(elapsed)
        del buffer, pieces, handles
    slowest = spawn.slowest_rank(comm, seconds)
    if comm.rank == 0:
        rows = []
        for (nbytes, tensors), times in slowest.items():
            median = statistics.median(times)
            algbw, busbw = bandwidths(nbytes, median, comm.size)
            rows.append({"engine": comm.engine, "fusion": fusion, "tensors": tensors, "ranks": comm.size,
                         "size": format_size(nbytes), "bytes": nbytes, "time_us": median * 1e6,
                         "algbw_GBps": algbw, "busbw_GBps": busbw})
        print(report.write(args.out, NAME, rows, COLUMNS, inputs=_inputs(args)), flush=True)
    comm.barrier()
    return 0


def _wrong_sum(buffer: torch.Tensor, expected: float, nbytes: int, tensors: int, engine: str):
    """None when every element equals ``expected``, else the one-line error for ``comm.agree``."""
    wrong = buffer != expected
    if not wrong.any():
        return None
    index = int(wrong.int().argmax())
    return (f"allreduce of {format_size(nbytes)} in {tensors} tensor(s) on {engine} gave {buffer[index].item()} "
            f"at element {index}, expected {expected}: the collective is broken, no results written")


def summary(rows: List[Dict]) -> str:
    """Busbw of each variant at the largest size with its ratio to torch (same tensor count), and the
    latency at the smallest size, as a Markdown table."""
    largest, smallest = max(r["bytes"] for r in rows), min(r["bytes"] for r in rows)
    torch_busbw = {r["tensors"]: r["busbw_GBps"] for r in rows if r["engine"] == "torch" and r["bytes"] == largest}
    latency = {(r["engine"], r["fusion"], r["tensors"]): r["time_us"] for r in rows if r["bytes"] == smallest}
    out = []
    for row in rows:
        if row["bytes"] != largest:
            continue
        ratio = row["busbw_GBps"] / torch_busbw[row["tensors"]] if row["tensors"] in torch_busbw else None
        out.append({"engine": row["engine"], "fusion": row["fusion"], "tensors": row["tensors"],
                    f"busbw_GBps at {format_size(largest)}": row["busbw_GBps"],
                    "x torch": "" if ratio is None else ratio,
                    f"time_us at {format_size(smallest)}": latency[(row["engine"], row["fusion"], row["tensors"])]})
    return report.markdown_table(out, list(out[0]))
