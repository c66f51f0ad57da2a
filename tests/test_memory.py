"""Recomputation of chosen stages: same outputs, gradients and running statistics, less peak memory."""
import copy

import pytest
import torch
from torch import nn

from hpc.recompute import peak_cpu_bytes, recompute

BLOCKS_PER_STAGE = 3
STAGES = ["1", "2", "3", "4"]


def block(channels):
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())


def staged_net(seed=0):
    """stem, four stages of conv-BN-ReLU blocks (the last with dropout), head: Tensor[N, 3, H, W] -> [N, 5]."""
    torch.manual_seed(seed)
    stages = [nn.Sequential(*[block(16) for _ in range(BLOCKS_PER_STAGE)]) for _ in STAGES]
    stages[-1].append(nn.Dropout(0.3))
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 5))


def forward_backward(model, images):
    torch.manual_seed(7)  # the same dropout mask in both models
    out = model(images)
    out.square().mean().backward()
    return out


def test_recomputed_stages_give_the_same_results_with_less_memory():
    torch.set_num_threads(1)
    plain, recomputed = staged_net(), staged_net()
    assert recompute(recomputed, STAGES) == STAGES
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(forward_backward(recomputed, images), forward_backward(plain, images))
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for (name, a), b in zip(plain.named_buffers(), recomputed.buffers()):
        # Running statistics updated once per step, not again by the recomputation.
        torch.testing.assert_close(b, a, msg=lambda m: f"{name}: {m}")
    assert list(plain.state_dict()) == list(recomputed.state_dict())

    peak_plain = peak_cpu_bytes(lambda: forward_backward(plain, images))
    peak_recomputed = peak_cpu_bytes(lambda: forward_backward(recomputed, images))
    activation = images[:, :1].numel() * 16 * 4  # bytes of one Tensor[8, 16, 32, 32] float32
    assert peak_plain > len(STAGES) * BLOCKS_PER_STAGE * 2 * activation, "every block's activations are kept"
    # Recomputed: each stage's input, plus one stage's activations while it is recomputed.
    assert peak_recomputed < 0.6 * peak_plain, (peak_recomputed, peak_plain)


def test_eval_and_no_grad_run_the_plain_forward():
    model = staged_net()
    reference = copy.deepcopy(model)
    recompute(model, ["2"])
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), reference.eval()(images))


def test_unknown_or_repeated_modules_are_refused():
    model = staged_net()
    with pytest.raises(ValueError, match=r"Invalid recompute modules: \['layer9'\] .*children are: 0, 1, 2, 3, 4, 5"):
        recompute(model, ["1", "layer9"])
    recompute(model, ["1"])
    with pytest.raises(ValueError, match=r"Invalid recompute modules: \['1'\] \(already recomputed"):
        recompute(model, ["1"])
