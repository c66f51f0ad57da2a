"""The two ways ``megdet`` ends on an error. What a user typed, packed or launched is a ``UserError``: one
line, no traceback, exit 2. Anything else is a bug in our code: its traceback, one line naming the rank
that hit it, exit 1, and in a multi-rank run the other ranks ended in seconds with a line naming that
rank. The bug is a real exception inside a real ``megdet train`` (a step that raises on one rank), not a
mocked command line."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time

import pytest

from tests.multirank import MEGDET, REPO, base_env, free_port
from tests.test_rank_faults import TINY

BUG = "injected: a tensor contract broken on purpose"
ENDED_WITHIN_S = 60  # from the bug to the end of every rank; the engine's timeout here is 600 s


def bug_runner(tmp_path, rank: str, hook: str = "raise") -> str:
    """A ``megdet`` entry point whose ``Trainer.step`` breaks at its second call on rank ``rank``, after
    writing the time into ``tmp_path/bug_at``: ``hook`` "raise" raises ValueError(BUG) there; "shape"
    hands the detector one-channel images, which its own contract check turns into a ValueError."""
    script = tmp_path / "megdet_with_a_bug.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        from megdet import cli
        from megdet.engine import train

        if os.environ.get("RANK", "0") == {rank!r}:
            original, calls = train.Trainer.step, []

            def step(self, iteration, batches, *args, **kwargs):
                calls.append(1)
                if len(calls) == 2:
                    with open({str(tmp_path / "bug_at")!r}, "w") as stamp:
                        stamp.write(repr(time.time()))
                    if {hook!r} == "raise":
                        raise ValueError({BUG!r})
                    batches = [([image[:1] for image in images], targets) for images, targets in batches]
                return original(self, iteration, batches, *args, **kwargs)

            train.Trainer.step = step
        sys.exit(cli.main(sys.argv[1:]))
    """))
    return str(script)


def launch_two(argvs, tmp_path):
    """Run ``argvs[r]`` as rank r of a 2-rank torch.distributed launch; (returncode, stderr) per rank."""
    env = base_env({"MEGDET_COMM": "torch", "MEGDET_COMM_TIMEOUT": "600", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, argv in enumerate(argvs)]
    return [(proc.returncode, err) for proc, (_, err) in ((p, p.communicate(timeout=300)) for p in procs)]


def test_a_user_error_is_one_line_without_a_traceback(tmp_path):
    done = subprocess.run([*MEGDET, "train", "shapes_r18_cpu", "solver.max_iter=-1"], capture_output=True,
                          text=True, env=base_env(None), cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["megdet train: error: solver.max_iter=-1 must be positive"]


def test_a_bug_keeps_its_traceback_and_is_named_as_a_bug(tmp_path, shapes_shards):
    argv = [sys.executable, bug_runner(tmp_path, "0"), "train", "shapes_r18_cpu", *TINY, "solver.batch_size=1",
            "model.norm=bn", "model.bn_size=null", f"data.train={shapes_shards / 'train'}",
            f"train.output_dir={tmp_path / 'run'}"]
    done = subprocess.run(argv, capture_output=True, text=True, env=base_env(None), cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback (most recent call last):" in lines, done.stderr[-3000:]
    assert any(line.startswith('  File "') and "megdet_with_a_bug.py" in line for line in lines)
    assert lines[-1].startswith(f"megdet train: bug: ValueError: {BUG}: a bug in megdet, not in your input"), lines[-1]


def test_a_broken_tensor_contract_shows_the_detectors_check_in_its_traceback(tmp_path, shapes_shards):
    """One-channel images reach the detector: its contract check raises ValueError, and the traceback
    ends in that check (megdet/model/detector.py), not in a one-line user error."""
    argv = [sys.executable, bug_runner(tmp_path, "0", hook="shape"), "train", "shapes_r18_cpu", *TINY,
            "solver.batch_size=1", "model.norm=bn", "model.bn_size=null", f"data.train={shapes_shards / 'train'}",
            f"train.output_dir={tmp_path / 'run'}"]
    done = subprocess.run(argv, capture_output=True, text=True, env=base_env(None), cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    frames = [line for line in lines if line.startswith('  File "')]
    assert "Traceback (most recent call last):" in lines and frames[-1].startswith(
        f'  File "{REPO / "megdet" / "model" / "detector.py"}"'), done.stderr[-3000:]
    assert re.match(r"megdet train: bug: ValueError: image 0 has shape \(1, \d+, \d+\); each image must be a "
                    r"Tensor\[3, H, W\] \(RGB\): a bug in megdet, not in your input", lines[-1]), lines[-1]


@pytest.mark.multirank
@pytest.mark.slow
def test_a_user_error_on_one_rank_is_one_line_on_every_rank(tmp_path, shapes_shards):
    """Rank 1 cannot read its shards (a folder missing on its node): both ranks stop at the same point with
    the same line naming rank 1, and no traceback."""
    argv = [*MEGDET, "train", "shapes_r18_cpu", *TINY, f"train.output_dir={tmp_path / 'run'}"]
    missing = tmp_path / "not_on_this_node"
    (status0, err0), (status1, err1) = launch_two([[*argv, f"data.train={shapes_shards / 'train'}"],
                                                   [*argv, f"data.train={missing}"]], tmp_path)
    for rank, status, err in ((0, status0, err0), (1, status1, err1)):
        assert status == 2, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("megdet train: error")]
        assert len(errors) == 1 and errors[0].startswith(f"megdet train: error (rank {rank}/2): rank 1: ") \
            and str(missing) in errors[0], err[-3000:]


@pytest.mark.multirank
@pytest.mark.slow
def test_a_bug_on_one_rank_ends_every_rank_naming_it(tmp_path, shapes_shards):
    argv = [sys.executable, bug_runner(tmp_path, "1"), "train", "shapes_r18_cpu", *TINY,
            f"data.train={shapes_shards / 'train'}", f"train.output_dir={tmp_path / 'run'}"]
    (status0, err0), (status1, err1) = launch_two([argv, argv], tmp_path)
    ended_s = time.time() - float((tmp_path / "bug_at").read_text())
    assert status1 == 1, err1[-3000:]
    assert "Traceback (most recent call last):" in err1
    assert f"megdet train: bug (rank 1/2): ValueError: {BUG}" in err1
    assert status0 == 2, err0[-3000:]
    assert "Traceback" not in err0, "the rank without the bug has nothing to trace"
    assert f"megdet train: error (rank 0/2): rank 1 stopped on a bug (ValueError: {BUG})" in err0, err0[-3000:]
    assert ended_s < ENDED_WITHIN_S and "MEGDET_COMM_TIMEOUT" not in err0, "ended by the watchdog, not by a timeout"
