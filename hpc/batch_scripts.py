"""Slurm and PBS batch scripts for a multi-node launch, rendered from the templates in ``jobs/templates``.

    job = Job(scheduler="slurm", name="run-64gpu", gpus=64, gpus_per_node=8, command="python train.py",
              header=["what this job reproduces"])
    text = render(job)  # job.nodes == 8; the script checks the allocation, launches, forwards USR1

Generic: it knows resources, launchers and schedulers, nothing of what the command computes. The
caller checks that its own work fits ``gpus`` ranks before building a ``Job``.

Templates: ``<scheduler>.<suffix>.in`` holds the directives and the host list, ``body.sh.in`` the rest
(environment, staging, resume, launch). ``@NAME@`` is replaced by the value of NAME; a line that holds
only a placeholder whose value is empty is dropped (optional directives leave no gaps), and so is a
blank line after a blank line.

Time limit and checkpoint: Slurm sends USR1 to the batch shell 120 s before the limit
(``--signal=B:USR1@120``: the ranks of a plain ``mpirun`` run inside the batch step, which a signal
without ``B:`` would miss). The script forwards it to the launcher, which passes it to every rank
(MPICH's mpirun and srun do; horovodrun would exit, so there the script stops it instead), waits for
the ranks to checkpoint and exit, then requeues the job (Slurm: ``scontrol requeue``; PBS, where
``qrerun`` needs operator rights: ``qsub`` of the same script again). The next run resumes from the
newest ``*.pt`` in the run folder. On PBS, send the USR1 yourself (``qsig -s USR1 JOBID``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

from hpc.errors import UserError

TEMPLATES = Path(__file__).resolve().parents[1] / "jobs" / "templates"
SCHEDULERS = {"slurm": "sbatch", "pbs": "pbs"}  # scheduler: file suffix
LAUNCHERS = ("mpirun", "srun", "horovodrun")
ENGINES = ("horovod", "torch")
_TIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


class JobError(UserError):
    """A job that cannot be rendered as asked; the message names the value and the fix."""


def check_time(text: str) -> str:
    """``text`` when it is a time limit HH:MM:SS (hours may exceed 24), else ``JobError``."""
    match = _TIME.match(text)
    if not match or not any(int(part) for part in match.groups()):
        raise JobError(f"time limit {text!r} is not HH:MM:SS (e.g. 24:00:00 or 00:30:00): give hours, minutes "
                       "and seconds, minutes and seconds below 60, more than zero")
    return text


def check_nodes(gpus: int, gpus_per_node: int) -> None:
    """``JobError`` unless ``gpus`` fill whole nodes of ``gpus_per_node``."""
    for what, value in (("GPUs", gpus), ("GPUs per node", gpus_per_node)):
        if value < 1:
            raise JobError(f"{what} must be at least 1, not {value}")
    if gpus % gpus_per_node:
        raise JobError(f"{gpus} GPUs do not fill nodes of {gpus_per_node} GPUs: ask for a multiple of "
                       f"{gpus_per_node} GPUs (e.g. {gpus + -gpus % gpus_per_node}) or set --gpus-per-node to a "
                       f"divisor of {gpus}")


@dataclass(frozen=True)
class Job:
    """One batch job: ``gpus`` ranks, ``gpus_per_node`` on each node, each running ``command``.

    command: shell words after the launcher, run on every rank; it may use ``$DATA`` (the shards folder,
        staged or not, when ``data`` is set), ``$RUN_DIR`` and ``"${RESUME_ARGS[@]}"`` (``--resume
        CHECKPOINT`` when the run folder holds a checkpoint, else nothing).
    engine: what averages the gradients: "horovod" (Horovod's fused allreduce; cross-GPU BN on
        torch.distributed) or "torch" (torch.distributed for both, ``MEGDET_COMM=torch``; rank 0's
        address from the launcher: srun's first node, or mpirun's ranks through mpi4py).
    cpu: the ranks compute on CPUs: request no GPUs; ``gpus`` then counts CPU ranks.
    stage_to: copy ``data`` to this node-local folder on every node (one copy per node) before launch.
    header: comment lines for the top of the script.
    script_name: the file name the script is submitted as (PBS resubmits it to continue); default
        ``file_name``.
    """

    scheduler: str
    name: str
    gpus: int
    gpus_per_node: int
    command: str
    run_dir: str
    header: Sequence[str] = ()
    launcher: str = "mpirun"
    engine: str = "horovod"
    time: str = "24:00:00"
    cpus_per_rank: int = 1
    cpu: bool = False
    queue: Optional[str] = None
    account: Optional[str] = None
    data: Optional[str] = None
    stage_to: Optional[str] = None
    script_name: Optional[str] = None

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise JobError(f"unknown scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.launcher not in LAUNCHERS:
            raise JobError(f"unknown launcher {self.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
        if self.engine not in ENGINES:
            raise JobError(f"unknown engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.engine == "torch" and self.launcher == "horovodrun":
            raise JobError("engine torch cannot start under horovodrun (it takes rank 0's address from srun or "
                           "mpirun): use --launcher srun or mpirun, or --engine horovod")
        if self.launcher == "srun" and self.scheduler != "slurm":
            raise JobError(f"launcher srun needs Slurm, not {self.scheduler}: use --launcher mpirun or horovodrun")
        check_nodes(self.gpus, self.gpus_per_node)
        if self.cpus_per_rank < 1:
            raise JobError(f"CPUs per rank must be at least 1, not {self.cpus_per_rank}")
        if self.stage_to and not self.data:
            raise JobError("--stage-to-local needs --data: name the shards folder to copy to each node")
        check_time(self.time)

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    @property
    def file_name(self) -> str:
        return f"{self.name}.{SCHEDULERS[self.scheduler]}"


def render(job: Job) -> str:
    """The batch script of ``job``, ready for sbatch / qsub."""
    values = _values(job)
    values["BODY"] = _fill((TEMPLATES / "body.sh.in").read_text(), values).rstrip("\n")
    return _fill((TEMPLATES / f"{job.scheduler}.{SCHEDULERS[job.scheduler]}.in").read_text(), values)


def _fill(template: str, values: Dict[str, str]) -> str:
    lines = []
    for line in template.splitlines():
        whole = _PLACEHOLDER.fullmatch(line.strip())
        if whole and values[whole.group(1)] == "" or line == "" and lines and lines[-1] == "":
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: values[m.group(1)], line))
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """``text`` in double quotes for bash, ``$VARIABLES`` still expanded."""
    return '"' + re.sub(r'(["\\`])', r"\\\1", text) + '"'


# The launch line of each launcher; HOST_LIST is "host1,host2", HOST_SLOTS "host1:8,host2:8".
_LAUNCH = {
    "mpirun": 'mpirun -np "$RANKS" -ppn "$RANKS_PER_NODE" -hosts "$HOST_LIST"',
    "srun": 'srun --mpi=pmi2 --ntasks="$RANKS" --ntasks-per-node="$RANKS_PER_NODE" --nodelist="$HOST_LIST" '
            '--kill-on-bad-exit=1',
    "horovodrun": 'horovodrun --gloo -np "$RANKS" -H "$HOST_SLOTS"',
}
_STOP = {
    "mpirun": ("# MPICH's mpirun passes USR1 on to every rank.", 'kill -USR1 "$LAUNCHER_PID" || true'),
    "srun": ("# srun passes USR1 on to every task of the step.", 'kill -USR1 "$LAUNCHER_PID" || true'),
    "horovodrun": ("# horovodrun exits on USR1 without passing it on: stop it; the requeued run resumes from\n"
                   "  # the last periodic checkpoint.", 'kill -TERM "$LAUNCHER_PID" || true'),
}
# One process per node, for staging (Slurm: a job step; PBS: mpirun over the hosts).
_ON_EACH_NODE = {
    "slurm": 'srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1',
    "pbs": 'mpirun -np "$NODES" -ppn 1 -hosts "$HOST_LIST"',
}


def _values(job: Job) -> Dict[str, str]:
    gpu_directive = {"slurm": f"#SBATCH --gres=gpu:{job.gpus_per_node}",
                     "pbs": f":ngpus={job.gpus_per_node}"}[job.scheduler]
    queue_directive = {"slurm": f"#SBATCH --partition={job.queue}", "pbs": f"#PBS -q {job.queue}"}[job.scheduler]
    account_directive = {"slurm": f"#SBATCH --account={job.account}", "pbs": f"#PBS -A {job.account}"}[job.scheduler]
    stop_comment, stop_command = _STOP[job.launcher]
    host_slots = ('HOST_SLOTS=""\nfor host in "${HOSTS[@]}"; do HOST_SLOTS+="${HOST_SLOTS:+,}$host:$RANKS_PER_NODE"; '
                  'done') if job.launcher == "horovodrun" else ""
    return {
        "HEADER": "\n".join(f"# {line}".rstrip() for line in job.header),
        "NAME": job.name,
        "NODES": str(job.nodes),
        "RANKS_PER_NODE": str(job.gpus_per_node),
        "CPUS_PER_RANK": str(job.cpus_per_rank),
        "CPUS_PER_NODE": str(job.cpus_per_rank * job.gpus_per_node),
        "GPU_DIRECTIVE": "" if job.cpu else gpu_directive,
        "TIME": job.time,
        "QUEUE_DIRECTIVE": queue_directive if job.queue else "",
        "ACCOUNT_DIRECTIVE": account_directive if job.account else "",
        "OMP": ("# The ranks compute on CPUs: one OpenMP thread per CPU of a rank.\n"
                f"export OMP_NUM_THREADS={job.cpus_per_rank}" if job.cpu else
                "# Each rank computes on its GPU; its CPUs run the data-loading workers: one OpenMP thread.\n"
                "export OMP_NUM_THREADS=1"),
        "HOST_SLOTS": host_slots,
        "ENGINE": "" if job.engine == "horovod" else (
            "# Gradients and cross-GPU BN over torch.distributed (NCCL on GPUs, Gloo on CPUs); the ranks meet at\n"
            f"# rank 0's address, which {job.launcher} gives them.\nexport MEGDET_COMM=torch"),
        "DATA": f"DATA={_quote(job.data)}" if job.data else "",
        "STAGE": _stage(job),
        "RUN_DIR": _quote(job.run_dir),
        "LAUNCH": _LAUNCH[job.launcher],
        "LAUNCHER": job.launcher,
        "STOP_COMMENT": stop_comment,
        "STOP_COMMAND": stop_command,
        "COMMAND": job.command,
        "REQUEUE": {"slurm": 'scontrol requeue "$JOB_ID"',
                    "pbs": f'qsub {_quote("$PBS_O_WORKDIR/" + (job.script_name or job.file_name))}'}[job.scheduler],
    }


def _stage(job: Job) -> str:
    if not job.stage_to:
        return ""
    return "\n".join([
        "# Copy the shards to node-local disk, one copy per node, so the ranks do not all read the shared",
        "# file system at once.",
        f"LOCAL_DATA={_quote(job.stage_to)}",
        'echo "[job] staging $DATA to $LOCAL_DATA on $NODES nodes"',
        f'{_ON_EACH_NODE[job.scheduler]} mkdir -p "$LOCAL_DATA"',
        f'{_ON_EACH_NODE[job.scheduler]} cp -a "$DATA/." "$LOCAL_DATA/"',
        'DATA=$LOCAL_DATA',
    ])
