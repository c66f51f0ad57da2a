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
