"""The two ways ``megdet`` ends on an error. What a user typed, packed or launched is a ``UserError``: one
line, no traceback, exit 2. Anything else is a bug in our code: its traceback, one line naming the rank
that hit it, exit 1, and in a multi-rank run the other ranks ended in seconds with a line naming that
rank. The bug is a real exception inside a real ``megdet train`` (a step that raises on one rank), not a
mocked command line."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from tests.multirank import MEGDET, base_env, free_port
from tests.test_rank_faults import TINY

BUG = "injected: a tensor contract broken on purpose"
ENDED_WITHIN_S = 60


def bug_runner(tmp_path, rank: str) -> str:
    """A ``megdet`` entry point whose ``Trainer.step`` raises ValueError at its second call on rank ``rank``."""
    script = tmp_path / "megdet_with_a_bug.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from megdet import cli
        from megdet.engine import train

        if os.environ.get("RANK", "0") == {rank!r}:
            original, calls = train.Trainer.step, []

            def step(self, *args, **kwargs):
                calls.append(1)
                if len(calls) == 2:
                    raise ValueError({BUG!r})
                return original(self, *args, **kwargs)

            train.Trainer.step = step
        sys.exit(cli.main(sys.argv[1:]))
    """))
    return str(script)


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


@pytest.mark.multirank
@pytest.mark.slow
def test_a_bug_on_one_rank_ends_every_rank_naming_it(tmp_path, shapes_shards):
    argv = [sys.executable, bug_runner(tmp_path, "1"), "train", "shapes_r18_cpu", *TINY,
            f"data.train={shapes_shards / 'train'}", f"train.output_dir={tmp_path / 'run'}"]
    port = str(free_port())
    env = base_env({"MEGDET_COMM": "torch", "MEGDET_COMM_TIMEOUT": "600", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    started = time.monotonic()
    outputs = [proc.communicate(timeout=300) for proc in procs]
    ended_s = time.monotonic() - started
    (_, err0), (_, err1) = outputs
    assert procs[1].returncode == 1, err1[-3000:]
    assert "Traceback (most recent call last):" in err1
    assert f"megdet train: bug (rank 1/2): ValueError: {BUG}" in err1
    assert procs[0].returncode == 2, err0[-3000:]
    assert "Traceback" not in err0, "the rank without the bug has nothing to trace"
    assert f"megdet train: error (rank 0/2): rank 1 stopped on a bug (ValueError: {BUG})" in err0, err0[-3000:]
    assert ended_s < 300 and "MEGDET_COMM_TIMEOUT" not in err0, "ended by the watchdog, not by a timeout"
