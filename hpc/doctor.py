"""Is this launch right? One collective round trip that every rank checks, and what each rank sees.

    horovodrun -np 2 --gloo megdet doctor
    mpirun -np 2 megdet doctor
    srun --ntasks 2 megdet doctor
    MEGDET_COMM=torch torchrun --nproc-per-node 8 $(which megdet) doctor   # NCCL on 8 GPUs

Each rank takes its device first (``--device``, default auto: its GPU when it sees one), so the two
allreduces (over the world and over groups of two ranks) run where training will: NCCL on GPUs.

Across nodes it also says, per rank, the interface and address that lead to rank 0's host (where the
ranks meet) and the address the torch engine's Gloo advertises, and times an allreduce of
``TIMED_MIB`` MiB over the world and over each node's ranks (the median of ``TIMED_REPEATS``): a
node-local group far faster than the world is what node-local cross-GPU BN groups rely on.
"""
from __future__ import annotations

import platform
import socket
import statistics
import time
from typing import Dict, List

import torch

from hpc import comm as comm_mod
from hpc import device as device_mod
from hpc import launch
from hpc.comm import CommError, Communicator
from hpc.comm.rendezvous import advertised_address, route_to

TIMED_MIB = 4
TIMED_REPEATS = 5


def horovod_features() -> Dict[str, bool]:
    """What the installed Horovod was built with ({} when Horovod is not importable)."""
    try:
        import horovod.torch as hvd
    except ImportError:
        return {}
    return {"mpi": bool(hvd.mpi_built()), "gloo": bool(hvd.gloo_built()), "nccl": bool(hvd.nccl_built())}


def examine(comm: Communicator) -> List[Dict]:
    """Every rank's view of the launch (on rank 0; None elsewhere), after checking that an allreduce
    and a group allreduce give the values the rank numbers predict. Raises ``CommError`` on every rank
    when they do not."""
    total = comm.allreduce(torch.tensor([float(comm.rank)], dtype=torch.float64, device=comm.device)).item()
    expected = comm.size * (comm.size - 1) / 2
    pair = comm.partition(2) if comm.size % 2 == 0 else comm.world
    pair_total = comm.allreduce(torch.ones(1, device=comm.device), group=pair).item()
    with comm.all_or_none():
        if total != expected or pair_total != pair.size:
            raise CommError(f"allreduce gave {total} (expected {expected}) and {pair_total} over group "
                            f"{list(pair.ranks)} (expected {pair.size}): the ranks are not talking to each other "
                            "correctly")
    started = launch.detect()
    rank0_host = comm.broadcast_object(socket.gethostname() if comm.rank == 0 else None)
    interface, address = route_to(rank0_host)
    view = {"rank0_host": rank0_host, "route": {"interface": interface, "address": address},
            "gloo": dict(zip(("interface", "address"), _advertised())), "timings": _timed_allreduces(comm),
            "rank": comm.rank, "size": comm.size, "local_rank": comm.local_rank, "local_size": comm.local_size,
            "host": socket.gethostname(), "engine": comm.engine, "launcher": started.launcher,
            "scheduler": started.scheduler, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "horovod_built": horovod_features(),
            "device": device_mod.describe(comm.device), "transport": getattr(comm, "backend", comm.engine)}
    views = comm.allgather_object(view)
    return views if comm.rank == 0 else None


def _advertised():
    try:
        return advertised_address()
    except CommError as error:  # GLOO_SOCKET_IFNAME naming no interface: say so in the table
        return None, str(error)


def _timed_allreduces(comm: Communicator) -> Dict[str, float]:
    """Median milliseconds of an allreduce of TIMED_MIB MiB over the world and over this rank's node
    ("node HOST"). Collective: every rank makes every node's group, in the same order."""
    hosts = comm.allgather_object(socket.gethostname())
    groups = {host: comm.new_group([r for r, h in enumerate(hosts) if h == host]) for host in dict.fromkeys(hosts)}
    payload = torch.ones(TIMED_MIB * 2**20 // 4, device=comm.device)
    timings = {}
    for name, group in [("world", comm.world)] + [(f"node {host}", group) for host, group in groups.items()]:
        if comm.rank not in group.ranks:
            continue
        times = []
        for _ in range(TIMED_REPEATS + 1):  # the first warms the connections up
            start = time.perf_counter()
            comm.allreduce(payload, group=group)
            if comm.device.type == "cuda":
                torch.cuda.synchronize(comm.device)
            times.append(1000 * (time.perf_counter() - start))
        timings[name] = statistics.median(times[1:])
    return timings


def format_report(views: List[Dict]) -> str:
    first = views[0]
    lines = [f"world of {first['size']} ranks, engine {first['engine']}, launcher {first['launcher']}"
             + (f" under {first['scheduler']}" if first["scheduler"] else ""),
             f"torch {first['torch']}, Python {first['python']}, CUDA {'yes' if first['cuda'] else 'no'}, "
             f"Horovod built with: {', '.join(k for k, v in first['horovod_built'].items() if v) or 'not installed'}",
             "rank  local  host  device"]
    lines += [f"{v['rank']:>4}  {v['local_rank']:>2}/{v['local_size']:<2}  {v['host']}  {_device_words(v['device'])}"
              for v in views]
    lines.append(f"allreduce over the world and over groups ({first['transport']}, {first['device']['device']} "
                 "tensors): ok")
    hosts = list(dict.fromkeys(v["host"] for v in views))
    lines.append(f"{len(hosts)} node{'s' if len(hosts) > 1 else ''}: " + "; ".join(
        f"{host} ranks {', '.join(str(v['rank']) for v in views if v['host'] == host)}" for host in hosts))
    lines.append(f"network (rank 0's host {first['rank0_host']}):")
    for v in views:
        route, gloo = v["route"], v["gloo"]
        lines.append(f"  rank {v['rank']} on {v['host']}: reaches {first['rank0_host']} via "
                     f"{route['interface'] or '?'} {route['address'] or 'no route'}; Gloo address "
                     f"{gloo['address']}" + (f" ({gloo['interface']})" if gloo["interface"] else ""))
    timed = {"world": first["timings"]["world"]}
    for host in hosts:
        timed[f"node {host}"] = next(v["timings"][f"node {host}"] for v in views if v["host"] == host)
    lines.append(f"allreduce of {TIMED_MIB} MiB, median of {TIMED_REPEATS}: " +
                 ", ".join(f"{name} {ms:.1f} ms" for name, ms in timed.items()))
    return "\n".join(lines)


def _device_words(view: Dict[str, str]) -> str:
    if view["device"] == "cpu":
        return f"cpu ({view['cores']} cores)"
    return f"{view['device']} {view['name']} ({view['memory_gib']} GiB)"


def add_arguments(parser) -> None:
    parser.add_argument("--engine", default=None,
                        help="horovod | torch | local (default: $MEGDET_COMM, else horovod when launched)")
    parser.add_argument("--device", default="auto", choices=device_mod.DEVICE_KINDS,
                        help="where each rank computes (default: %(default)s: its GPU when it sees one)")


def run(args) -> int:
    views = examine(comm_mod.init(args.engine, device=device_mod.select(args.device)))
    if views is not None:
        print(format_report(views), flush=True)
    return 0
