"""Error and warning lines reach a launcher's pipe whole: several ranks writing at once to one unbuffered
stderr (PYTHONUNBUFFERED, as job scripts set) never merge two lines into one."""
import os
import subprocess
import sys

from tests.multirank import REPO

WRITERS = 4
LINES = 300
# Each writer reports LINES error lines as fast as it can, all at once, into the same pipe.
WRITER = """
import sys
from hpc import errors
errors.program = "megdet test"
sys.stdin.read(1)
for n in range(%d):
    errors.report("rank " + sys.argv[1] + " line " + str(n) + " " + "x" * 200)
""" % LINES


def test_concurrent_unbuffered_error_lines_stay_whole(launch_env):
    read, write = os.pipe()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(rank)], cwd=REPO, stdin=subprocess.PIPE,
                                stderr=write, env=launch_env({"PYTHONUNBUFFERED": "1"})) for rank in range(WRITERS)]
    os.close(write)
    for writer in writers:
        writer.stdin.write(b"go")
        writer.stdin.flush()
    with open(read, "rb") as pipe:
        lines = pipe.read().decode().splitlines()
    assert all(writer.wait(timeout=60) == 0 for writer in writers)
    assert len(lines) == WRITERS * LINES
    expected = {f"megdet test: error: rank {r} line {n} " + "x" * 200 for r in range(WRITERS) for n in range(LINES)}
    assert set(lines) == expected, [line for line in lines if line not in expected][:3]


def test_a_line_without_a_descriptor_is_written_whole(capsys):
    from hpc import errors

    errors.write_line("one line")
    assert capsys.readouterr().err == "one line\n"
