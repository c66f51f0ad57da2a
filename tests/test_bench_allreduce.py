"""``megdet bench allreduce``: size parsing and nccl-tests bandwidth arithmetic, one tiny run of all
three variants on 2 real ranks, and one-line errors for bad input (alone and under horovodrun)."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from hpc.errors import UserError
from megdet.bench import allreduce
from tests.multirank import MEGDET, REPO, skip_unless_launcher

BENCH = [*MEGDET, "bench", "allreduce"]


def test_parse_size_reads_binary_suffixes_and_rejects_the_rest():
    assert allreduce.parse_size("4096") == 4096
    assert allreduce.parse_size("4K") == allreduce.parse_size("4KiB") == allreduce.parse_size("4k") == 4 * 1024
    assert allreduce.parse_size("256M") == 256 * 2**20
    assert allreduce.parse_size("64G", "--max-bytes") == 64 * 2**30
    with pytest.raises(UserError, match=r"Invalid --min-bytes: '4Q'; use bytes with an optional K, M or G"):
        allreduce.parse_size("4Q")
    with pytest.raises(UserError, match=r"Invalid --max-bytes: '6' = 6 bytes; use a positive multiple of 4"):
        allreduce.parse_size("6", "--max-bytes")
    with pytest.raises(UserError, match="Invalid --min-bytes: '0'"):
        allreduce.parse_size("0")


def test_sizes_step_by_the_factor_and_end_at_the_maximum():
    assert allreduce.sizes(4096, 65536, 4) == [4096, 16384, 65536]
    assert allreduce.sizes(4096, 16384, 2) == [4096, 8192, 16384]
    assert allreduce.sizes(4096, 40000, 4) == [4096, 16384, 40000]
    assert allreduce.sizes(4096, 4096, 4) == [4096]
    assert [allreduce.format_size(n) for n in (4096, 256 * 2**20, 40000, 6 * 2**30)] == \
        ["4 KiB", "256 MiB", "40000 B", "6 GiB"]


def test_bandwidths_follow_nccl_tests():
    # 1 GB in 0.5 s: algbw 2 GB/s; busbw = algbw * 2 (n - 1) / n
    assert allreduce.bandwidths(10**9, 0.5, 2) == pytest.approx((2.0, 2.0))
    assert allreduce.bandwidths(10**9, 0.5, 4) == pytest.approx((2.0, 3.0))
    assert allreduce.bandwidths(10**9, 0.5, 8) == pytest.approx((2.0, 3.5))
    assert allreduce.bandwidths(2**20, 1e-3, 16)[0] == pytest.approx(1.048576)


def test_summary_gives_ratios_to_torch_at_the_largest_size_and_latency_at_the_smallest():
    rows = [{"engine": e, "fusion": f, "tensors": t, "bytes": b, "time_us": b / 1e3 * (2 if e == "horovod" else 1),
             "busbw_GBps": (1.0 if e == "horovod" else 2.0) * t}
            for e, f in (("horovod", "on"), ("torch", "n/a")) for t in (1, 32) for b in (4096, 65536)]
    lines = allreduce.summary(rows).splitlines()
    assert lines[0] == "| engine | fusion | tensors | busbw_GBps at 64 KiB | x torch | time_us at 4 KiB |"
    assert lines[2:] == ["| horovod | on | 1 | 1 | 0.5 | 8.192 |", "| horovod | on | 32 | 32 | 0.5 | 8.192 |",
                         "| torch | n/a | 1 | 2 | 1 | 4.096 |", "| torch | n/a | 32 | 64 | 1 | 4.096 |"]


def test_a_wrong_sum_is_reported_with_its_element():
    import torch

    assert allreduce._wrong_sum(torch.full((8,), 3.0), 3.0, 32, 1, "horovod") is None
    wrong = torch.full((8,), 3.0)
    wrong[5] = 2.0
    assert allreduce._wrong_sum(wrong, 3.0, 32, 4, "torch") == (
        "allreduce of 32 B in 4 tensor(s) on torch gave 2.0 at element 5, expected 3.0: the collective is broken, "
        "no results written")


@pytest.mark.multirank
def test_benchmark_runs_once_at_a_tiny_size_on_every_variant(tmp_path):
    """Without a launcher it starts horovodrun (fusion on, then off) and torchrun, and merges the rows."""
    skip_unless_launcher("horovodrun")
    done = subprocess.run([*BENCH, "--ranks", "2", "--min-bytes", "4K", "--max-bytes", "64K", "--iters", "2",
                           "--warmup", "1", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "allreduce.json").read_text())["rows"]
    variants = [("horovod", "on"), ("horovod", "off"), ("torch", "n/a")]
    assert sorted((r["engine"], r["fusion"], r["tensors"], r["bytes"]) for r in rows) == sorted(
        (e, f, t, b) for e, f in variants for t in (1, 32) for b in (4096, 16384, 65536))
    for row in rows:
        n = row["ranks"]
        assert n == 2 and row["time_us"] > 0 and row["busbw_GBps"] > 0
        assert row["algbw_GBps"] == pytest.approx(row["bytes"] / (row["time_us"] * 1e-6) / 1e9)
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] * 2 * (n - 1) / n)
    assert "| horovod | off | 32 | 2 | 64 KiB | 65536 |" in (tmp_path / "allreduce.md").read_text()
    assert "busbw_GBps at 64 KiB | x torch | time_us at 4 KiB" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["--min-bytes", "4Q"], r"Invalid --min-bytes: '4Q'; use bytes with an optional K, M or G suffix"),
    (["--min-bytes", "1M", "--max-bytes", "64K"], r"Invalid --min-bytes: 1M is more than --max-bytes 64K; lower"),
    (["--max-bytes", "64T"],
     r"--max-bytes 64T needs about [\d.]+ GiB on this host \([\d.]+ GiB free\): lower --max-bytes"),
    (["--ranks", "1"], r"Invalid --ranks: 1; an allreduce needs at least 2 ranks"),
])
def test_bad_input_is_one_line_naming_the_value(tmp_path, argv, message):
    done = subprocess.run([*BENCH, *argv, "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and re.search(message, done.stderr), done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.multirank
def test_rank_count_that_the_launcher_did_not_start_fails_on_every_rank(tmp_path):
    skip_unless_launcher("horovodrun")
    done = subprocess.run(["horovodrun", "--gloo", "-np", "2", "-H", "localhost:2", *BENCH, "--ranks", "3",
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    # horovodrun prefixes each rank's lines with "[rank]<stderr>:", prints its own traceback after them,
    # and kills the other ranks once one exits ("Terminated"): the first rank's line is certain, the
    # other's usual.
    ranks_lines = [line for line in done.stderr.splitlines() if line.startswith(("[0]", "[1]"))]
    errors = [line for line in ranks_lines if "megdet bench: error" in line]
    assert errors and not any("Traceback" in line for line in ranks_lines), done.stderr
    for line in errors:
        rank = line[1]
        assert line == (f"[{rank}]<stderr>:megdet bench: error (rank {rank}/2): Invalid --ranks: 3, but horovodrun "
                        "started 2 ranks; drop --ranks or launch 3 ranks"), done.stderr
    assert not (tmp_path / "out").exists()
