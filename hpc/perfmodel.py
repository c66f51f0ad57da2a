"""A time-to-train model for data-parallel training: compute + ring allreduces, per step and per run.

    busbw_Bps = busbw_allreduce(algbw(bytes_, seconds), n)      # nccl-tests definitions
    allreduce_s = ring_allreduce_seconds(166e6, 64, busbw_Bps=12e9, latency_s=5e-6)   # 27.9 ms
    step_s = step_seconds(compute_s=2.95, allreduce_s=allreduce_s,
                          cgbn_s=cgbn_seconds(bn_channels, 8, 12e9, 5e-6), images_per_gpu=4)
    hours = time_to_train_seconds(iterations=5070, step_s=step_s) / 3600

Units are in the names: ``_s`` seconds, ``bytes_`` bytes, ``_Bps`` bytes per second. Bandwidths are
*bus* bandwidths (nccl-tests' busbw), which stay about constant as the ring grows, so one measured
value serves every rank count. One step of one rank is

    step = max(compute + exposed gradient allreduce + CGBN, images_per_gpu / input rate)
    exposed gradient allreduce = max(0, allreduce - overlap * backward)

where compute is the step without any communication. Evaluation adds, per evaluation, one inference
pass (``inference_seconds``) and the scoring the run waits for (``exposed_scoring_seconds``). The
model knows nothing of hierarchical (intra-node then inter-node) allreduce, stragglers or start-up; see
``megdet bench project`` (megdet/bench/project.py).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

CGBN_FORWARD_BYTES_PER_VALUE = 8   # float64 packet: [flag per group member, count, sum x (C), sum x^2 (C)]
CGBN_BACKWARD_BYTES_PER_VALUE = 4  # float32 packet: [sum dy (C), sum dy * xhat (C)]


def algbw(bytes_: float, seconds: float) -> float:
    """Algorithm bandwidth in bytes/s of a collective on ``bytes_`` bytes that took ``seconds``
    (nccl-tests: algbw = size / time)."""
    return bytes_ / seconds


def busbw_allreduce(algbw_Bps: float, n: int) -> float:
    """Bus bandwidth in bytes/s of an allreduce over ``n`` ranks (nccl-tests: busbw = algbw * 2(n-1)/n),
    the bandwidth each link carries, comparable across ``n``."""
    return algbw_Bps * 2 * (n - 1) / n


def ring_allreduce_seconds(bytes_: float, n: int, busbw_Bps: float, latency_s: float) -> float:
    """Seconds of a ring allreduce of ``bytes_`` bytes over ``n`` ranks: 2(n-1)/n * bytes / busbw
    (reduce-scatter + allgather) + 2(n-1) * latency (one latency per ring step); 0 for ``n`` = 1."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * bytes_ / busbw_Bps + 2 * (n - 1) * latency_s


def cgbn_collectives(channels: Iterable[int]) -> int:
    """Blocking allreduces per step of cross-GPU BN: one forward and one backward per BN layer."""
    return 2 * len(list(channels))


def cgbn_seconds(channels: Iterable[int], group_ranks: int, busbw_Bps: float, latency_s: float,
                 wait_s: float = 0.0) -> float:
    """Seconds per step of cross-GPU batch norm (``hpc.cgbn``) over groups of ``group_ranks`` ranks:
    for each BN layer of ``channels`` C, one forward allreduce of (group_ranks + 1 + 2C) float64 and
    one backward allreduce of 2C float32, each on the critical path (the next layer waits for it),
    each also waiting ``wait_s`` before it starts: Horovod runs ops from a background thread that
    wakes every HOROVOD_CYCLE_TIME, so a blocking op waits half a cycle on average
    (``horovod_wait_seconds``); torch.distributed starts it at once (0). 0 for a group of one."""
    if group_ranks <= 1:
        return 0.0
    total = 0.0
    for c in channels:
        forward_bytes = (group_ranks + 1 + 2 * c) * CGBN_FORWARD_BYTES_PER_VALUE
        backward_bytes = 2 * c * CGBN_BACKWARD_BYTES_PER_VALUE
        total += ring_allreduce_seconds(forward_bytes, group_ranks, busbw_Bps, latency_s) + wait_s
        total += ring_allreduce_seconds(backward_bytes, group_ranks, busbw_Bps, latency_s) + wait_s
    return total


def horovod_wait_seconds(cycle_time_s: float) -> float:
    """Mean wait of a blocking Horovod op for the background thread's next cycle: half a cycle."""
    return cycle_time_s / 2


def exposed_allreduce_seconds(allreduce_s: float, backward_s: float, overlap: float) -> float:
    """The part of the gradient allreduce the step waits for: max(0, allreduce - overlap * backward),
    ``overlap`` in [0, 1] the share of the backward pass that hides communication (0: none)."""
    return max(0.0, allreduce_s - overlap * backward_s)


def step_seconds(compute_s: float, allreduce_s: float, cgbn_s: float, images_per_gpu: int,
                 input_rate: Optional[float] = None) -> float:
    """Seconds of one training step of one rank: compute + exposed allreduce + CGBN, but never less
    than the input pipeline needs for ``images_per_gpu`` at ``input_rate`` images/s per GPU
    (None: unbounded)."""
    step = compute_s + allreduce_s + cgbn_s
    if input_rate is not None:
        step = max(step, images_per_gpu / input_rate)
    return step


def inference_seconds(images: int, gpus: int, seconds_per_image: float) -> float:
    """Seconds of one inference pass over ``images`` images shared among ``gpus`` GPUs: the rank with the
    most, ceil(images / gpus), at ``seconds_per_image`` each (the others wait for it)."""
    return math.ceil(images / gpus) * seconds_per_image


def exposed_scoring_seconds(scoring_s: float, evaluations: int, between_s: float, overlapped: bool) -> float:
    """Seconds of scoring a run of ``evaluations`` evaluations waits for, ``scoring_s`` each. Synchronous:
    all of them. Overlapped (scored in the background while training goes on): each evaluation but the
    last hides behind the ``between_s`` seconds of training up to the next one, what does not fit shows;
    the last shows whole, since its AP ends the run."""
    if not overlapped or evaluations == 0:
        return evaluations * scoring_s
    return (evaluations - 1) * max(0.0, scoring_s - between_s) + scoring_s


def images_per_second(gpus: int, images_per_gpu: int, step_s: float) -> float:
    """Training images/s over all ``gpus``."""
    return gpus * images_per_gpu / step_s


def scaling_efficiency(throughput_n: float, throughput_1: float, n: int) -> float:
    """throughput(n) / (n * throughput(1)): 1.0 is linear scaling."""
    return throughput_n / (n * throughput_1)


def iterations_for_epochs(epochs: float, dataset_images: int, batch: int) -> int:
    """Iterations of ``epochs`` passes over ``dataset_images`` at ``batch`` images per iteration,
    rounded to the nearest iteration (as the presets' max_iter)."""
    return round(epochs * dataset_images / batch)


def time_to_train_seconds(iterations: int, step_s: float) -> float:
    """Seconds of ``iterations`` steps of ``step_s`` seconds."""
    return iterations * step_s


def format_duration(seconds: float) -> str:
    """Human-readable duration as the papers write it: "7.4 h" from an hour up, else "11m53s"."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s"
