"""One GPU per rank: device choice, its errors on every rank, mixed-precision modes, and the Horovod
NCCL check. This machine has no GPU, so the CUDA side is checked through what refuses to run here,
and through scripts/gpu_check.sh on a GPU node."""
import contextlib
import subprocess

import pytest
import torch

from hpc import amp, device
from hpc.errors import UserError
from tests.multirank import MEGDET, REPO, expect_ok, launch_command, run_ranks, skip_unless_launcher



def test_gpu_index_is_the_local_rank_and_refuses_more_ranks_than_gpus():
    assert [device.gpu_index(rank, 4, 8, env={}) for rank in range(4)] == [0, 1, 2, 3]
    # srun --gpus-per-task=1: each task sees only its own GPU
    assert device.gpu_index(3, 4, 1, env={"SLURM_GPUS_PER_TASK": "1"}) == 0
    with pytest.raises(device.DeviceError) as caught:
        device.gpu_index(2, 4, 2, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    message = str(caught.value)
    assert "4 ranks on this node but it has 2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1)" in message
    assert "launch at most 2 ranks per node" in message and "\n" not in message


def test_auto_picks_the_cpu_here_and_cuda_is_refused_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    assert device.select("auto") == torch.device("cpu")
    assert device.select("cpu") == torch.device("cpu")
    with pytest.raises(device.DeviceError) as caught:
        device.select("cuda")
    assert "train.device=cuda but this process sees no GPU" in str(caught.value)
    assert "set train.device=cpu (or auto)" in str(caught.value)
    with pytest.raises(device.DeviceError, match="train.device='gpu' is not one of auto, cuda, cpu"):
        device.select("gpu")


def test_amp_modes_resolve_per_device():
    cpu = torch.device("cpu")
    assert amp.resolve("none", cpu) is None and amp.resolve("auto", cpu) is None
    assert amp.resolve("bf16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="train.amp=fp16 needs a CUDA GPU, and this rank computes on cpu"):
        amp.resolve("fp16", cpu)
    with pytest.raises(UserError, match="train.amp='bf61' is not one of none, bf16, fp16, auto"):
        amp.resolve("bf61", cpu)


@pytest.mark.parametrize("gpu, native_bf16, auto", [("Tesla V100-SXM2-32GB", False, torch.float16),
                                                    ("NVIDIA H200", True, torch.bfloat16)])
def test_amp_asks_the_gpu_for_bf16_arithmetic_of_its_own(monkeypatch, gpu, native_bf16, auto):
    """torch's is_bf16_supported() says True on a V100, which only emulates bf16 (slower than fp16):
    auto and bf16 ask with including_emulation=False. No GPU here: torch.cuda answers as the named GPU."""
    import inspect

    assert "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    cuda = torch.device("cuda", 0)
    assert amp.resolve("auto", cuda) == auto
    if native_bf16:
        assert amp.resolve("bf16", cuda) == torch.bfloat16
    else:
        with pytest.raises(UserError, match=f"train.amp=bf16 but {gpu} has no bf16 arithmetic of its own .* set "
                                            "train.amp=fp16 \\(or auto\\)"):
            amp.resolve("bf16", cuda)


def test_loss_scaler_halves_on_overflow_grows_after_clean_steps_and_round_trips():
    scaler = amp.LossScaler(init_scale=8.0, growth_interval=2)
    for overflow in (True, False, False, True, True, True, True):
        scaler.update(overflow)
    assert scaler.scale == amp.MIN_SCALE and scaler.at_minimum, "never below the minimum"
    scaler.update(False)
    restored = amp.LossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale, restored.clean_steps, restored.growth_interval) == (1.0, 1, 2)
    grads = [torch.full((3,), 4.0), torch.full((2, 2), 8.0)]
    amp.LossScaler(init_scale=4.0).unscale_(grads)
    assert torch.equal(grads[0], torch.ones(3)) and torch.equal(grads[1], torch.full((2, 2), 2.0))
    with pytest.raises(ValueError, match="Invalid init_scale: 0.5"):
        amp.LossScaler(init_scale=0.5)


@pytest.mark.multirank
def test_train_device_cuda_without_a_gpu_is_one_line_per_rank_exit_2_and_writes_nothing(launch_env, tmp_path):
    """Refused before the communicator starts: no rank reaches a collective, nothing is written."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    skip_unless_launcher("horovodrun")
    out = tmp_path / "run"
    done = subprocess.run(launch_command("horovodrun", 2, [*MEGDET, "train", "shapes_r18_cpu", "train.device=cuda",
                                                            f"train.output_dir={out}", "data.train=/nonexistent"]),
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=launch_env({}))
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "megdet train: error" in line]
    assert len(errors) == 2 and all("train.device=cuda but this process sees no GPU" in e for e in errors), \
        done.stdout + done.stderr
    assert {"(rank 0/2)", "(rank 1/2)"} == {e[e.index("(rank"):e.index(")") + 1] for e in errors}
    assert not out.exists()


def body_horovod_on_a_gpu(comm):
    from hpc import comm as comm_mod

    try:
        comm_mod.init(engine="horovod", device=torch.device("cuda", 0))
    except UserError as error:
        return str(error)
    return None


@pytest.mark.multirank
def test_horovod_without_nccl_refuses_gpu_ranks_on_every_rank():
    """The Horovod built here has no NCCL: ranks that compute on a GPU are refused, naming the rebuild."""
    skip_unless_launcher("horovodrun")
    messages = expect_ok(run_ranks("tests.test_device:body_horovod_on_a_gpu", 2, "horovodrun", init=False))
    assert all(m is not None and "this Horovod was built without NCCL" in m and "MEGDET_COMM=torch" in m
               for m in messages), messages
