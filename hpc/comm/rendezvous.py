"""Where the torch engine's ranks meet, and a check that they can reach each other before any
process group starts.

    rank, size, address = torch_rendezvous(launch)          # "tcp://vnode1:20042" under srun
    store, peers = meet(address, rank, size, timeout_s=300)  # every rank's host, address, interface

torch.distributed's own start waits its full timeout (10 minutes by default) when a rank cannot resolve
or reach rank 0's address, or when a node's hostname resolves to an address the others cannot reach:
Gloo advertises the address of the hostname (or of ``GLOO_SOCKET_IFNAME``), and a node whose hostname
maps to 127.0.1.1 (Debian's default /etc/hosts) is unreachable from the others. ``meet`` finds each of
these within ``MEGDET_RENDEZVOUS_TIMEOUT`` seconds and fails on every rank it can reach with one line
naming the host and the fix.
"""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import json
import os
import socket
import struct
import subprocess
import time
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlparse

from hpc import launch as launch_mod
from hpc.comm.base import CommError

DEFAULT_RENDEZVOUS_TIMEOUT_S = 300
CONNECT_TIMEOUT_S = 10.0     # for one rank to open a TCP connection to another node
_SIOCGIFADDR = 0x8915        # Linux ioctl: the IPv4 address of an interface
IFNAME_FIX = ("set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on GPUs) to the interface the nodes share "
              "(megdet doctor lists each rank's), or make each node's name resolve to its address on it")


def torch_rendezvous(launch: launch_mod.Launch) -> Tuple[int, int, str]:
    """(rank, size, init_method) for torch.distributed under the launcher that started us."""
    env = os.environ
    if "MASTER_ADDR" in env and launch.size is not None and launch.rank is not None:
        return launch.rank, launch.size, f"tcp://{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"
    if launch.launcher == "srun" or _srun_started_the_ranks(env):
        nodes = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        port = 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return launch.rank, launch.size, f"tcp://{nodes[0]}:{port}"
    if launch.launcher == "mpirun":
        try:
            from mpi4py import MPI
        except ImportError as error:
            raise CommError(f"the torch engine under mpirun needs mpi4py ({error}): pip install mpi4py") from None
        world = MPI.COMM_WORLD
        address = free_address() if world.Get_rank() == 0 else None
        return world.Get_rank(), world.Get_size(), world.bcast(address, root=0)
    if launch.launcher == "none":
        raise CommError("the torch engine needs a launcher: use torchrun, mpirun or srun "
                        "(or MEGDET_COMM=local for one process)")
    raise CommError(f"the torch engine cannot rendezvous under {launch.launcher}: use torchrun, mpirun, "
                    "srun or horovodrun, or MEGDET_COMM=horovod")


def _srun_started_the_ranks(env) -> bool:
    """srun (with an MPI plugin, which adds PMI variables) started one task per rank: rank 0's host is
    the step's first node, and no MPI start is needed to learn it. Under mpirun inside an allocation,
    srun starts one proxy per node instead, and its task count is the node count."""
    return (launch_mod.env_int(env, "SLURM_STEP_NUM_TASKS") == launch_mod.env_int(env, "PMI_SIZE") is not None
            and env.get("SLURM_PROCID") == env.get("PMI_RANK"))


def free_address() -> str:
    """A ``tcp://host:port`` init_method on this host, at a port free now."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return f"tcp://{socket.getfqdn()}:{probe.getsockname()[1]}"


def resolve(host: str) -> str:
    """The IPv4 address ``host`` resolves to here; ``OSError`` when it does not."""
    return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]


def interface_address(name: str) -> Optional[str]:
    """The IPv4 address of network interface ``name`` (None when it has none or does not exist)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(answer[20:24])


def interface_of(address: str) -> Optional[str]:
    """The name of the interface that holds ``address`` on this host, or None."""
    for _, name in socket.if_nameindex():
        if interface_address(name) == address:
            return name
    return None


def route_to(host: str) -> Tuple[Optional[str], Optional[str]]:
    """(interface, source address) this host would use to reach ``host``; (None, None) when it does not
    resolve or has no route. No packet is sent (a UDP socket's connect only picks the route)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((resolve(host), 9))
            source = probe.getsockname()[0]
    except OSError:
        return None, None
    return interface_of(source), source


def advertised_address() -> Tuple[Optional[str], str]:
    """(interface, address) at which Gloo on this host tells the other ranks to reach it: the address of
    ``GLOO_SOCKET_IFNAME`` when set, else the one the hostname resolves to if it belongs to this host,
    else loopback (Gloo's own fallback)."""
    named = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0]
    if named:
        address = interface_address(named)
        if address is None:
            raise CommError(f"GLOO_SOCKET_IFNAME={named} names no interface with an IPv4 address on "
                            f"{socket.gethostname()} (it has {', '.join(n for _, n in socket.if_nameindex())}): "
                            "name one of those, or unset it")
        return named, address
    try:
        address = resolve(socket.gethostname())
        with socket.socket() as probe:
            probe.bind((address, 0))
    except OSError:
        address = "127.0.0.1"
    return interface_of(address), address


def meet(init_method: str, rank: int, size: int, timeout_s: float):
    """Connect to rank 0's store at ``init_method`` (tcp://HOST:PORT; rank 0 serves it) and check that
    the ranks on different hosts can open connections to each other at the addresses Gloo will use.

    Returns (store, peers): the ``torch.distributed.TCPStore`` for ``init_process_group(store=...)`` and
    every rank's {"host", "address", "interface"}, in rank order. Raises ``CommError``, within about
    ``timeout_s`` seconds, naming the host and the fix."""
    import torch.distributed as dist

    url = urlparse(init_method)
    host, port = url.hostname, url.port
    here = socket.gethostname()
    try:
        address = resolve(host)
    except OSError as error:
        raise CommError(f"rank {rank} on {here} cannot resolve rank 0's host {host!r} ({error.strerror or error}): "
                        f"add {host} to this node's /etc/hosts or DNS, or give its address as MASTER_ADDR") from None
    try:
        store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False)
    except (RuntimeError, OSError) as error:
        what = "serve" if rank == 0 else "reach"
        raise CommError(f"rank {rank} on {here} could not {what} the rendezvous at {host} ({address}) port {port} "
                        f"within {timeout_s:g} s ({_first_line(error)}): {IFNAME_FIX}; MEGDET_RENDEZVOUS_TIMEOUT sets "
                        "the wait") from None
    interface, advertised = advertised_address()
    with socket.create_server((advertised, 0)) as listener:
        mine = {"host": here, "address": advertised, "interface": interface, "port": listener.getsockname()[1]}
        store.set(f"megdet/peer/{rank}", json.dumps(mine))
        peers = [json.loads(value) for value in _wait_all(store, "peer", size, timeout_s, host, port)]
        store.set(f"megdet/reach/{rank}", _unreachable(rank, peers) or "")
        problems = [value.decode() for value in _wait_all(store, "reach", size, timeout_s, host, port) if value]
    if problems:
        raise CommError(problems[0])
    return store, [{key: peer[key] for key in ("host", "address", "interface")} for peer in peers]


def _wait_all(store, kind: str, size: int, timeout_s: float, host: str, port: int) -> List[bytes]:
    """Every rank's value of key megdet/KIND/RANK, once all are set; ``CommError`` naming the ranks
    still missing after ``timeout_s``."""
    keys = [f"megdet/{kind}/{r}" for r in range(size)]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            if not missing:
                return [store.get(key) for key in keys]
        except (RuntimeError, OSError) as error:  # rank 0, which serves the store, is gone
            raise CommError(f"lost the rendezvous at {host} port {port} ({_first_line(error)}): rank 0 ended; its "
                            "own output says why") from None
        if time.monotonic() > deadline:
            raise CommError(f"rank(s) {missing} did not join the rendezvous at {host} port {port} within "
                            f"{timeout_s:g} s: their own output says why (a node that cannot resolve or reach "
                            f"{host}, or ranks started apart); MEGDET_RENDEZVOUS_TIMEOUT sets the wait")
        time.sleep(0.05)


def _unreachable(rank: int, peers: List[Dict]) -> Optional[str]:
    """The first problem this rank finds reaching the other hosts (one connection to the lowest rank of
    each, at the address Gloo will advertise), or None. A loopback address that answers is the same
    machine under another name (a test that names its ranks' hosts apart); on another machine it
    leads back to this one, where nothing listens at that port."""
    if len({peer["host"] for peer in peers}) == 1:
        return None
    me = peers[rank]["host"]
    seen = {me}
    for other, peer in enumerate(peers):
        if peer["host"] in seen:
            continue
        seen.add(peer["host"])
        try:
            socket.create_connection((peer["address"], peer["port"]), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            if ipaddress.ip_address(peer["address"]).is_loopback:
                return (f"rank {other} on {peer['host']} would be reached at {peer['address']}, a loopback address "
                        f"that other nodes cannot reach (its hostname resolves there to a loopback address, or to "
                        f"none of its own): {IFNAME_FIX}")
            return (f"rank {rank} on {me} cannot reach rank {other} on {peer['host']} at {peer['address']} "
                    f"({error.strerror or error}), the address {peer['host']} gives for itself: {IFNAME_FIX}")
    return None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
