"""A multi-node Slurm cluster on this machine: each node a network namespace with its own hostname,
address and node-local folder, one ``slurmd`` per node, one ``slurmctld`` and one ``munged`` for all.

    scripts/vcluster.sh up [--nodes 3] [--cpus 4]   # by hand: the cluster in /tmp/megdet-vcluster-0
    export SLURM_CONF=/tmp/megdet-vcluster-0/slurm.conf; sbatch job.sbatch; sinfo
    scripts/vcluster.sh exec vnode2 hostname        # a command on one node (its network, name, local disk)
    scripts/vcluster.sh status; scripts/vcluster.sh down

    def test_x(vcluster):   # the session fixture (conftest): its own cluster, removed after the session
        job = vcluster.submit(script, cwd=folder)

Layout (cluster index I, nodes k = 1..N): a bridge ``mdvcIbr`` in this host's namespace holding
10.77.I.254/24 (where the nodes reach ``slurmctld``), and per node a namespace ``megdet-vcI-vnodek``
joined to the bridge by a veth pair (``mdvcInk`` here, ``eth0`` inside) at 10.77.I.k. Each slurmd runs
in a private mount and UTS namespace entered into its network namespace: ``/etc/hosts`` there is the
node's own copy of the cluster's hosts file (every node's name), its hostname is the node's, and ``NODE_LOCAL`` (the same path
on every node, like a node's local scratch disk) is bound to that node's own folder. The jobs slurmd
starts inherit all three. The file system is otherwise shared, as a cluster's is.

slurmd is not started with ``ip netns exec``: that mounts a fresh /sys without the cgroup file system,
which slurmd 22.05 needs (``unshare`` + ``nsenter --net`` keeps it). The nodes declare ``--cpus`` CPUs
each (``SlurmdParameters=config_overrides``): all nodes share this machine's cores, so the ranks of a
multi-node job oversubscribe them, as the tests expect.

Teardown stops the daemons by their pid files, kills what is left in each node's namespace, and
deletes the namespaces and the bridge: nothing is found or stopped by name. ``up`` on an index whose
cluster is half there (a crashed run) takes it down first.
"""
from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.slurm import SLURM_COMMANDS, SLURM_PACKAGES, Slurm, ensure_debian_packages

ROOT = Path("/tmp")
PREFIX = "megdet-vcluster-"      # state folder ROOT/PREFIX<index>
NAMESPACE = "megdet-vc{index}-{node}"
SUBNET = "10.77.{index}.0/24"
HEAD_HOST = 254                  # the bridge's (this host's) address in the subnet
MAX_INDEX = 200
NETWORK_COMMANDS = ("ip", "unshare", "nsenter", "mount")
SLURMD_TIMEOUT_S = 10            # a node that stops answering is DOWN after this (jobs on it: NODE_FAIL)
IP_TIMEOUT_S = 30


class ClusterError(RuntimeError):
    """The cluster cannot be brought up here; the message says why and what to do."""


@dataclass(frozen=True)
class Node:
    name: str          # hostname inside the cluster, e.g. vnode1
    address: str       # on the cluster's bridge
    namespace: str     # network namespace (ip netns)
    link: str          # this host's end of the node's veth pair, on the bridge


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and done.returncode != 0:
        raise ClusterError(f"'ip {' '.join(args)}' failed: {done.stderr.strip()}")
    return done


def namespaces() -> List[str]:
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def alive(pid: Optional[int]) -> bool:
    return pid is not None and Path(f"/proc/{pid}").exists()


class VirtualCluster(Slurm):
    """Cluster ``index`` of ``nodes`` nodes with ``cpus`` CPUs each, its state in ROOT/PREFIX<index>."""

    def __init__(self, index: int = 0, nodes: int = 3, cpus: int = 4):
        if not 0 <= index <= MAX_INDEX:
            raise ClusterError(f"cluster index {index} is outside 0..{MAX_INDEX}")
        if nodes < 1 or cpus < 1:
            raise ClusterError(f"a cluster needs at least 1 node of 1 CPU, not {nodes} nodes of {cpus}")
        super().__init__(ROOT / f"{PREFIX}{index}")
        self.index, self.cpus = index, cpus
        self.subnet = ipaddress.ip_network(SUBNET.format(index=index))
        self.bridge = f"mdvc{index}br"
        self.head_address = str(self.subnet[HEAD_HOST])
        self.nodes = [Node(f"vnode{k}", str(self.subnet[k]), NAMESPACE.format(index=index, node=f"vnode{k}"),
                           f"mdvc{index}n{k}") for k in range(1, nodes + 1)]
        self.node = self.nodes[0].name
        self.hosts_text = "".join([f"127.0.0.1 localhost\n{self.head_address} {socket.gethostname()} vc-head\n",
                                   *(f"{node.address} {node.name}\n" for node in self.nodes)])
        self.node_local = self.folder / "node-local"   # the same path on every node, its own folder on each
        self.pid_files.pop("slurmd")
        self.pid_files.update({f"slurmd:{node.name}": self.folder / f"slurmd-{node.name}.pid" for node in self.nodes})

    def by_name(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ClusterError(f"no node {name!r} in this cluster: its nodes are {', '.join(n.name for n in self.nodes)}")

    # -- up and down -----------------------------------------------------------------------------------
    def up(self) -> None:
        """Bring the cluster up; one that is already fully up is left as it is (idempotent)."""
        if self.is_up():
            return
        self.down()
        self.check_can_run()
        self.folder.mkdir(parents=True)
        (self.folder / "owner.json").write_text(json.dumps({"pid": os.getpid(), "nodes": len(self.nodes),
                                                            "cpus": self.cpus}))
        try:
            self._make_network()
            self.start()
        except Exception:
            self.down()
            raise

    def is_up(self) -> bool:
        if not all(alive(self._pid(name)) for name in self.pid_files) or not self.conf.exists():
            return False
        states = self.command(["sinfo", "--noheader", "--Node", "--format=%N %T"], check=False).stdout.split()
        return len(states) == 2 * len(self.nodes) and all(s.startswith(("idle", "alloc", "mix")) for s in states[1::2])

    def check_can_run(self) -> None:
        if os.geteuid() != 0:
            raise ClusterError("the virtual cluster needs root (network namespaces, mounts): run it as root")
        missing = [command for command in NETWORK_COMMANDS if shutil.which(command) is None]
        if missing:
            raise ClusterError(f"no {', '.join(missing)} here: install iproute2 and util-linux")
        reason = ensure_debian_packages(SLURM_PACKAGES, SLURM_COMMANDS)
        if reason:
            raise ClusterError(f"no Slurm here: {reason}")
        for line in ip("-o", "-4", "addr", "show").stdout.splitlines():
            address = ipaddress.ip_interface(line.split()[3])
            if address.network.overlaps(self.subnet) and line.split()[1] != self.bridge:
                raise ClusterError(f"the cluster's subnet {self.subnet} overlaps {address} on {line.split()[1]}: "
                                   "pick another cluster index")

    def _make_network(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.head_address}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for node in self.nodes:
            ip("netns", "add", node.namespace)
            ip("link", "add", node.link, "type", "veth", "peer", "name", "eth0", "netns", node.namespace)
            ip("link", "set", node.link, "master", self.bridge, "up")
            ip("-n", node.namespace, "addr", "add", f"{node.address}/{self.subnet.prefixlen}", "dev", "eth0")
            ip("-n", node.namespace, "link", "set", "eth0", "up")
            ip("-n", node.namespace, "link", "set", "lo", "up")
            (self.folder / "nodes" / node.name / "local").mkdir(parents=True)
            self.set_hosts(node.name, self.hosts_text)
        self.node_local.mkdir()

    def down(self) -> None:
        """Stop every daemon and process of this cluster and delete its namespaces, links and folder."""
        super().stop()
        for node in self.nodes:
            if node.namespace in namespaces():
                self.kill_node(node.name)
                ip("netns", "delete", node.namespace)
            ip("link", "delete", node.link, check=False)  # its namespace's deletion may have taken it already
        ip("link", "delete", self.bridge, check=False)
        left = [name for name in [n.link for n in self.nodes] + [self.bridge]
                if ip("link", "show", name, check=False).returncode == 0]
        if left:
            raise ClusterError(f"links {', '.join(left)} are still there after 'ip link delete': remove them by hand")
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- Slurm's side (tests.slurm.Slurm calls these) -------------------------------------------------
    def _start_slurmds(self) -> None:
        for node in self.nodes:
            (self.folder / "spool" / node.name).mkdir(parents=True, exist_ok=True)
            self._run_daemon(f"slurmd:{node.name}", self.on_node(node.name, ["slurmd", "-f", str(self.conf),
                                                                             "-N", node.name]))

    def _conf_nodes(self) -> str:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // (2 * len(self.nodes))
        lines = [f"SlurmctldHost={socket.gethostname()}({self.head_address})",
                 f"SlurmdSpoolDir={self.folder / 'spool' / '%n'}",
                 f"SlurmdPidFile={self.folder / 'slurmd-%n.pid'}",
                 f"SlurmdLogFile={self.folder / 'slurmd-%n.log'}",
                 "SlurmdParameters=config_overrides",
                 f"SlurmdTimeout={SLURMD_TIMEOUT_S}"]
        lines += [f"NodeName={node.name} NodeAddr={node.address} NodeHostname={node.name} CPUs={self.cpus} "
                  f"RealMemory={memory_mb} State=UNKNOWN" for node in self.nodes]
        lines.append(f"PartitionName=vc Nodes={','.join(n.name for n in self.nodes)} Default=YES MaxTime=INFINITE "
                     "State=UP")
        return "\n".join(lines) + "\n"

    # -- on the nodes ----------------------------------------------------------------------------------
    def on_node(self, name: str, argv: Sequence[str]) -> List[str]:
        """``argv`` as node ``name`` runs it: its network, hostname, hosts file and node-local folder."""
        node = self.by_name(name)
        enter = ('mount --bind "$0" /etc/hosts && mount --bind "$1" "$2" && hostname "$3" && '
                 'exec nsenter --net="/run/netns/$4" "${@:5}"')
        return ["unshare", "--mount", "--uts", "--propagation", "private", "bash", "-c", enter,
                str(self.hosts_file(name)), str(self.folder / "nodes" / node.name / "local"), str(self.node_local),
                node.name, node.namespace, *argv]

    def hosts_file(self, name: str) -> Path:
        return self.folder / "nodes" / name / "hosts"

    def set_hosts(self, name: str, text: str) -> None:
        """Node ``name``'s /etc/hosts, rewritten in place (the file its processes have bound keeps its
        inode, so they see the change): a test breaks or restores one node's name resolution."""
        with open(self.hosts_file(name), "w") as hosts:
            hosts.write(text)

    def revive(self, name: str, timeout_s: float = 60) -> None:
        """Start node ``name``'s slurmd again (after ``kill_node``), with its link up and its hosts file
        whole, and wait until Slurm hears from it (ReturnToService=2 takes a DOWN node back)."""
        self.set_link(name, up=True)
        self.set_hosts(name, self.hosts_text)
        if not alive(self._pid(f"slurmd:{name}")):
            self._run_daemon(f"slurmd:{name}", self.on_node(name, ["slurmd", "-f", str(self.conf), "-N", name]))
        self.command(["scontrol", "update", f"NodeName={name}", "State=RESUME"], check=False)  # if drained
        deadline = time.monotonic() + timeout_s
        while not self._responding(name):
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} is {self.node_states().get(name)} {timeout_s:g} s after its slurmd "
                                   f"restarted{self._log_tail('slurmd:' + name)}")
            time.sleep(0.5)

    def _responding(self, name: str) -> bool:
        state = self.node_states().get(name, "down*")
        return not state.endswith("*") and not state.startswith(("down", "drain", "fail"))

    def exec(self, name: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.on_node(name, argv), env=self.env, **kwargs)

    def pids(self, name: str) -> List[int]:
        """Every process in node ``name``'s network namespace (slurmd and all it started)."""
        done = ip("netns", "pids", self.by_name(name).namespace, check=False)
        return [int(pid) for pid in done.stdout.split()]

    def kill_node(self, name: str) -> List[int]:
        """The node is lost: SIGKILL every process in its namespace, slurmd included; the pids killed."""
        killed = []
        for _ in range(5):  # a process may fork while we kill
            pids = self.pids(name)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return killed

    def set_link(self, name: str, up: bool) -> None:
        """Cut (or restore) node ``name``'s only network link, as a failed switch port would."""
        ip("-n", self.by_name(name).namespace, "link", "set", "eth0", "up" if up else "down")

    def node_states(self) -> Dict[str, str]:
        text = self.command(["sinfo", "--noheader", "--Node", "--format=%N %T"], check=False).stdout
        return dict(line.split() for line in text.splitlines() if line.strip())

    def status(self) -> str:
        lines = [f"virtual cluster {self.index} in {self.folder}: SLURM_CONF={self.conf}"]
        for name in self.pid_files:
            lines.append(f"  {name}: " + (f"pid {self._pid(name)}" if alive(self._pid(name)) else "not running"))
        present = set(namespaces())
        states = self.node_states() if alive(self._pid("slurmctld")) else {}
        for node in self.nodes:
            lines.append(f"  {node.name} {node.address} namespace {node.namespace} "
                         f"({'present' if node.namespace in present else 'absent'}), "
                         f"Slurm state {states.get(node.name, '?')}")
        return "\n".join(lines)


# -- the test session's cluster --------------------------------------------------------------------------
def remove_stale_test_clusters() -> None:
    """Take down the clusters of test sessions whose process is gone (a crashed or killed run)."""
    for folder in ROOT.glob(f"{PREFIX}*"):
        index = folder.name[len(PREFIX):]
        try:
            owner = json.loads((folder / "owner.json").read_text())
        except (OSError, ValueError):
            owner = {"pid": None, "nodes": 3}
        if index.isdigit() and int(index) > 0 and not alive(owner.get("pid")):
            VirtualCluster(int(index), nodes=owner.get("nodes", 3)).down()


def free_index() -> int:
    """The lowest cluster index above 0 (0 is the by-hand cluster's) with no folder and no namespace."""
    taken = {int(f.name[len(PREFIX):]) for f in ROOT.glob(f"{PREFIX}*") if f.name[len(PREFIX):].isdigit()}
    taken |= {int(ns.split("-")[1][2:]) for ns in namespaces() if ns.startswith("megdet-vc")
              and ns.split("-")[1][2:].isdigit()}
    for index in range(1, MAX_INDEX + 1):
        if index not in taken:
            return index
    raise ClusterError(f"all {MAX_INDEX} virtual cluster indexes are taken: scripts/vcluster.sh down, or remove "
                       f"{ROOT}/{PREFIX}*")


def start_session_cluster(nodes: int = 3, cpus: int = 4) -> VirtualCluster:
    """A cluster of its own for this test session (another session may run beside it), up; the caller
    takes it down. Clusters of sessions that crashed are removed first."""
    with open(ROOT / "megdet-vcluster.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # held until the cluster is up: its folder and namespaces claim the index
        remove_stale_test_clusters()
        cluster = VirtualCluster(free_index(), nodes=nodes, cpus=cpus)
        cluster.up()
    return cluster


# -- the command line (scripts/vcluster.sh) ----------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vcluster.sh", description="a multi-node Slurm cluster on this machine "
                                     "in network namespaces (root)")
    parser.add_argument("--index", type=int, default=0, help="which cluster (subnet 10.77.INDEX.0/24; default 0)")
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start the cluster (again, if half of it is there)")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--cpus", type=int, default=4, help="CPUs each node declares (all share this machine's cores)")
    sub.add_parser("down", help="stop every daemon and remove the namespaces, links and state")
    sub.add_parser("status", help="daemons, namespaces and Slurm's node states")
    run = sub.add_parser("exec", help="run a command on one node")
    run.add_argument("node")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        size = json.loads((ROOT / f"{PREFIX}{args.index}" / "owner.json").read_text())
    except (OSError, ValueError):
        size = {}
    cluster = VirtualCluster(args.index, nodes=getattr(args, "nodes", None) or size.get("nodes", 3),
                             cpus=getattr(args, "cpus", None) or size.get("cpus", 4))
    try:
        if args.action == "up":
            cluster.up()
            print(cluster.status())
            print(f"use it: export SLURM_CONF={cluster.conf}")
        elif args.action == "down":
            cluster.down()
            print(f"virtual cluster {args.index}: down (no namespace, link, daemon or folder left)")
        elif args.action == "status":
            print(cluster.status())
        else:
            if not args.command:
                parser.error("exec needs a command: exec NODE COMMAND...")
            return cluster.exec(args.node, args.command).returncode
    except (ClusterError, RuntimeError) as error:
        print(f"vcluster: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
