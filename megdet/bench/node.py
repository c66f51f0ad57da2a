"""``megdet bench node``: the checks that prove a GPU node, as one table and one JSON that are there
whatever happens to the steps.

    megdet bench node --out runs/bench/node     # a GPU node (scripts/gpu_check.sh runs it after set-up)
    megdet bench node --cpu                     # the same steps at tiny sizes on the CPU (make test runs it)

Steps, in the order of the GPU issue (``--steps``), each one ``Step``: its commands, its deadline and
the function that reads its figures:
  doctor  ``megdet doctor`` on every GPU of the node under torchrun: each rank's GPU, one NCCL
          allreduce over the world and one over groups of two
  model   one ``megdet bench model`` run, three rows:
    step           the R50-FPN training step at 800x1333, 2 images, bf16 autocast, channels-last, with
                   torchvision's settings where ours differ, beside torchvision's fasterrcnn_resnet50_fpn
                   set as ours (post-NMS proposals, RoIAlign sampling, ...): images/s, peak memory, ratio
    step-defaults  the same step as our presets build it (RoIAlign adaptive and aligned, L1 losses)
    amp            the step (our defaults) in fp32, bf16 and fp16: images/s and the ratio to fp32; the
                   row says what "fp32" ran (TF32 convolutions under torch's default flags)
  cgbn    cross-GPU BN on 2 ranks sharing the one GPU (gloo with CUDA tensors: NCCL refuses two ranks
          on one GPU), exact against nn.BatchNorm2d on CUDA
  train   ``megdet synth`` of 800-px shapes, ``megdet pack``, ``megdet train`` for 30 iterations on the
          GPU, then its evaluation: the COCO AP table

What always holds: ``node.json`` and ``node.md`` in ``--out`` are written (atomically) before the first
step and after every step, with the rows so far; ``node.log`` there gets every command and its whole
output. Each command runs in a process group of its own, and whatever of that group is left when the
command ends or its step's deadline passes is stopped (a DataLoader worker left behind would keep the
GPU). The deadlines share one budget (8 minutes on one H200, start to last line): a step whose
deadline would pass it gets what is left, a step with nothing left is a "not run" row. A failed step
is a FAIL row with one line (naming the fix when the GPU is busy or gone) and the last lines of the
failed command's stderr and stdout; the next step runs. The exit status is 0 only when every row is
ok. Large outputs (shards, checkpoints, pictures, the sub-benchmarks' results) go to a scratch folder
made under ``--scratch`` (default ``--out``), removed at the end unless ``--keep-scratch``.

``--cpu`` runs every step with the CPU's sizes (64-px images; ResNet-18 for training; no fp16: the CPU
refuses it, and the row shows that refusal) so that this script cannot rot while no GPU is at hand.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

import torch

from hpc import amp
from hpc.errors import UserError
from megdet.bench import report

NAME = "node"
COLUMNS = ("step", "status", "seconds", "figures")
LOG_NAME = "node.log"
TAIL_LINES = 30          # of a failed command's stderr and stdout, kept in its row
TAIL_CHARS = 4000
GRACE_S = 5.0            # from SIGTERM to SIGKILL of what is left of a command's process group
MIN_STEP_S = 1.0         # a step with less of the budget left is not run
NO_GPU = "megdet bench node checks a GPU node but torch sees no GPU: run it on one, or pass --cpu"
# Targets of the GPU issue (benchmark targets, not tests): our step at least torchvision's, bf16 at
# least 1.8x fp32, CGBN exact.
TARGET_VS_TORCHVISION = 1.0
TARGET_BF16_VS_FP32 = 1.8
# What a failed command's output says when the GPU is busy or gone, and the fix.
GPU_PROBLEMS = (
    (("CUDA out of memory", "CUDA error: out of memory", "cudaErrorMemoryAllocation"),
     "the GPU ran out of memory: another process may hold it (nvidia-smi lists them); free it, or run on an "
     "idle GPU"),
    (("busy or unavailable", "cudaErrorDevicesUnavailable"),
     "the GPU is busy or unavailable (another process holds it in exclusive mode: nvidia-smi lists them); "
     "free it, or run on an idle GPU"),
    (("no CUDA-capable device", "No CUDA GPUs are available", "sees no CUDA device", "cudaErrorNoDevice"),
     "torch sees no GPU any more: check nvidia-smi and CUDA_VISIBLE_DEVICES, or pass --cpu"),
)

# The GPU sizes keep the whole check within 8 minutes on one H200: the deadlines add up to the budget,
# which leaves 10 s for Python's start and the table.
GPU_SIZES = {"device": "cuda", "model": "resnet50_fpn", "size": 800, "amp": "none,bf16,fp16", "repeats": 5,
             "cgbn_device": "cuda:0", "cgbn_channels": 64, "cgbn_size": 56,
             "train_model": "resnet50_fpn", "max_size": 1333, "synth_size": 800, "train_images": 64, "val_images": 16,
             "budget_s": 470, "deadlines_s": {"doctor": 60, "model": 150, "cgbn": 60, "train": 200}}
# ResNet-50 for the step, so that a CPU whose torchvision runs compiled ops (the node's twin) times
# torchvision beside it as the node does; ResNet-18 for the training run.
CPU_SIZES = {"device": "cpu", "model": "resnet50_fpn", "size": 64, "amp": "none,bf16", "repeats": 1,
             "cgbn_device": "cpu", "cgbn_channels": 4, "cgbn_size": 8,
             "train_model": "resnet18_fpn", "max_size": 64, "synth_size": 64, "train_images": 16, "val_images": 8,
             "budget_s": 900, "deadlines_s": {"doctor": 120, "model": 300, "cgbn": 120, "train": 360}}


@dataclass(frozen=True)
class Step:
    """One step of the check. ``commands`` run in turn, each in a process group of its own, the first
    that fails ending the step, all within ``deadline_s``; then ``figures()`` reads what they wrote:
    {row: {figure: value}} for each of ``rows`` (a figure "failed": True makes that row FAIL)."""
    name: str
    rows: Tuple[str, ...]
    commands: Tuple[Tuple[str, ...], ...]
    deadline_s: float
    figures: Callable[[], Dict[str, Dict[str, Any]]]
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Ended:
    """How a command ended: ``returncode`` None when stopped at its deadline; ``left_over`` processes of
    its group were still there at its end and were stopped, ``unkillable`` of them outlived SIGKILL."""
    returncode: Optional[int]
    seconds: float
    left_over: int
    unkillable: int
    stdout_tail: str
    stderr_tail: str


class Stopped(Exception):
    """The check itself got SIGTERM."""


def add_arguments(parser) -> None:
    parser.add_argument("--cpu", action="store_true", help="the same steps at tiny sizes on the CPU")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help="steps to run, comma-separated (default: %(default)s; model = step, step-defaults, amp)")
    parser.add_argument("--scratch", default=None,
                        help="folder to make the scratch folder in: synthesized data, checkpoints, pictures, the "
                             "sub-benchmarks' results (default: --out)")
    parser.add_argument("--keep-scratch", action="store_true",
                        help="keep the scratch folder (node.json names it); by default it is removed at the end")


def run(args) -> int:
    names = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(names) - set(STEPS))
    if unknown or not names:
        raise UserError(f"Invalid --steps: {args.steps!r}; use a comma-separated subset of {', '.join(STEPS)}")
    out = Path(args.out)
    sizes = CPU_SIZES if args.cpu else GPU_SIZES
    # This process never initialises CUDA: a GPU in exclusive mode would then refuse the steps.
    machine_info = {**report.machine(cuda=False), "device": "cpu" if args.cpu else gpu_state()}
    inputs = {"cpu": args.cpu, "steps": names, **sizes}
    if not args.cpu and not torch.cuda.is_available():
        row = {"step": "gpu", "status": "FAIL", "seconds": None, "figures": NO_GPU, "values": {}, "error": NO_GPU}
        report.write(str(out), NAME, [row], COLUMNS, inputs, machine_info, state={"running": None})
        (out / LOG_NAME).write_text(NO_GPU + "\n")
        raise UserError(NO_GPU)
    scratch = Path(tempfile.mkdtemp(prefix="node-scratch-", dir=_made(Path(args.scratch or out))))
    inputs.update(scratch=str(scratch), scratch_kept=args.keep_scratch)
    print(f"[node] scratch folder {scratch} ({'kept' if args.keep_scratch else 'removed at the end'}); "
          f"results in {out}", flush=True)
    started = time.monotonic()
    try:
        steps = [STEPS[name](scratch, sizes) for name in names]
        rows = run_steps(steps, out, scratch, sizes["budget_s"], inputs, machine_info)
    finally:
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(report.markdown_table(rows, COLUMNS), flush=True)
    passed = [row for row in rows if row["status"] == "ok"]
    failed = [row["step"] for row in rows if row["status"] == "FAIL"]
    not_run = [row["step"] for row in rows if row["status"] == "not run"]
    print(f"megdet bench node: {len(passed)} of {len(rows)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; not run: {', '.join(not_run)} ({rows[-1]['error']})" if not_run else "")
          + f"; {time.monotonic() - started:.0f} s; results in {out / 'node.json'}", flush=True)
    return 0 if len(passed) == len(rows) else 1


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_steps(steps: Sequence[Step], out: Path, scratch: Path, budget_s: float, inputs: Dict,
              machine_info: Dict) -> List[Dict]:
    """Run ``steps`` in turn within ``budget_s`` seconds; write ``node.json`` and ``node.md`` under ``out``
    before the first and after each (``node.log`` gets every command's output); return the rows. A
    Ctrl-C or SIGTERM stops the running step's processes; the steps after it are "not run" rows."""
    started = time.monotonic()
    rows: List[Dict] = []
    stopped_by: Optional[str] = None

    def save(running: Optional[str]) -> None:
        report.write(str(out), NAME, rows, COLUMNS, inputs, machine_info,
                     state={"running": running, "elapsed_s": round(time.monotonic() - started, 1),
                            "budget_s": budget_s})

    _made(out)
    captures = _made(scratch / "logs")
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        with open(out / LOG_NAME, "w") as log:
            _say(log, f"megdet bench node, {time.strftime('%Y-%m-%d %H:%M:%S')}: 'python' below is "
                      f"{sys.executable}, 'megdet' is python -m megdet.cli; budget {budget_s:.0f} s")
            for step in steps:
                left = budget_s - (time.monotonic() - started)
                if stopped_by or left < MIN_STEP_S:
                    reason = (f"the check was stopped by {stopped_by}" if stopped_by
                              else f"no time left of the {budget_s:.0f} s budget")
                    new = [_row(name, "not run", None, {}, reason) for name in step.rows]
                else:
                    deadline = min(step.deadline_s, left)
                    print(f"[node] {step.name}: running (deadline {deadline:.0f} s, {left:.0f} s of the budget "
                          "left)", flush=True)
                    save(step.name)
                    step_start = time.monotonic()
                    try:
                        new = run_step(step, deadline, captures, log)
                    except (KeyboardInterrupt, Stopped) as stop:
                        stopped_by = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else str(stop)
                        new = _failed(step, step_start, [], f"stopped by {stopped_by}; its processes were stopped")
                rows.extend(new)
                _announce(new, log)
                save(None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return rows


def _announce(rows: Sequence[Dict], log: TextIO) -> None:
    """Each row as a line of the table on stdout; a failed row's one line also on stderr and in the log."""
    for row in rows:
        print(report.markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
        if row["status"] == "FAIL":
            line = f"megdet bench node: {row['step']}: {row['error']}"
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            _say(log, line)


def run_step(step: Step, deadline_s: float, captures: Path, log: TextIO) -> List[Dict]:
    """The rows of ``step``, its commands run within ``deadline_s`` (their output also captured under
    ``captures``, and appended to ``log``)."""
    start = time.monotonic()
    shown = [_shown(command) for command in step.commands]
    for index, command in enumerate(step.commands):
        left = deadline_s - (time.monotonic() - start)
        if left <= 0:
            return _failed(step, start, shown, f"its deadline of {deadline_s:.0f} s passed before `{shown[index]}`")
        ended = run_command(command, left, step.env, captures / f"{step.name}-{index}", log)
        if ended.returncode != 0:
            return _failed(step, start, shown, _why(ended, shown[index], deadline_s), ended)
    try:
        found = step.figures()
        rows = []
        for name in step.rows:
            figures = dict(found[name])
            status = "FAIL" if figures.pop("failed", False) else "ok"
            error = "its figures miss the check: " + ", ".join(f"{k} {v}" for k, v in figures.items())
            rows.append(_row(name, status, time.monotonic() - start if not rows else None, figures,
                             error if status == "FAIL" else None, shown))
        return rows
    except Exception as error:  # whatever the figures lack or hold: a FAIL row, and the next step runs
        _say(log, f"[node] {step.name}: reading the figures failed:\n{traceback.format_exc()}")
        return _failed(step, start, shown, f"no figures: {type(error).__name__}: {error}")


def run_command(command: Sequence[str], timeout_s: float, env: Mapping[str, str], capture: Path,
                log: TextIO) -> Ended:
    """Run ``command`` in a new session (its own process group) for at most ``timeout_s`` seconds, its
    stdout and stderr to ``capture``.stdout and .stderr; stop what is left of its group at its end, on
    its deadline or when this process is interrupted; append the command and its output to ``log``."""
    stdout_path, stderr_path = (capture.parent / f"{capture.name}.{stream}" for stream in ("stdout", "stderr"))
    _say(log, f"\n$ {_shown(command)}\n-- deadline {timeout_s:.0f} s")
    start = time.monotonic()
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                   env={**os.environ, **env}, start_new_session=True)
        returncode = None
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            left_over, unkillable = stop_group(process)
    seconds = time.monotonic() - start
    ending = (f"stopped at its deadline of {timeout_s:.0f} s" if returncode is None else f"exit {returncode}")
    log.write(f"-- {ending} after {seconds:.1f} s; {left_over} processes of its group stopped"
              + (f", {unkillable} of them would not die" if unkillable else "") + "\n")
    for label, path in (("stdout", stdout_path), ("stderr", stderr_path)):
        log.write(f"-- {label}:\n")
        with open(path, errors="replace") as text:
            shutil.copyfileobj(text, log)
    log.flush()
    return Ended(returncode, seconds, left_over, unkillable, _tail(stdout_path), _tail(stderr_path))


def stop_group(process: subprocess.Popen) -> Tuple[int, int]:
    """Stop what is left of the process group that ``process`` leads (SIGTERM, then SIGKILL after
    ``GRACE_S``) and reap ``process``; return (processes left, processes that outlived SIGKILL by
    ``GRACE_S``: stuck in the kernel, as in a hung GPU driver, and given up on)."""
    left = group_members(process.pid)
    if left:
        _signal_group(process.pid, signal.SIGTERM)
        end = time.monotonic() + GRACE_S
        while group_members(process.pid) and time.monotonic() < end:
            process.poll()  # reaps the leader once it has exited
            time.sleep(0.05)
        _signal_group(process.pid, signal.SIGKILL)
    end = time.monotonic() + GRACE_S
    while process.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    return len(left), len(group_members(process.pid))


def group_members(group: int) -> List[int]:
    """The living processes (zombies excluded) of process group ``group``, from Linux's /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, pgrp, ...
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == group and fields[0] not in "ZX":
            members.append(int(entry))
    return members


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


def gpu_problem(output: str) -> Optional[str]:
    """The fix, with the line that shows it, when ``output`` says the GPU is busy or gone; else None."""
    for needles, fix in GPU_PROBLEMS:
        for line in reversed(output.splitlines()):
            if any(needle in line for needle in needles):
                return f"{fix} ({line.strip()[:300]})"
    return None


def _why(ended: Ended, shown: str, deadline_s: float) -> str:
    """One line: why the command ``shown`` failed, naming the fix when the GPU is busy or gone."""
    gpu = gpu_problem(ended.stderr_tail + "\n" + ended.stdout_tail)
    if ended.returncode is None:
        stopped = (f"`{shown}` was stopped at the step's deadline of {deadline_s:.0f} s with the "
                   f"{ended.left_over} processes of its group")
        if ended.unkillable:
            stopped += (f" ({ended.unkillable} would not die: stuck in the kernel, as in a hung GPU driver; "
                        "nvidia-smi and dmesg may say more)")
        return f"{stopped}; {gpu}" if gpu else stopped
    if gpu:
        return gpu
    if ended.returncode < 0:
        return f"`{shown}` was killed by {signal.Signals(-ended.returncode).name}"
    last = _last_line(ended.stderr_tail) or _last_line(ended.stdout_tail) or "no output"
    return f"`{shown}` exited {ended.returncode}: {last}"


def _row(name: str, status: str, seconds: Optional[float], figures: Dict, error: Optional[str] = None,
         commands: Sequence[str] = ()) -> Dict:
    """A row of the table; its "figures" cell shows the figures, or the error when there are none."""
    text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
    row = {"step": name, "status": status, "seconds": seconds, "figures": text or error or "", "values": figures,
           "commands": list(commands)}
    if status != "ok":
        row["error"] = error
    return row


def _failed(step: Step, start: float, shown: Sequence[str], error: str, ended: Optional[Ended] = None) -> List[Dict]:
    """FAIL rows for every row of ``step``, the first with its time and the failed command's output tails."""
    rows = [_row(name, "FAIL", None, {}, error, shown) for name in step.rows]
    rows[0]["seconds"] = time.monotonic() - start
    if ended is not None:
        rows[0].update(stderr_tail=ended.stderr_tail, stdout_tail=ended.stdout_tail)
    return rows


def _tail(path: Path) -> str:
    with open(path, "rb") as stream:
        stream.seek(max(0, stream.seek(0, os.SEEK_END) - 16 * TAIL_CHARS))
        text = stream.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-TAIL_LINES:])[-TAIL_CHARS:]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _say(log: TextIO, text: str) -> None:
    log.write(text + "\n")
    log.flush()


def _shown(command: Sequence[str]) -> str:
    """``command`` as a reader would type it: "megdet ..." for our CLI, "python ..." for this Python."""
    command = list(command)
    if command[:3] == [sys.executable, "-m", "megdet.cli"]:
        command = ["megdet", *command[3:]]
    elif command[:1] == [sys.executable]:
        command = ["python", *command[1:]]
    return " ".join(command)


def gpu_state() -> str:
    """Each GPU's index, name, memory in use and utilisation from nvidia-smi, which (unlike naming it
    through torch) holds no CUDA context; or why nvidia-smi could not tell."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.used,memory.total,utilization.gpu",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi did not answer: {error}"
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return "; ".join(lines) if done.returncode == 0 and lines else f"nvidia-smi exit {done.returncode}"


def _megdet(*argv: str) -> Tuple[str, ...]:
    return (sys.executable, "-m", "megdet.cli", *argv)


def _doctor(scratch: Path, sizes: Dict) -> Step:
    ranks = torch.cuda.device_count() if sizes["device"] == "cuda" else 2
    command = (sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "megdet.cli", "doctor", f"--device={sizes['device']}")

    def figures():
        return {"doctor": {"ranks": ranks, "transport": "nccl" if sizes["device"] == "cuda" else "gloo"}}
    return Step("doctor", ("doctor",), (command,), sizes["deadlines_s"]["doctor"], figures, {"MEGDET_COMM": "torch"})


def _model(scratch: Path, sizes: Dict) -> Step:
    """The step beside torchvision (settings equal), the step as our presets build it, and the amp
    modes, from one ``megdet bench model`` run."""
    folder = scratch / "model"
    command = _megdet("bench", "model", f"--out={folder}", f"--device={sizes['device']}", f"--models={sizes['model']}",
                      f"--sizes={sizes['size']}", "--batch=2", f"--amp={sizes['amp']}", "--channels-last",
                      f"--repeats={sizes['repeats']}", "--settings=equal,defaults")

    def figures():
        result = json.loads((folder / "model.json").read_text())
        plain = {(row["settings"], row["amp"]): row for row in result["rows"] if row["sublinear"] == "-"}
        image = result["inputs"]["images"][str(sizes["size"])]
        equal, ours = plain[("equal", "bf16")], plain[("defaults", "bf16")]
        step = {"image": image, "amp": "bf16", "images_per_s": equal["images_per_s"], "peak_MiB": equal["peak_MiB"]}
        if equal.get("ours_vs_torchvision") is not None:
            step.update(torchvision_images_per_s=equal["torchvision_images_per_s"],
                        torchvision_peak_MiB=equal["torchvision_peak_MiB"],
                        ours_vs_torchvision=equal["ours_vs_torchvision"],
                        target=f">= {TARGET_VS_TORCHVISION} (goal 1.5)")
        else:
            reason = result["inputs"]["torchvision"]
            step["torchvision"] = f"not compared ({'not R50-FPN' if reason == 'compared' else reason})"
        step["settings"] = "torchvision's where ours differ (docs/benchmarks.md)"
        defaults = {"image": image, "amp": "bf16", "images_per_s": ours["images_per_s"], "peak_MiB": ours["peak_MiB"],
                    "vs_equal_settings": ours["images_per_s"] / equal["images_per_s"]}
        modes = {mode: row for (setting, mode), row in plain.items() if setting == "defaults"}
        amp_row = {"fp32_precision": modes["none"]["precision"], "fp32_images_per_s": modes["none"]["images_per_s"]}
        for mode in ("bf16", "fp16"):
            if mode in modes:
                amp_row[f"{mode}_images_per_s"] = modes[mode]["images_per_s"]
                amp_row[f"{mode}_vs_fp32"] = modes[mode]["images_per_s_vs_fp32"]
        if "fp16" in modes:
            amp_row["target"] = f"bf16 >= {TARGET_BF16_VS_FP32}x fp32"
        else:
            try:
                amp.resolve("fp16", torch.device(sizes["device"]))
                amp_row["fp16"] = "not run"
            except UserError as refusal:
                amp_row["fp16"] = f"refused as it should be ({refusal})"
        return {"step": step, "step-defaults": defaults, "amp": amp_row}
    return Step("model", ("step", "step-defaults", "amp"), (command,), sizes["deadlines_s"]["model"], figures)


def _cgbn(scratch: Path, sizes: Dict) -> Step:
    folder = scratch / "cgbn"
    command = _megdet("bench", "cgbn", f"--out={folder}", "--engines=torch", "--ranks=2", f"--device={sizes['cgbn_device']}",
                      f"--channels={sizes['cgbn_channels']}", f"--size={sizes['cgbn_size']}", "--images=2",
                      "--steps=5", "--warmup=2")

    def figures():
        row = next(r for r in json.loads((folder / "cgbn.json").read_text())["rows"] if r["variant"] == "CGBN")
        return {"cgbn": {"max_error": row["max_error"], "exact": row["exact"], "ms_per_step": row["ms_per_step"],
                         "ratio_to_local_bn": row["ratio_to_local_bn"], "failed": not row["exact"]}}
    # Two ranks on one GPU: NCCL refuses them, gloo moves CUDA tensors through the host.
    return Step("cgbn", ("cgbn",), (command,), sizes["deadlines_s"]["cgbn"], figures, {"MEGDET_TORCH_BACKEND": "gloo"})


def _train(scratch: Path, sizes: Dict) -> Step:
    data, run_folder = scratch / "data", scratch / "run"
    size, cpu = sizes["synth_size"], sizes["device"] == "cpu"
    overrides = [f"model.name={sizes['train_model']}", "model.bn_size=null", "model.anchor_sizes=null",
                 "model.fpn_channels=null", "model.box_head_dim=null", "model.roi_batch_size_per_image=null",
                 "model.rpn_pre_nms_topk=null", "model.rpn_post_nms_topk=null", "data.images_per_rank=2", "solver.batch_size=2",
                 f"data.min_sizes=[{sizes['size']}]", f"data.max_size={sizes['max_size']}",
                 f"data.test_min_size={sizes['size']}", "solver.max_iter=30", "solver.steps=[20,25]",
                 "solver.warmup_iters=5", f"train.device={sizes['device']}", f"train.amp={'none' if cpu else 'auto'}",
                 "train.checkpoint_period=30", "train.log_period=10", "eval.images_per_rank=2",
                 f"data.num_workers={0 if cpu else 'null'}", f"data.train={data}/shards/train",
                 f"data.val={data}/shards/val", f"train.output_dir={run_folder}"]
    commands = [_megdet("synth", f"--out={data}", f"--train={sizes['train_images']}", f"--val={sizes['val_images']}",
                        f"--size={size}")]
    for split in ("train", "val"):
        commands.append(_megdet("pack", f"--coco-json={data}/annotations/instances_{split}.json",
                                f"--images={data}/{split}", f"--out={data}/shards/{split}"))
    commands.append(_megdet("train", "shapes_r18_cpu", *overrides))

    def figures():
        metrics = json.loads((run_folder / "metrics.json").read_text())
        lines = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
        speed = [line["images_per_s"] for line in lines if "images_per_s" in line]
        return {"train": {"iterations": 30, "images_per_s": speed[-1], "AP": metrics["AP"], "AP50": metrics["AP50"]}}
    return Step("train", ("train",), tuple(commands), sizes["deadlines_s"]["train"], figures)


STEPS: Dict[str, Callable[[Path, Dict], Step]] = {"doctor": _doctor, "model": _model, "cgbn": _cgbn, "train": _train}
