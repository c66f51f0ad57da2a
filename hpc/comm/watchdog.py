"""Liveness of the ranks, beside the engine: a rank that dies or stops ends the run in seconds, with one
line on every rank naming it (rank, pid, host).

Each rank starts a small watchdog process (this file run by a plain ``python -I``: the standard library
only) that watches its rank's process and talks to rank 0's watchdog, over one TCP connection each, with a
heartbeat every ``interval_s``:

- its rank's process ended without exiting in order (SIGKILL, a segfault, the OOM killer): it died;
- its rank's process has been stopped (SIGSTOP, a debugger) for ``stall_timeout_s``;
- a watchdog silent for ``stall_timeout_s``, or whose connection closed without a goodbye: its node is
  frozen, cut off or gone.

Rank 0's watchdog tells every other one. Each hands the line to its rank's process, whose reader thread
prints it and ends the process with status 2 (``os._exit``: the main thread may be blocked in a
collective that never returns); a process that does not end within ``GRACE_S`` (stuck in C code that
holds the GIL, as Horovod's enqueue does while its background thread waits for a stopped peer) or that is
itself stopped gets the line printed by its watchdog and is killed (SIGKILL). A separate process is
needed: a thread of the rank's process cannot run Python while another thread holds the GIL.

A watchdog beats while its rank computes, evaluates or writes a checkpoint, so none of those can trip it;
a rank that is alive but never joins a collective is the engine's timeout's case (``MEGDET_COMM_TIMEOUT``).
A rank that exits in order (any status) says goodbye first; if a collective then fails for want of it,
``explain`` names it.
"""
from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

DEFAULT_STALL_TIMEOUT_S = 60
HEARTBEAT_INTERVAL_S = 1.0
GRACE_S = 5.0  # for a rank's process to end itself once told, before its watchdog kills it
EXIT_PEER_FAILED = 2  # hpc.errors.EXIT_USER_ERROR: the line is the same kind as a UserError's
START_TIMEOUT_S = 60


class Watchdog:
    """This rank's side: starts its watchdog process and ends this process on its word. Collective:
    every rank of ``comm`` constructs it, once the engine runs."""

    def __init__(self, comm, stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S):
        from hpc import errors
        from hpc.comm.base import CommError

        self.rank, self.size = comm.rank, comm.size
        self.interval_s = min(HEARTBEAT_INTERVAL_S, float(stall_timeout_s) / 5)
        self._gone: Dict[int, str] = {}  # ranks that exited in order: rank -> "rank R (pid P on HOST)"
        self._closing = False
        settings = {"rank": self.rank, "size": self.size, "stall_timeout_s": float(stall_timeout_s),
                    "interval_s": self.interval_s, "line_prefix": f"{errors.program}: error{errors.rank_label()}: "}
        error, address = None, None
        try:
            self._process = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), json.dumps(settings)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            self._pipes = (self._process.stdin.fileno(), self._process.stdout.fileno())
            os.register_at_fork(after_in_child=self._forget_in_child)
            atexit.register(self.close)  # from now on, an exit of this process in order is no death
            if self.rank == 0:
                address = self._expect("address").split()
        except (OSError, CommError) as failure:
            error = f"rank {self.rank} cannot start its watchdog process ({failure})"
        table = comm.allgather_object((socket.gethostname(), os.getpid(), address, error))
        failed = [entry[3] for entry in table if entry[3] is not None]
        if failed:
            raise CommError(failed[0])
        self.processes: List[Tuple[str, int]] = [(host, pid) for host, pid, _, _ in table]
        with comm.all_or_none():
            try:
                self._process.stdin.write(json.dumps([[host, pid] for host, pid in self.processes] + [table[0][2]])
                                          + "\n")
                self._expect("ready")
            except OSError as failure:  # a watchdog process that died meanwhile: a broken pipe
                raise CommError(str(failure)) from None
        self._reader = threading.Thread(target=self._read, name="hpc-comm-watchdog", daemon=True)
        self._reader.start()

    def _expect(self, kind: str) -> str:
        """The rest of the watchdog process's next line, which must start with ``kind``."""
        from hpc.comm.base import CommError

        line = self._process.stdout.readline().rstrip("\n")
        word, _, rest = line.partition(" ")
        if word != kind:
            raise CommError(rest if word == "error" else f"rank {self.rank}'s watchdog process ended before it "
                            f"was ready (exit status {self._process.poll()})")
        return rest

    def _read(self) -> None:
        """The reader thread: "gone R WHO" notes a rank that left in order; "fail LINE" ends this process."""
        from hpc import errors

        for line in self._process.stdout:
            word, _, rest = line.rstrip("\n").partition(" ")
            if word == "gone":
                rank, _, who = rest.partition(" ")
                self._gone[int(rank)] = who
            elif word == "fail":
                errors.flush_streams()
                errors.report(rest)
                os._exit(EXIT_PEER_FAILED)

    def explain(self, grace_s: Optional[float] = None) -> Optional[str]:
        """After a collective failed: wait ``grace_s`` (default 3 heartbeats) for the watchdog's word of a
        rank that died or stopped (this process then ends: the call does not return), and return which
        ranks had exited in order before ("rank 1 (pid P on HOST) had exited"), or None."""
        time.sleep(3 * self.interval_s if grace_s is None else grace_s)
        gone = [who for _, who in sorted(self._gone.items())]
        return f"{', '.join(gone)} had exited" if gone else None

    def close(self) -> None:
        """Tell the watchdog process that this rank exits in order, and wait for it to end."""
        if self._closing:
            return
        self._closing = True
        try:
            self._process.stdin.write("bye\n")
            self._process.stdin.flush()
            self._process.wait(timeout=10 * self.interval_s)
        except (OSError, ValueError, subprocess.TimeoutExpired):  # it ended already, or hangs: it goes with us
            pass

    def stop_others(self, message: str) -> None:
        """End every other rank with ``message`` (one line), as for a rank that died: this rank stops on a
        bug and exits, and the others would wait in their next collective until its timeout."""
        if self._closing:
            return
        self._closing = True
        try:
            self._process.stdin.write("stop " + " ".join(message.split()) + "\n")
            self._process.stdin.flush()
            self._process.wait(timeout=10 * self.interval_s)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass

    def _forget_in_child(self) -> None:
        """In a forked child (a DataLoader worker): let go of the pipes, so that this process's death
        closes them at once, and never say goodbye for it. Their descriptors become /dev/null's rather
        than closed (the file objects, whose locks the reader thread may hold, are not touched)."""
        self._closing = True
        devnull = os.open(os.devnull, os.O_RDWR)
        for descriptor in self._pipes:
            os.dup2(devnull, descriptor)
        os.close(devnull)


# ---- the watchdog process ----------------------------------------------------------------------------

class _Link:
    """A connection to another watchdog, as this one sees it."""

    def __init__(self, sock: socket.socket, rank: int = -1):
        self.sock, self.rank = sock, rank
        self.last_heard = time.monotonic()
        self.pending = b""


class _WatchdogProcess:
    """The watchdog of one rank: see the module docstring. Its stdin and stdout are pipes to its rank's
    process (lines: the table of ranks and "bye" in; "address", "ready", "error", "gone" and "fail" out)."""

    def __init__(self, settings: dict):
        self.rank, self.size = settings["rank"], settings["size"]
        self.stall_timeout_s, self.interval_s = settings["stall_timeout_s"], settings["interval_s"]
        self.line_prefix = settings["line_prefix"]
        self.main_pid = os.getppid()
        self.selector = selectors.DefaultSelector()
        self.links: Dict[int, _Link] = {}  # rank 0: every other rank's; the others: rank 0's
        self.unnamed: List[_Link] = []  # rank 0: connections whose "hello" has not come yet
        self.processes: List[Tuple[str, int]] = []
        self.listener: Optional[socket.socket] = None
        self.stopped_since: Optional[float] = None
        self.stdin_pending = ""
        os.set_blocking(sys.stdin.fileno(), False)
        self.selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
        if self.rank == 0:
            self.listener = socket.create_server(("", 0), backlog=self.size)
            self.listener.setblocking(False)
            self.selector.register(self.listener, selectors.EVENT_READ, "listener")
            self.tell_main(f"address {socket.getfqdn()} {self.listener.getsockname()[1]}")

    def who(self, rank: int) -> str:
        if rank >= len(self.processes):  # before the table came
            return f"rank {rank}"
        host, pid = self.processes[rank]
        return f"rank {rank} (pid {pid} on {host})"

    def tell_main(self, line: str) -> None:
        try:
            print(line, flush=True)
        except OSError:  # the rank's process has gone
            pass

    def run(self) -> None:
        last_loop = next_beat = time.monotonic()
        while True:
            for key, _ in self.selector.select(timeout=self.interval_s):
                if key.data == "stdin":
                    self.read_main()
                elif key.data == "listener":
                    self.accept()
                else:
                    self.read_link(key.data)
            now = time.monotonic()
            if now - last_loop > self.stall_timeout_s / 2:  # this watchdog was stopped itself (a suspended job)
                for link in self.links.values():
                    link.last_heard = now
            last_loop = now
            if now >= next_beat:
                self.send_all(b"beat\n")
                next_beat = now + self.interval_s
            self.check_main(now)
            for link in list(self.links.values()):
                if now - link.last_heard > self.stall_timeout_s:
                    self.conclude(f"no heartbeat from {self.who(link.rank)}'s node for {now - link.last_heard:.0f} s "
                                  f"(MEGDET_STALL_TIMEOUT={self.stall_timeout_s:g}): the node is frozen or cut off; "
                                  "ending the run: check that node, then restart the job (training resumes from "
                                  "its last checkpoint)")

    # this rank's process -----------------------------------------------------------------------------
    def read_main(self) -> None:
        try:
            data = os.read(sys.stdin.fileno(), 65536).decode()
        except BlockingIOError:
            return
        if not data:
            self.main_died()
        self.stdin_pending += data
        while "\n" in self.stdin_pending:
            line, self.stdin_pending = self.stdin_pending.split("\n", 1)
            if line == "bye":
                self.send_all(b"bye\n")
                self.leave()
            if line.startswith("stop "):  # its rank stops on a bug and ends itself: end the others
                self.send_all(f"fail {line[len('stop '):]}\n".encode())
                self.leave()
            self.start(json.loads(line))

    def start(self, table: list) -> None:
        """The table of ranks (and rank 0's address) from the rank's process: connect to rank 0."""
        self.processes = [(host, pid) for host, pid in table[:-1]]
        if self.rank == 0:
            self.tell_main("ready")
            return
        host, port = table[-1]
        try:
            sock = socket.create_connection((host, int(port)), timeout=START_TIMEOUT_S)
            sock.sendall(f"hello {self.rank}\n".encode())
        except OSError as error:
            self.tell_main(f"error rank {self.rank} cannot reach rank 0's watchdog at {host}:{port} ({error}): "
                           "let the ranks open TCP connections to rank 0's node")
            sys.exit(1)
        sock.setblocking(False)
        self.links[0] = _Link(sock, 0)
        self.selector.register(sock, selectors.EVENT_READ, self.links[0])
        self.tell_main("ready")

    def check_main(self, now: float) -> None:
        if os.getppid() != self.main_pid:
            self.main_died()
        if _process_state(self.main_pid) in ("T", "t"):
            self.stopped_since = self.stopped_since or now
            if now - self.stopped_since > self.stall_timeout_s:
                self.conclude(f"{self.who(self.rank)} has been stopped for {now - self.stopped_since:.0f} s (SIGSTOP "
                              f"or a debugger; MEGDET_STALL_TIMEOUT={self.stall_timeout_s:g}); ending the run, that "
                              "rank included: restart the job (training resumes from its last checkpoint)",
                              main_stopped=True)
        else:
            self.stopped_since = None

    def main_died(self) -> None:
        self.conclude(f"{self.who(self.rank)} died: its process ended without exiting in order (killed, crashed or "
                      "out of memory); ending the run: look for the cause in that rank's output and its node's log, "
                      "then restart the job (training resumes from its last checkpoint)", main_gone=True)

    # the other watchdogs -----------------------------------------------------------------------------
    def accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        link = _Link(sock)
        self.unnamed.append(link)
        self.selector.register(sock, selectors.EVENT_READ, link)

    def read_link(self, link: _Link) -> None:
        try:
            data = link.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(link.sock)
            link.sock.close()
            if link.rank < 0:
                self.unnamed.remove(link)  # a stray connection, not a rank's
            else:
                self.conclude(f"{self.who(link.rank)}'s node stopped answering: its watchdog's connection closed "
                              "(the node went down, or the watchdog was killed); ending the run: check that node, "
                              "then restart the job (training resumes from its last checkpoint)")
            return
        link.last_heard = time.monotonic()
        link.pending += data
        while b"\n" in link.pending:
            line, link.pending = link.pending.split(b"\n", 1)
            self.on_line(link, line.decode(errors="replace"))

    def on_line(self, link: _Link, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "hello" and link in self.unnamed:
            self.unnamed.remove(link)
            link.rank = int(rest)
            self.links[link.rank] = link
        elif word == "bye":  # the last line on this link: closing it lets the peer's watchdog leave at once
            self.selector.unregister(link.sock)
            link.sock.close()
            del self.links[link.rank]
            self.tell_main(f"gone {link.rank} {self.who(link.rank)}")
            if self.rank == 0:
                self.send_all(f"gone {link.rank}\n".encode())
        elif word == "gone":
            self.tell_main(f"gone {rest} {self.who(int(rest))}")
        elif word == "fail":
            self.conclude(rest, source=link.rank)

    def send_all(self, data: bytes, skip: int = -1) -> None:
        for rank, link in self.links.items():
            if rank != skip:
                try:
                    link.sock.send(data)
                except OSError:  # a full buffer (a stopped node) or a closed connection: reading tells which
                    pass

    def conclude(self, message: str, source: int = -1, main_gone: bool = False, main_stopped: bool = False) -> None:
        """The run is over: spread ``message`` (rank 0 to every other watchdog, the others to rank 0's,
        except back to ``source``), hand it to this rank's process, end that process, exit."""
        self.send_all(f"fail {message}\n".encode(), skip=source)
        if not main_gone:
            if not main_stopped:
                self.tell_main(f"fail {message}")
                deadline = time.monotonic() + GRACE_S
                while os.getppid() == self.main_pid and time.monotonic() < deadline:
                    time.sleep(0.05)
            if os.getppid() == self.main_pid:
                print(f"{self.line_prefix}{message}", file=sys.stderr, flush=True)
                os.kill(self.main_pid, signal.SIGKILL)
        self.leave()

    def leave(self, timeout_s: float = 2.0) -> None:
        """Exit once every peer has read this watchdog's last lines: each connection is half-closed, then
        read until the peer closes it (or ``timeout_s``). Closing it at once, with beats unread, would
        reset it, and the peer could lose a "fail" or "bye" it had not read yet."""
        sockets = [link.sock for link in self.links.values()]
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        while sockets and time.monotonic() < deadline:
            for sock in list(sockets):
                try:
                    if sock.recv(65536):
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                sockets.remove(sock)
            time.sleep(0.02)
        sys.exit(0)


def _process_state(pid: int) -> str:
    """The state letter of process ``pid`` in /proc ("R", "S", "T" stopped...), "" if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the ranks; they say goodbye
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher stopping the job: the rank decides
    for stop in (signal.SIGUSR1, signal.SIGUSR2):  # srun signals every process of a task (Slurm's --signal)
        signal.signal(stop, signal.SIG_IGN)
    _WatchdogProcess(json.loads(sys.argv[1])).run()
