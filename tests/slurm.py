"""A real one-node Slurm on this machine, for the tests, and Debian packages installed on demand.

    def test_x(slurm):  # the session fixture (conftest.py); its first use installs and starts Slurm
        job = slurm.submit(script, cwd=folder)
        assert slurm.wait(job).state == "COMPLETED"

As root with apt-get, missing packages are installed once per session (``apt-get update`` then
``apt-get install -y``; Debian's slurm-wlm + munge). ``munged``, ``slurmctld`` and ``slurmd`` are
started from a scratch folder with their own socket, ports, state and pid files, so they touch no
system daemon; at the end of the session exactly those three are stopped, by the pids in their pid
files. Where this cannot run (not root, apt fails, a daemon does not come up) the tests that need it
are skipped with the reason; they never pass silently.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

SLURM_PACKAGES = ("slurm-wlm", "munge")
SLURM_COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "srun")
DAEMON_START_TIMEOUT = 60
FINISHED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE")

_apt_updated = False


def ensure_debian_packages(packages: Sequence[str], commands: Sequence[str]) -> Optional[str]:
    """Install ``packages`` when one of ``commands`` is missing; the reason they cannot be had, or None."""
    if all(shutil.which(command) for command in commands):
        return None
    if os.geteuid() != 0:
        return f"needs root to install {' '.join(packages)} (or install them: apt-get install {' '.join(packages)})"
    if shutil.which("apt-get") is None:
        return f"no apt-get to install {' '.join(packages)}"
    global _apt_updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock_wait = ["-o", "DPkg::Lock::Timeout=600"]  # other engineers' apt runs on the same machine
    steps = ([] if _apt_updated else [["apt-get", *lock_wait, "update", "-q"]]) + \
        [["apt-get", *lock_wait, "install", "-y", "-q", "--no-install-recommends", *packages]]
    for step in steps:
        done = subprocess.run(step, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            return f"'{' '.join(step)}' failed ({done.returncode}): {done.stdout.strip()[-500:]}"
        _apt_updated = _apt_updated or "update" in step
    missing = [command for command in commands if shutil.which(command) is None]
    return f"installed {' '.join(packages)} but {', '.join(missing)} still missing" if missing else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


@dataclass
class JobInfo:
    job_id: str
    state: str
    restarts: int
    exit_code: str
    fields: Dict[str, str]


class Slurm:
    """The daemons of a one-node cluster in ``folder`` and the client commands that talk to it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.pid_files = {"munged": folder / "munge" / "munged.pid", "slurmctld": folder / "slurmctld.pid",
                          "slurmd": folder / "slurmd.pid"}

    # -- daemons ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._start_munge()
        self._write_conf()
        self._run_daemon("slurmctld", ["slurmctld", "-f", str(self.conf)])
        self._start_slurmds()
        self._wait_nodes_idle()

    def _start_slurmds(self) -> None:
        self._run_daemon("slurmd", ["slurmd", "-f", str(self.conf)])

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        self.folder.chmod(0o755)  # mkdtemp's 0700 would keep the munge user out
        run_dir = self.folder / "munge"
        run_dir.mkdir(mode=0o755)
        key = run_dir / "munge.key"
        subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True, capture_output=True)
        for path in (run_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        self.munge_socket = run_dir / "munge.socket"
        # munged refuses to run as root; --force accepts the scratch folder's permissions under /tmp.
        self._run_daemon("munged", ["runuser", "-u", "munge", "--", "munged", "--force",
                                    f"--socket={self.munge_socket}", f"--key-file={key}",
                                    f"--pid-file={self.pid_files['munged']}", f"--log-file={run_dir / 'munged.log'}",
                                    f"--seed-file={run_dir / 'munged.seed'}"])

    def _write_conf(self) -> None:
        for name in ("state", "spool"):
            (self.folder / name).mkdir()
        self.conf.write_text(f"""\
ClusterName=megdet-test
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=2
MinJobAge=900
StateSaveLocation={self.folder / 'state'}
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmctldLogFile={self.folder / 'slurmctld.log'}
{self._conf_nodes()}""")

    def _conf_nodes(self) -> str:
        """The slurm.conf lines that place the controller and the nodes: here, both on this host."""
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
        return f"""\
SlurmctldHost={self.node}
SlurmdSpoolDir={self.folder / 'spool'}
SlurmdPidFile={self.pid_files['slurmd']}
SlurmdLogFile={self.folder / 'slurmd.log'}
NodeName={self.node} CPUs={self.cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""

    def _run_daemon(self, name: str, argv: Sequence[str]) -> None:
        """Start a daemon that forks into the background; wait for its pid file."""
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=DAEMON_START_TIMEOUT)
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while done.returncode == 0 and self._pid(name) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if done.returncode != 0 or self._pid(name) is None:
            raise RuntimeError(f"{name} did not start (exit {done.returncode}): {done.stderr.strip()[-500:]}"
                               f"{self._log_tail(name)}")

    def _wait_nodes_idle(self) -> None:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        states = []
        while time.monotonic() < deadline:
            states = self.command(["sinfo", "--noheader", "--Node", "--format=%T"], check=False).stdout.split()
            if states and all(state.startswith("idle") for state in states):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the nodes are not idle after {DAEMON_START_TIMEOUT} s (states {states})"
                           f"{self._log_tail('slurmctld')}{self._log_tail('slurmd')}")

    def _pid(self, name: str) -> Optional[int]:
        try:
            pid = int(self.pid_files[name].read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def _log_tail(self, name: str) -> str:
        log = self.folder / ("munge/munged.log" if name == "munged" else f"{name.replace(':', '-')}.log")
        return f"\n{name} log:\n{log.read_text()[-1500:]}" if log.exists() else ""

    def stop(self) -> None:
        """Stop the daemons this object started (slurmd first, munged last), by their pid files."""
        order = ("slurmd", "slurmctld", "munged")  # a node's slurmd is "slurmd:NODE"
        for name in sorted(self.pid_files, key=lambda name: order.index(name.split(":")[0])):
            pid = self._pid(name)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)

    # -- clients ---------------------------------------------------------------------------------------
    def command(self, argv: Sequence[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def submit(self, script: Path, cwd: Path, env: Optional[Dict[str, str]] = None, options: Sequence[str] = ()) -> str:
        """``sbatch OPTIONS SCRIPT`` from ``cwd`` with environment ``env``; the job id."""
        done = subprocess.run(["sbatch", "--parsable", *options, str(script)], cwd=cwd, capture_output=True,
                              text=True, timeout=60, env={**(env or os.environ), "SLURM_CONF": str(self.conf)})
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> JobInfo:
        text = self.command(["scontrol", "show", "job", "--oneliner", job_id]).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", text))
        return JobInfo(job_id, fields.get("JobState", "?"), int(fields.get("Restarts", "0")),
                       fields.get("ExitCode", "?"), fields)

    def wait(self, job_id: str, timeout: float = 180, until: Sequence[str] = FINISHED_STATES,
             poll_s: float = 1.0) -> JobInfo:
        """Poll every ``poll_s`` until the job's state is in ``until``; fails the test after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.state in until:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.state} after {timeout:.0f} s (waiting for "
                            f"{'/'.join(until)}){self._log_tail('slurmctld')}{self._log_tail('slurmd')}")
            time.sleep(poll_s)
