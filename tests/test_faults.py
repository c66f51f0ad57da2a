"""Faults at scale in the data and checkpoint layers, on real files and real processes: two packers on
one folder, a full disk under ``megdet pack`` and under a checkpoint, a checkpoint torn by SIGKILL or
corrupted on disk, old checkpoints pruned, a corrupt record in a shard. docs/reliability.md lists what
each leaves on disk.

The full-disk tests mount a 2 MiB tmpfs (they run as root here) and skip with the reason when mounting
is not permitted.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import h5py
import numpy as np
import pytest
import torch.utils.data

from hpc import checkpoint
from hpc.errors import UserError
from hpc.shards import CorruptRecordError, ShardDataset
from hpc.shards.manifest import MANIFEST_NAME, read_manifest
from hpc.shards.writer import LOCK_NAME, pack_lock
from tests.multirank import REPO, launch_command, mpirun_skip_reason
from tests.test_pack import MEGDET, SUBPROCESS_TIMEOUT_S, assert_round_trip, pack, rank_errors, subset
from tests.test_shards import flip_byte

SMALL_DISK = "2m"  # tmpfs size: a few real images fill it


@contextlib.contextmanager
def small_disk(folder: Path, size: str = SMALL_DISK) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` for the block (skips the test if mounting is refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: the full-disk tests mount a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({mounted.stderr.strip() or 'mount failed'}): "
                    "run the tests as root, or where mount is permitted")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def start_megdet(launch_env):
    """``start_megdet(argv)``: ``megdet ARGV`` started in its own session, output piped."""
    def start_megdet(argv: List[str]) -> subprocess.Popen:
        return subprocess.Popen(MEGDET + argv, cwd=REPO, env=launch_env(None), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    return start_megdet


def wait_for(condition, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not condition():
        assert proc.poll() is None, f"the process ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def text_or_empty(path: Path) -> str:
    """The file's text, or "" while it does not exist (it may vanish between two looks)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def largest_size(pattern: str) -> int:
    """Bytes of the largest file matching ``pattern`` (0 if none)."""
    sizes = [0]
    for name in glob.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            sizes.append(os.path.getsize(name))
    return max(sizes)


def listing(folder: Path) -> dict:
    """{name: (size, mtime_ns)} of every file in ``folder``."""
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


# ---- 1. two packers on one folder ----

def test_a_second_packer_on_the_same_folder_stops_at_once_and_the_first_finishes(launch_env, start_megdet, tmp_path):
    ann, images, coco = subset(tmp_path, "voc100", count=30)
    out = tmp_path / "shards"
    argv = ["pack", "--coco-json", str(ann), "--images", str(images), "--out", str(out), "--shards", "3"]
    first = start_megdet(argv)
    try:
        # stop the first packer while it holds the lock: the second meets it for sure
        wait_for(lambda: f"pid {first.pid} " in text_or_empty(out / LOCK_NAME), "the first packer took the lock", first)
        os.kill(first.pid, signal.SIGSTOP)
        before = listing(out)
        started = time.monotonic()
        second = subprocess.run(MEGDET + argv, cwd=REPO, env=launch_env(None), capture_output=True, text=True,
                                timeout=SUBPROCESS_TIMEOUT_S)
        refused_in = time.monotonic() - started
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and second.stderr.startswith("megdet pack: error: "), second.stderr
        assert f"{out} is being packed by another megdet pack (pid {first.pid} on " in second.stderr
        assert "wait for it to finish, or choose another --out" in second.stderr
        assert listing(out) == before, "the refused packer changed the folder"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert first.returncode == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME] + sorted(
        f"shard-0000{i}-of-00003.h5{ext}" for i in range(3) for ext in ("", ".json")), "lock or partial left"
    assert_round_trip(ShardDataset(str(out), verify_checksums=True), coco, images)
    print(f"second packer refused in {refused_in:.2f} s (process start included)")

    # a lock file left by a killed packer locks nothing: the next run resumes
    (out / LOCK_NAME).write_text("pid 1 on a node that died")
    pack(*argv[1:])
    assert not (out / LOCK_NAME).exists()


@pytest.mark.multirank
def test_mpirun_pack_on_a_locked_folder_stops_every_rank_before_any_writes(launch_env, tmp_path):
    if mpirun_skip_reason():
        pytest.skip(mpirun_skip_reason())
    ann, images, _ = subset(tmp_path, "voc100", count=8)
    out = tmp_path / "shards"
    argv = ["pack", "--coco-json", str(ann), "--images", str(images), "--out", str(out), "--shards", "2"]
    out.mkdir()
    with pack_lock(out):  # this test process is the other job
        refused = subprocess.run(launch_command("mpirun", 2, MEGDET + argv), cwd=REPO, env=launch_env(None),
                                 capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
        errors = rank_errors(refused)
        assert refused.returncode != 0 and sorted(errors) == [0, 1], refused.stderr
        assert all(f"pid {os.getpid()} on" in line and "is being packed" in line for line in errors.values())
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME], "a rank wrote into a locked folder"
    # the same job, once the folder is free: rank 0 holds the lock and rank 1 packs beside it
    packed = subprocess.run(launch_command("mpirun", 2, MEGDET + argv), cwd=REPO, env=launch_env(None),
                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert packed.returncode == 0 and "[rank 1/2] packed" in packed.stdout, packed.stderr
    assert read_manifest(out)["num_images"] == 8 and not (out / LOCK_NAME).exists()


# ---- 2. a full disk ----

def test_pack_onto_a_full_disk_fails_in_one_line_and_leaves_only_complete_shards(launch_env, tmp_path):
    ann, images, coco = subset(tmp_path, "voc100", count=30)  # 2.5 MiB of JPEGs: shard 0 fits, shard 1 does not
    with small_disk(tmp_path / "disk") as disk:
        out = disk / "shards"
        argv = ["pack", "--coco-json", str(ann), "--images", str(images), "--out", str(out), "--shards", "2"]
        started = time.monotonic()
        full = subprocess.run(MEGDET + argv, cwd=REPO, env=launch_env(None), capture_output=True, text=True,
                              timeout=SUBPROCESS_TIMEOUT_S)
        print(f"full disk: exit {full.returncode} after {time.monotonic() - started:.2f} s: {full.stderr.strip()}")
        assert full.returncode == 2, full.stderr
        assert full.stderr.count("\n") == 1 and full.stderr.startswith("megdet pack: error: "), full.stderr
        assert f"in {out} failed (no space left on device (" in full.stderr
        assert "free space there or choose another --out, then run the same command again" in full.stderr
        left = sorted(p.name for p in out.iterdir())
        assert left == ["shard-00000-of-00002.h5", "shard-00000-of-00002.h5.json"], left  # nothing partial
        kept = (out / "shard-00000-of-00002.h5").stat().st_ino

        # more space, the same command: the finished shard is kept, the rest packed
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        pack(*argv[1:])
        assert (out / "shard-00000-of-00002.h5").stat().st_ino == kept
        assert_round_trip(ShardDataset(str(out), verify_checksums=True), coco, images)


def test_a_checkpoint_onto_a_full_disk_fails_in_one_line_and_keeps_the_previous_one(tmp_path):
    with small_disk(tmp_path / "disk") as disk:
        previous = checkpoint.save(checkpoint.checkpoint_path(disk, 100), {"model": {"w": torch.arange(1000.0)}})
        started = time.monotonic()
        with pytest.raises(checkpoint.CheckpointError) as failure:
            checkpoint.save(checkpoint.checkpoint_path(disk, 200), {"model": {"w": torch.zeros(2**20)}})  # 4 MiB
        message = str(failure.value)
        print(f"full disk under a checkpoint: {time.monotonic() - started:.2f} s: {message}")
        assert "\n" not in message
        assert message.startswith(f"cannot write checkpoint {disk / 'model_0000200.pt'}: no space left on device (")
        assert f"free space in {disk} or give the run another output folder" in message
        assert "(model_0000100.pt is intact)" in message
        assert sorted(p.name for p in disk.iterdir()) == ["model_0000100.pt"], "a temporary file was left"
        assert checkpoint.latest(disk) == previous
        assert torch.equal(checkpoint.load(previous)["model"]["w"], torch.arange(1000.0))


# ---- 3. torn, corrupt and old checkpoints ----

WRITE_LARGE_CHECKPOINT = """
import sys, torch
from hpc import checkpoint
state = {"model": {f"w{i}": torch.full((2**21,), float(i)) for i in range(16)}, "iteration": 200}  # 128 MiB
checkpoint.save(checkpoint.checkpoint_path(sys.argv[1], 200), state)
"""


def test_a_checkpoint_killed_mid_write_is_never_the_latest(launch_env, tmp_path):
    previous = checkpoint.save(checkpoint.checkpoint_path(tmp_path, 100), {"model": {"w": torch.ones(10)},
                                                                         "iteration": 100})
    writer = subprocess.Popen([sys.executable, "-c", WRITE_LARGE_CHECKPOINT, str(tmp_path)], cwd=REPO,
                              env=launch_env(None), start_new_session=True)
    temporary = str(tmp_path / ".model_0000200.pt.*.tmp")
    try:
        wait_for(lambda: largest_size(temporary) > 2**20, "the checkpoint was being written", writer)
    finally:
        os.killpg(writer.pid, signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL
    assert not (tmp_path / "model_0000200.pt").exists(), "the save finished before it was killed"
    [torn] = glob.glob(temporary)
    assert checkpoint.latest(tmp_path) == previous
    path, state, skipped = checkpoint.latest_loadable(tmp_path, required_keys=("model", "iteration"))
    assert (path, state["iteration"], skipped) == (previous, 100, [])
    assert checkpoint.prune(tmp_path, keep=3) == [Path(torn)], "prune removes what the killed save left"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000100.pt"]


def save_run(folder: Path, iterations) -> List[Path]:
    return [checkpoint.save(checkpoint.checkpoint_path(folder, i), {"model": {"w": torch.full((5000,), float(i))},
                                                                   "iteration": i}) for i in iterations]


def test_resume_skips_truncated_and_corrupt_checkpoints_with_a_warning(tmp_path):
    assert checkpoint.latest_loadable(tmp_path) == (None, None, [])
    oldest, middle, newest = save_run(tmp_path, (100, 200, 300))
    os.truncate(newest, newest.stat().st_size // 2)
    flip_byte(middle, middle.stat().st_size // 2)  # inside the tensor's bytes: torch.load alone would accept it
    warnings: List[str] = []
    path, state, skipped = checkpoint.latest_loadable(tmp_path, warn=warnings.append)
    assert path == oldest and float(state["model"]["w"][0]) == 100.0
    assert [p for p, _ in skipped] == [newest, middle]
    assert f"checkpoint {newest} cannot be read" in skipped[0][1] and "truncated" in skipped[0][1]
    assert f"checkpoint {middle} is corrupt: its record" in skipped[1][1] and "CRC-32" in skipped[1][1]
    assert warnings == [f"skipping a checkpoint: {reason}" for _, reason in skipped]
    with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoint {middle} is corrupt"):
        checkpoint.load(middle)

    flip_byte(oldest, oldest.stat().st_size // 2)
    with pytest.raises(checkpoint.CheckpointError, match=rf"no checkpoint in {tmp_path} can be loaded: all 3 "
                                                         rf"are truncated, corrupt or incomplete \(the newest: "
                                                         rf"checkpoint {newest} cannot be read"):
        checkpoint.latest_loadable(tmp_path, warn=warnings.append)


def test_prune_keeps_the_newest_and_never_the_last_intact_one(tmp_path):
    paths = save_run(tmp_path, (100, 200, 300, 400, 500))
    assert checkpoint.prune(tmp_path, keep=2) == paths[:3]
    assert checkpoint.checkpoints(tmp_path) == paths[3:]
    assert checkpoint.prune(tmp_path, keep=2) == []
    # the newest two are corrupt: keep=1 keeps the newest, and the newest intact one beside it
    paths += save_run(tmp_path, (600,))
    for path in paths[4:]:
        os.truncate(path, 100)
    assert checkpoint.prune(tmp_path, keep=1) == [paths[4]]
    assert checkpoint.checkpoints(tmp_path) == [paths[3], paths[5]]
    assert checkpoint.latest_loadable(tmp_path, warn=lambda line: None)[0] == paths[3]
    with pytest.raises(UserError, match="Invalid number of checkpoints to keep: 0; keep at least 1"):
        checkpoint.prune(tmp_path, keep=0)


# ---- 4. a corrupt record in a shard ----

def test_a_corrupt_record_names_shard_record_and_image_or_is_skipped_and_counted(tmp_path, capfd):
    ann, images, coco = subset(tmp_path, "voc100", count=6)
    out = tmp_path / "shards"
    pack("--coco-json", ann, "--images", images, "--out", out, "--shards", "2")
    dataset = ShardDataset(str(out))
    index = int(np.flatnonzero(dataset.shard_of == 1)[1])  # record 1 of shard 1
    shard = dataset.shard_paths[1]
    with h5py.File(shard, "r") as handle:
        data_start = handle["images/data"].id.get_offset()
    flip_byte(shard, data_start + int(dataset._offset[index]) + 500)  # one byte of the packed JPEG, on disk
    image_id = int(dataset.image_ids[index])

    strict = ShardDataset(str(out))
    with pytest.raises(CorruptRecordError) as failure:
        strict[index]
    message = str(failure.value)
    assert "\n" not in message
    assert f"image id {image_id} in {shard} (record 1 of that shard, index {index} of the data set" in message
    assert "run the same 'megdet pack' command again" in message and "skip_corrupt=True" in message

    lenient = ShardDataset(str(out), skip_corrupt=True)
    capfd.readouterr()
    records = [lenient[i] for i in range(len(lenient))]
    assert [i for i, r in enumerate(records) if r is None] == [index] and lenient.corrupt_skipped == 1
    assert capfd.readouterr().err == (f"warning: skipped image id {image_id} in {shard} (record 1 of that shard, "
                                      f"index {index} of the data set, bytes {int(dataset._offset[index])}.."
                                      f"{int(dataset._offset[index] + dataset._length[index])}): its bytes do not "
                                      "match their CRC-32\n")
    kept = [image for image in coco["images"] if image["id"] != image_id]
    assert [r["image_id"] for r in records if r is not None] == [image["id"] for image in kept]
    # in DataLoader workers too: the None marks the record, so the consumer can count it per batch
    loader = torch.utils.data.DataLoader(lenient, batch_size=3, num_workers=2, collate_fn=list,
                                         multiprocessing_context="fork")
    batches = list(loader)
    assert sum(r is None for batch in batches for r in batch) == 1 and sum(map(len, batches)) == len(lenient)
