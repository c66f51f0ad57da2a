"""Atomic checkpoints, exact random state, and stop signals agreed across real ranks."""
import os
import random
import signal
import threading

import numpy as np
import pytest
import torch

from hpc import checkpoint
from tests.multirank import expect_ok, run_ranks


def test_save_is_atomic_and_a_failed_save_keeps_the_previous_file(tmp_path):
    path = checkpoint.checkpoint_path(tmp_path, 20)
    checkpoint.save(path, {"model": {"w": torch.arange(3.0)}, "iteration": 20})
    with pytest.raises(Exception):
        checkpoint.save(path, {"model": threading.Lock()})  # cannot be pickled: fails mid-write
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000020.pt"], "no temporary file left behind"


def test_latest_is_the_highest_iteration_not_the_newest_file(tmp_path):
    assert checkpoint.latest(tmp_path / "absent") is None
    for iteration in (100, 2000, 300):
        checkpoint.save(checkpoint.checkpoint_path(tmp_path, iteration), {"model": {}})
    (tmp_path / "model_final.pt.tmp").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path).name == "model_0002000.pt"


def test_unusable_checkpoints_name_the_file(tmp_path):
    good = checkpoint.save(tmp_path / "good.pt", {"model": {"w": torch.ones(1000)}})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    foreign = checkpoint.save(tmp_path / "foreign.pt", {"state_dict": {}})
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint {truncated} cannot be read"):
        checkpoint.load(truncated)
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint {foreign} has no model"):
        checkpoint.load(foreign)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pt")


def test_random_state_round_trip_reproduces_every_generator():
    state = checkpoint.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2))
    checkpoint.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def body_gather_random_states(comm):
    states = checkpoint.gather_rng_states(comm)
    return None if states is None else [state["torch"].sum().item() for state in states]


@pytest.mark.multirank
def test_rank_zero_gathers_every_ranks_random_state():
    values = expect_ok(run_ranks("tests.test_checkpoint:body_gather_random_states", 2, "horovodrun"))
    assert values[1] is None and len(values[0]) == 2


def test_stop_signals_are_recorded_not_fatal_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    stop = checkpoint.StopSignals()
    try:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path):
    """mkstemp makes 0600 files; a run folder's checkpoints and metrics are read by a whole team."""
    import os

    from hpc.files import write_atomic

    plain = tmp_path / "plain"
    plain.write_text("x")
    assert os.stat(write_atomic(tmp_path / "atomic", "x")).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_read_opens_a_file_or_a_folders_newest_that_loads(tmp_path):
    """``read``, the one way train, eval and show open a checkpoint: a file as ``load``; a folder's newest
    that loads, skipping a torn one with a warning; (None, None) for a folder that holds none."""
    older = checkpoint.save(checkpoint.checkpoint_path(tmp_path, 10), {"model": {"w": torch.ones(2)}})
    torn = checkpoint.checkpoint_path(tmp_path, 20)
    torn.write_bytes(older.read_bytes()[:100])
    warnings = []
    path, state = checkpoint.read(tmp_path, warn=warnings.append)
    assert path == older and torch.equal(state["model"]["w"], torch.ones(2))
    assert len(warnings) == 1 and str(torn) in warnings[0]
    assert checkpoint.read(older)[0] == older
    empty = tmp_path / "empty"
    empty.mkdir()
    assert checkpoint.read(empty) == (None, None)
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint {older} has no optimizer"):
        checkpoint.read(older, required_keys=("model", "optimizer"))
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.read(tmp_path / "missing.pt")


def test_read_for_names_both_models_when_the_checkpoint_holds_another(tmp_path):
    from megdet import config as config_mod
    from megdet.engine.model_checkpoint import read_for

    cfg = config_mod.load("shapes_r18_cpu")
    path = checkpoint.save(tmp_path / "model.pt", {"model": {}, **cfg.identity.fields()})
    assert read_for(cfg, path, ("model",), advice="unused")[0] == path
    other = checkpoint.save(tmp_path / "other.pt", {"model": {}, "model_name": "resnet50_fpn", "num_classes": 80})
    with pytest.raises(checkpoint.CheckpointError) as failure:
        read_for(cfg, other, ("model",), advice="evaluate it with the config that trained it")
    assert str(failure.value) == (
        f"checkpoint {other} holds a resnet50_fpn with 80 classes, but shapes_r18_cpu builds a resnet18_fpn with "
        f"{cfg.model.num_classes}: evaluate it with the config that trained it")
    with pytest.raises(checkpoint.CheckpointError, match="has no model_name: it was not written by megdet train"):
        read_for(cfg, checkpoint.save(tmp_path / "bare.pt", {"model": {}}), ("model",), advice="x")


def test_resume_without_a_run_folder_yet_starts_afresh(tmp_path, run_megdet, shapes_shards):
    """``megdet train --resume`` (no value) where the run folder does not exist yet: nothing to resume."""
    out = tmp_path / "new" / "run"
    done = run_megdet(["train", "shapes_r18_cpu", "data.min_sizes=[64]", "data.max_size=64", "data.images_per_rank=1",
                       "data.num_workers=0", "solver.batch_size=1", "model.norm=bn", "model.bn_size=null",
                       "solver.max_iter=2", "solver.steps=[1]", "solver.warmup_iters=1", "train.checkpoint_period=1000",
                       "data.val=", f"data.train={shapes_shards / 'train'}", f"train.output_dir={out}", "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" not in done.stdout and checkpoint.latest(out).name == "model_0000002.pt"
