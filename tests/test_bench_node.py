"""``megdet bench node`` always reports: its runner (``megdet.bench.node.run_steps``) on tiny real
commands: a hung step is stopped with its whole process group at its deadline, node.json is there after
every step, a failed step keeps its output's last lines and the next step runs, the budget cuts the last
steps, a busy or missing GPU is one line naming the fix; and the comparison with torchvision runs with
equal settings (``megdet.bench.model``)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from megdet.bench import model as bench_model
from megdet.bench import node
from megdet.bench.node import Step

PYTHON = sys.executable
# Starts a child that ignores SIGTERM (only SIGKILL ends it), names it, writes to both streams, then hangs.
HANG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
open(sys.argv[1], "w").write(str(child.pid))
print("hang says on stdout", flush=True)
print("hang says on stderr", file=sys.stderr, flush=True)
time.sleep(300)
"""
# What the previous steps left in node.json, to a file.
READ_REPORT = """
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
json.dump([[row["step"], row["status"]] for row in rows], open(sys.argv[2], "w"))
"""

# A check of a hanging step and one more, in a process of its own that the test stops with SIGTERM.
CHECK = """
import sys
from pathlib import Path
from megdet.bench import node
node.GRACE_S = 1.0
tmp = Path(sys.argv[1])
steps = [node.Step("hang", ("hang",), ((sys.executable, "-c", sys.argv[2], str(tmp / "child.pid")),), 120.0, dict),
         node.Step("next", ("next",), ((sys.executable, "-c", "pass"),), 30.0, dict)]
node.run_steps(steps, tmp / "out", tmp / "scratch", 300.0, {}, {"device": "cpu"})
"""


def python(code: str, *argv) -> tuple:
    return (PYTHON, "-c", code, *map(str, argv))


def run_steps(steps, tmp_path, budget_s=120.0):
    out = tmp_path / "out"
    rows = node.run_steps(steps, out, tmp_path / "scratch", budget_s, inputs={"test": True},
                          machine_info={"device": "cpu"})
    return out, rows


def living(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def test_a_hung_step_is_stopped_with_its_process_group_and_the_next_step_reads_the_report(tmp_path, monkeypatch):
    monkeypatch.setattr(node, "GRACE_S", 1.0)
    pid_file, seen = tmp_path / "child.pid", tmp_path / "seen.json"
    steps = [Step("hang", ("hang",), (python(HANG, pid_file),), 4.0, lambda: {"hang": {}}),
             Step("after", ("after",), (python(READ_REPORT, tmp_path / "out" / "node.json", seen),), 30.0,
                  lambda: {"after": {"rows_seen": len(json.loads(seen.read_text()))}})]
    start = time.monotonic()
    out, rows = run_steps(steps, tmp_path)

    assert time.monotonic() - start < 30
    hang, after = rows
    assert hang["status"] == "FAIL" and "stopped at the step's deadline of 4 s with the 2 processes" in hang["error"]
    assert "hang says on stderr" in hang["stderr_tail"] and "hang says on stdout" in hang["stdout_tail"]
    child = int(pid_file.read_text())
    assert not living(child), "the child that ignored SIGTERM outlived its step"
    # the second step ran and found the first step's row already written
    assert after["status"] == "ok" and after["values"] == {"rows_seen": 1}, after
    report = json.loads((out / "node.json").read_text())
    assert [row["step"] for row in report["rows"]] == ["hang", "after"] and report["state"]["running"] is None
    assert "| hang | FAIL |" in (out / "node.md").read_text()
    log = (out / "node.log").read_text()
    assert "hang says on stderr" in log and "$ python -c" in log
    assert sorted(path.name for path in out.iterdir()) == ["node.json", "node.log", "node.md"]


def test_a_check_stopped_by_sigterm_stops_the_step_and_reports(launch_env, tmp_path):
    check = subprocess.Popen([PYTHON, "-c", CHECK, str(tmp_path), HANG], env=launch_env({}),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "child.pid"
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    check.send_signal(signal.SIGTERM)
    stdout, stderr = check.communicate(timeout=60)
    assert check.returncode == 0, stderr
    rows = json.loads((tmp_path / "out" / "node.json").read_text())["rows"]
    assert [(row["step"], row["status"]) for row in rows] == [("hang", "FAIL"), ("next", "not run")]
    assert rows[0]["error"] == "stopped by SIGTERM; its processes were stopped"
    assert rows[1]["figures"] == "the check was stopped by SIGTERM"
    assert not living(int(pid_file.read_text())), "the step's child outlived the check"


def test_the_budget_cuts_the_last_steps(tmp_path):
    steps = [Step("slow", ("slow",), (python("import time; time.sleep(60)"),), 30.0, lambda: {"slow": {}}),
             Step("late", ("late",), (python("pass"),), 30.0, lambda: {"late": {}})]
    start = time.monotonic()
    out, (slow, late) = run_steps(steps, tmp_path, budget_s=2.0)
    assert time.monotonic() - start < 15
    assert slow["status"] == "FAIL" and "deadline of 2 s" in slow["error"], "its deadline is what the budget left"
    assert late["status"] == "not run" and late["figures"] == "no time left of the 2 s budget"
    assert [row["status"] for row in json.loads((out / "node.json").read_text())["rows"]] == ["FAIL", "not run"]


def test_a_failed_command_or_figures_is_a_fail_row_and_the_next_step_runs(tmp_path):
    never = tmp_path / "never"
    fails = (python("import sys; print('before boom'); sys.exit('boom: the reason')"),
             python(f"open({str(never)!r}, 'w')"))
    steps = [Step("fails", ("fails",), fails, 30.0, lambda: {"fails": {}}),
             Step("no-figures", ("no-figures",), (python("pass"),), 30.0, lambda: {"x": 1 / 0}),
             Step("missing", ("missing", "other"), (python("pass"),), 30.0, lambda: {"missing": {}}),
             Step("inexact", ("inexact",), (python("pass"),), 30.0,
                  lambda: {"inexact": {"max_error": 0.5, "failed": True}}),
             Step("fine", ("fine",), (python("pass"),), 30.0, lambda: {"fine": {"images_per_s": 12.5}})]
    out, rows = run_steps(steps, tmp_path)
    by_name = {row["step"]: row for row in rows}
    assert list(by_name) == ["fails", "no-figures", "missing", "other", "inexact", "fine"]

    failed = by_name["fails"]
    assert failed["status"] == "FAIL" and failed["error"].endswith("exited 1: boom: the reason"), failed
    assert "boom: the reason" in failed["stderr_tail"] and "before boom" in failed["stdout_tail"]
    assert not never.exists(), "the step's later command ran after one failed"
    assert by_name["no-figures"]["error"] == "no figures: ZeroDivisionError: division by zero"
    assert "ZeroDivisionError" in (out / "node.log").read_text(), "the traceback is in the log"
    assert by_name["missing"]["status"] == by_name["other"]["status"] == "FAIL"
    assert by_name["missing"]["error"] == "no figures: KeyError: 'other'"
    assert by_name["inexact"]["status"] == "FAIL" and by_name["inexact"]["figures"] == "max_error 0.5"
    assert by_name["fine"]["status"] == "ok" and by_name["fine"]["figures"] == "images_per_s 12.5"


@pytest.mark.parametrize("message, fix", [
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
     "139.80 GiB of which 1.06 GiB is free. Process 4242 has 138.70 GiB memory in use.", "the GPU ran out of memory"),
    ("torch.AcceleratorError: CUDA error: CUDA-capable device(s) is/are busy or unavailable",
     "the GPU is busy or unavailable"),
    ("RuntimeError: No CUDA GPUs are available", "torch sees no GPU any more"),
])
def test_a_busy_or_missing_gpu_is_one_line_naming_the_fix(tmp_path, capsys, message, fix):
    failing = python(f"import sys; print('Traceback (most recent call last):\\n  ...', file=sys.stderr); "
                     f"sys.exit({message!r})")
    steps = [Step("first", ("first",), (python("pass"),), 30.0, lambda: {"first": {"ok": True}}),
             Step("gpu", ("gpu",), (failing,), 30.0, lambda: {"gpu": {}}),
             Step("next", ("next",), (python("pass"),), 30.0, lambda: {"next": {}})]
    out, rows = run_steps(steps, tmp_path)
    assert [row["status"] for row in rows] == ["ok", "FAIL", "ok"]
    assert rows[1]["error"].startswith(fix) and message in rows[1]["error"] and "nvidia-smi" in rows[1]["error"]
    errors = capsys.readouterr().err.splitlines()
    assert errors == [f"megdet bench node: gpu: {rows[1]['error']}"]
    assert [row["step"] for row in json.loads((out / "node.json").read_text())["rows"]] == ["first", "gpu", "next"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_node_without_a_gpu_writes_node_json_and_names_the_fix(tmp_path, capsys):
    from megdet.cli import main

    assert main(["bench", "node", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("torch sees no GPU: run it on one, or pass --cpu")
    rows = json.loads((tmp_path / "node.json").read_text())["rows"]
    assert [(row["step"], row["status"]) for row in rows] == [("gpu", "FAIL")]
    assert "| gpu | FAIL |" in (tmp_path / "node.md").read_text()


def test_the_fp32_row_says_what_its_convolutions_and_matmuls_ran_in():
    cuda = torch.device("cuda")  # the label reads flags only: no GPU needed
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("highest")
        assert bench_model.precision("none", cuda) == "fp32 (TF32 convolutions, fp32 matmuls)"
        assert bench_model.precision("none", torch.device("cpu")) == "fp32"
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("high")
        assert bench_model.precision("none", cuda) == "fp32 (fp32 convolutions, TF32 matmuls)"
    finally:
        torch.backends.cudnn.allow_tf32 = conv
        torch.set_float32_matmul_precision(matmul)
    assert bench_model.precision("bf16", cuda) == "bf16 autocast"
    assert bench_model.image_shape(800) == (800, 1333)


def test_torchvision_is_set_as_ours_where_the_models_allow():
    unavailable = bench_model.torchvision_unavailable(torch.device("cpu"))
    if unavailable:  # the node's twin runs it: its torchvision's compiled ops load on the CPU
        pytest.skip(unavailable)
    import torchvision
    from megdet.model import build_detector
    from megdet.model.settings import PRESETS

    settings = dict(PRESETS["resnet50_fpn"], **bench_model.EQUAL_TO_TORCHVISION)
    theirs = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=81,
        **bench_model.torchvision_arguments(settings, 800))
    ours = build_detector("resnet50_fpn", num_classes=80, norm="bn", freeze_at=0, **bench_model.EQUAL_TO_TORCHVISION)
    assert (theirs.transform.min_size, theirs.transform.max_size) == ((800,), 1333)
    for mode, training in (("training", True), ("testing", False)):
        assert theirs.rpn._pre_nms_top_n[mode] == ours.rpn.pre_nms_topk[training]
        assert theirs.rpn._post_nms_top_n[mode] == ours.rpn.post_nms_topk[training]
    assert theirs.rpn._post_nms_top_n["training"] == 1000
    assert theirs.rpn.nms_thresh == ours.rpn.nms_threshold
    assert (theirs.rpn.proposal_matcher.low_threshold, theirs.rpn.proposal_matcher.high_threshold) == \
        (ours.rpn.matcher.low_threshold, ours.rpn.matcher.high_threshold)
    assert (theirs.rpn.fg_bg_sampler.batch_size_per_image, theirs.rpn.fg_bg_sampler.positive_fraction) == \
        (ours.rpn.batch_size_per_image, ours.rpn.positive_fraction)
    assert (theirs.roi_heads.fg_bg_sampler.batch_size_per_image, theirs.roi_heads.fg_bg_sampler.positive_fraction) == \
        (ours.roi_heads.batch_size_per_image, ours.roi_heads.positive_fraction) == (512, 0.25)
    assert theirs.roi_heads.box_roi_pool.sampling_ratio == ours.roi_heads.pooler.sampling_ratio == 2
    assert not ours.roi_heads.pooler.aligned  # torchvision's pooler is the unaligned RoIAlign
    assert theirs.roi_heads.box_head.fc6.in_features == ours.roi_heads.box_head.fc1.in_features
    assert sum(p.numel() for p in theirs.backbone.body.parameters()) == sum(p.numel() for p in ours.backbone.parameters())


@pytest.mark.slow
@pytest.mark.multirank
def test_bench_node_keeps_its_scratch_folder_when_asked(tmp_path, capsys):
    from megdet.cli import main

    out, scratch = tmp_path / "out", tmp_path / "scratch"
    assert main(["bench", "node", "--cpu", "--steps", "doctor", "--out", str(out), "--scratch", str(scratch),
                 "--keep-scratch"]) == 0
    assert "megdet bench node: 1 of 1 checks passed" in capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == ["node.json", "node.log", "node.md"]
    (kept,) = scratch.iterdir()
    assert json.loads((out / "node.json").read_text())["inputs"]["scratch"] == str(kept)
    assert "allreduce over the world" in (kept / "logs" / "doctor-0.stdout").read_text()
