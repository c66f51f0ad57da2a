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


def body_signal_on_one_rank(comm):
    stop = checkpoint.StopSignals()
    try:
        assert not stop.agreed(comm)
        if comm.rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        agreed = stop.agreed(comm)
        states = checkpoint.gather_rng_states(comm)
        return {"agreed": agreed, "received": stop.received, "states": None if states is None else len(states)}
    finally:
        stop.restore()


@pytest.mark.multirank
@pytest.mark.parametrize("launcher", ["horovodrun", "torch"])
def test_a_signal_on_one_rank_stops_every_rank(launcher):
    values = expect_ok(run_ranks("tests.test_checkpoint:body_signal_on_one_rank", 2, launcher))
    assert [v["agreed"] for v in values] == [True, True]
    assert [v["received"] for v in values] == [None, signal.SIGUSR1]
    assert [v["states"] for v in values] == [2, None]
