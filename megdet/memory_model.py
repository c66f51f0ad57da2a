"""Peak training memory of the detector on one GPU, from activation sizes measured on this CPU, and the
recomputed stages that make a number of images per GPU fit (``megdet job --gpu-memory``).

    estimate = training_peak(model="resnet50_fpn", norm="cgbn", pretrained=True, images=4,
                             recomputed=("res3",), optimizer="sgd", amp="none")
    estimate.gib          # about 6.5: what one GPU needs (CUDA context, weights, optimizer state, activations)
    fit(cfg, gpu_memory_gb=12)   # (recomputed stages, estimate) for cfg's images per rank, or UserError

The model. A training step keeps, for the backward pass, what each part of the network saved in the
forward pass; its peak is at the start of the backward pass, or while a recomputed stage runs again:

    peak = base + images x max(kept + heads,  max over recomputed k of (kept before k + own_k + out_k))

per image, where a stage that trains keeps ``own`` (its saved tensors without its input), a frozen stage
keeps nothing, a recomputed one only its input, and the output of a stage that does not keep it is
kept by the next layer that reads it (the next stage, the FPN). ``heads`` is the FPN, RPN and RoI heads
with the transient of the step's peak. Every figure is MiB per image at 800 x 1344 (800 x 1333 padded to
32), float32, measured by ``hpc.recompute.saved_tensor_bytes`` (autograd's saved tensors, each storage once)
and ``hpc.recompute.peak_cpu_bytes`` on one training step on the CPU (``megdet bench model`` prints both
beside this model); activations scale with the padded image area. Measured on 2026-12-01, torch 2.13 CPU,
synthetic images of 8 boxes. For resnet50_fpn the model reproduces the measured CPU peaks of 9 layouts
(norm bn or frozen, freeze_at 0 or 2, none to all stages recomputed, 1 or 2 images) within 0.5 %, and
it predicted three more before they were measured: res3 recomputed on frozen stem and res2, 1092.6 MiB
(measured 1092.6); 4 images, 5964.8 MiB (measured 5964.6); and at another size, 800 x 1067 (``megdet
bench model --models resnet50_fpn,resnet18_fpn --sizes 800 --batch 1 --repeats 1 --threads 1``),
1889 and 1052 MiB with res2 and res3 recomputed (measured 1889 and 1052; resnet18_fpn 586.3 and 440.1
against 586.2 and 440.1).

On a GPU (not measured here: no GPU in this workplace) add the weights, their gradients and the
optimizer's state (4 bytes per parameter each: SGD keeps one moment, LAMB and PMD-LAMB two), multiply by
``ALLOCATOR_FACTOR`` for the caching allocator's rounding and cuDNN's workspaces, and add
``CUDA_RESERVED_GIB`` for the CUDA context, cuBLAS/cuDNN handles and NCCL buffers, which the allocator
does not see. The factor 1.2 is set by one public figure: detectron2's R50-FPN 1x (frozen BN, stem and
res2 frozen, 2 images per V100) reports 3.0 GB of ``max_memory_allocated``, this model 2.5 GiB before the
factor. Expect +-20 % on a GPU until it is measured there (``megdet bench model --device cuda``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

from hpc.errors import UserError
from megdet.model.settings import PRESETS as MODEL_PRESETS
from megdet.weights import STAGES, default_freeze_at, frozen_stage_names

REFERENCE_PIXELS = 800 * 1344
SIZE_DIVISIBILITY = 32
BYTES_PER_VALUE = 4                  # float32 weights, gradients and optimizer moments
MIB = 2 ** 20
ALLOCATOR_FACTOR = 1.2
CUDA_RESERVED_GIB = 1.0
# Optimizer moments per parameter (None: no optimizer, as in megdet bench model's steps).
OPTIMIZER_STATES = {None: 0, "sgd": 1, "lars": 1, "lamb": 2, "pmd_lamb": 2}
# Activations per image under autocast (train.amp other than none) relative to float32: bf16 on this CPU,
# 856 against 1476 MiB (resnet50_fpn, norm bn, freeze_at 2); fp16 on a GPU is taken to keep as much.
HALF_PRECISION_FACTOR = 0.58


@dataclass(frozen=True)
class Figures:
    """MiB per image at REFERENCE_PIXELS, float32, of one detector (see the module docstring)."""

    parameters: int                  # all of them (trainable or not)
    stage_parameters: Dict[str, int]  # of each backbone stage
    own: Dict[bool, Dict[str, float]]  # BN trains? -> stage -> kept by a training stage, its input excluded
    outputs: Dict[str, float]        # stage -> its output (the stem's: after the max pool)
    heads: float                     # FPN + RPN + RoI heads, and the transient of the peak
    base: float                      # MiB at the peak whatever the number of images


MEASURED = {
    # resnet50_fpn, 1 and 2 images of 800 x 1333 with 8 boxes, one thread, torch 2.13 CPU:
    #   norm bn, freeze_at 0: kept 2067.5 (2 images 4118.8), peak 2319.0 (4578.8) MiB
    #   norm bn, freeze_at 2: 1284.1, peak 1535.6;  frozen, freeze_at 2: 802.0 (1588.0), peak 1053.6 (2048.0)
    #   frozen, freeze_at 0: 1158.9, peak 1410.4;  bn, freeze_at 0, res2+res3 recomputed: 1033.8, 1285.4;
    #   all four recomputed: 627.6, peak 1138.7 (the peak is the recomputation of res2)
    # The stem's own includes the image and its ReLU output; res2's includes its input (the stem keeps
    # no output of its max pool).
    "resnet50_fpn": Figures(
        parameters=41_753_056,
        stage_parameters={"stem": 9_536, "res2": 215_808, "res3": 1_219_584, "res4": 7_098_368, "res5": 14_964_736},
        own={True: {"stem": 176.3, "res2": 672.7, "res3": 475.8, "res4": 336.4, "res5": 94.4},
             False: {"stem": 110.7, "res2": 311.7, "res3": 221.5, "res4": 160.0, "res5": 43.1}},
        outputs={"stem": 16.4, "res2": 65.6, "res3": 32.8, "res4": 16.4, "res5": 8.2},
        heads=311.8 + 192.4,         # kept 311.8 (FPN 88.7, RPN 173.8, RoI heads 49.3) + transient
        base=59.2,                   # about the gradients of the heads, made first in the backward pass
    ),
    # resnet101_fpn: resnet50_fpn's stem, res2, res3, res5, FPN and heads; res4 has 23 blocks instead of 6.
    # Its own figures measured the same way (res4 alone on res3's output, 512 x 100 x 168, where the same
    # measurement gives resnet50_fpn's 336.4 and 160.0 exactly): 1173.3 (bn) and 578.5 MiB (frozen).
    "resnet101_fpn": Figures(
        parameters=60_745_184,
        stage_parameters={"stem": 9_536, "res2": 215_808, "res3": 1_219_584, "res4": 26_090_496, "res5": 14_964_736},
        own={True: {"stem": 176.3, "res2": 672.7, "res3": 475.8, "res4": 1173.3, "res5": 94.4},
             False: {"stem": 110.7, "res2": 311.7, "res3": 221.5, "res4": 578.5, "res5": 43.1}},
        outputs={"stem": 16.4, "res2": 65.6, "res3": 32.8, "res4": 16.4, "res5": 8.2},
        heads=311.8 + 192.4,
        base=59.2,
    ),
    # resnet18_fpn (its own heads: FPN 128 channels, box head 512, 256 RoIs), the same way:
    #   bn, freeze_at 0: kept 602.0 (2 images 1196.0), peak 720.6 (1425.9);  bn, freeze_at 2: 294.4, 412.9;
    #   frozen, freeze_at 2: 221.6, peak 341.2;  frozen, freeze_at 0: 397.9, peak 517.5
    "resnet18_fpn": Figures(
        parameters=15_719_904,
        stage_parameters={"stem": 9_536, "res2": 147_968, "res3": 525_568, "res4": 2_099_712, "res5": 8_393_728},
        own={True: {"stem": 176.3, "res2": 147.7, "res3": 73.8, "res4": 36.9, "res5": 18.5},
             False: {"stem": 110.7, "res2": 82.0, "res3": 32.8, "res4": 16.4, "res5": 8.2}},
        outputs={"stem": 16.4, "res2": 16.4, "res3": 8.2, "res4": 4.1, "res5": 2.05},
        heads=148.8 + 103.3,         # kept 148.8 (FPN 44.4, RPN 86.9, RoI heads 17.5) + transient
        base=15.3,
    ),
}


# The mask branch (model.mask_on) adds its head to any of them: its activations on the positive RoIs (128
# per COCO image) are not measured here: detectron2's model zoo gives 3.4 GB for Mask R-CNN R50-FPN 1x
# against 3.0 GB for Faster R-CNN at 2 images per V100, about 200 MiB per image. (On 8 synthetic boxes
# the CPU peak is the same: the heads' memory is not at the peak with few positives.) Its parameters at
# 80 classes: four 3x3 convs of 256, the 2x deconv and the 1x1 predictor.
MASK_HEAD_MIB_PER_IMAGE = 200.0
MASK_HEAD_PARAMETERS = 2_643_280


@dataclass(frozen=True)
class Estimate:
    """A training step's peak memory: ``gib`` on one GPU in all, ``allocated_mib`` of it what
    ``torch.cuda.max_memory_allocated`` sees; ``cpu_mib`` what ``hpc.recompute.peak_cpu_bytes`` measures for
    the same step on the CPU (activations, and the gradients made before the peak)."""

    gib: float
    allocated_mib: float
    cpu_mib: float
    recomputed: Tuple[str, ...]


def _measured_model(model: str) -> Optional[str]:
    """The measured model whose settings are ``model``'s without its mask branch, if any."""
    box_settings = dict(MODEL_PRESETS.get(model, {}), mask_on=False)
    return next((name for name in MEASURED if MODEL_PRESETS[name] == box_settings), None)


def has_figures(model: str) -> bool:
    return _measured_model(model) is not None


def measured(model: str, mask_on: bool = False) -> Figures:
    """The figures of ``model`` (a name of ``megdet.model.settings.PRESETS``), the mask head's added when
    ``mask_on``. A model that differs from a measured one only in its mask branch (mask_rcnn_r50_fpn:
    resnet50_fpn's settings) takes that one's."""
    box_model = _measured_model(model)
    if box_model is None:
        raise UserError(f"no memory figures for model {model!r} (measured: {', '.join(MEASURED)}): measure them "
                        "with 'megdet bench model' and add them to megdet.memory_model.MEASURED")
    figures = MEASURED[box_model]
    if not mask_on:
        return figures
    return replace(figures, parameters=figures.parameters + MASK_HEAD_PARAMETERS,
                   heads=figures.heads + MASK_HEAD_MIB_PER_IMAGE)


def _kept(figures: Figures, norm_trains: bool, frozen: Sequence[str], recomputed: Sequence[str]) -> Dict[str, float]:
    """MiB each stage adds to what the backward pass needs, per image (the rules of the module docstring)."""
    kept = {}
    for stage in STAGES:
        if stage in recomputed:  # the checkpoint keeps its input (res2's: the stem's output, kept by no one)
            kept[stage] = figures.outputs[stage] + (figures.outputs["stem"] if stage == "res2" else 0.0)
        elif stage in frozen:  # its output is kept by the next reader, unless that is frozen too (the stem)
            kept[stage] = 0.0 if stage == "stem" else figures.outputs[stage]
        else:
            kept[stage] = figures.own[norm_trains][stage]
    return kept


def per_image_mib(figures: Figures, *, norm_trains: bool, frozen: Sequence[str],
                  recomputed: Sequence[str]) -> Tuple[float, float]:
    """MiB per image at REFERENCE_PIXELS, float32, at the start of the backward pass and at the largest
    recomputation (0 without one)."""
    kept = _kept(figures, norm_trains, frozen, recomputed)
    again = 0.0
    for index, stage in enumerate(STAGES):
        if stage in recomputed:  # running it again: what the stages before keep, its own, its output's gradient
            before = sum(kept[earlier] for earlier in STAGES[:index])
            again = max(again, before + figures.own[norm_trains][stage] + figures.outputs[stage])
    return sum(kept.values()) + figures.heads, again


def training_peak(*, model: str, norm: str, pretrained: bool, images: int, mask_on: bool = False,
                  recomputed: Sequence[str] = (), optimizer: Optional[str] = "sgd", amp: str = "none",
                  min_size: int = 800, max_size: int = 1333) -> Estimate:
    """The GPU memory of one rank's training step (see the module docstring); ``mask_on``: with the
    mask branch."""
    figures = measured(model, mask_on)
    frozen = frozen_stage_names(default_freeze_at(pretrained))
    pixels = (math.ceil(min_size / SIZE_DIVISIBILITY) * math.ceil(max_size / SIZE_DIVISIBILITY)
              * SIZE_DIVISIBILITY ** 2)
    scale = images * pixels / REFERENCE_PIXELS * (1.0 if amp == "none" else HALF_PRECISION_FACTOR)
    start, again = per_image_mib(figures, norm_trains=norm != "frozen", frozen=frozen, recomputed=recomputed)
    trainable = figures.parameters - sum(figures.stage_parameters[stage] for stage in frozen)
    gradients = trainable * BYTES_PER_VALUE / MIB  # all made by the time a stage is recomputed
    cpu = figures.base + max(scale * start, scale * again + gradients)
    # On the GPU every gradient and moment counts, at either peak (conservative at the first).
    static = (figures.parameters + trainable * OPTIMIZER_STATES[optimizer]) * BYTES_PER_VALUE / MIB + gradients
    allocated = ALLOCATOR_FACTOR * (static + figures.base + scale * max(start, again))
    return Estimate(gib=CUDA_RESERVED_GIB + allocated / 1024, allocated_mib=allocated, cpu_mib=cpu,
                    recomputed=tuple(recomputed))


def fit(cfg, gpu_memory_gb: float) -> Estimate:
    """The estimate for ``cfg``'s images per rank on a GPU of ``gpu_memory_gb``: with the config's
    recomputed stages if they fit, else with the fewest more stages that make it fit (largest saving
    first). UserError when no recomputation fits, naming the GPUs or memory that would."""
    images = cfg.data.images_per_rank

    def estimate(count: int, stages: Sequence[str]) -> Estimate:
        return training_peak(model=cfg.model.name, norm=cfg.model.norm, pretrained=pretrained, images=count,
                             mask_on=cfg.model.with_masks, recomputed=stages, optimizer=cfg.solver.optimizer, amp=cfg.train.amp,
                             min_size=max(cfg.data.min_sizes), max_size=cfg.data.max_size)

    pretrained = cfg.model.backbone_weights is not None
    frozen = frozen_stage_names(default_freeze_at(pretrained))
    own = measured(cfg.model.name, cfg.model.with_masks).own[cfg.model.norm != "frozen"]
    candidates = sorted((stage for stage in STAGES[1:]
                         if stage not in frozen and stage not in cfg.model.sublinear_stages), key=lambda stage: -own[stage])
    stages = list(cfg.model.sublinear_stages)
    result = estimate(images, stages)
    while result.gib > gpu_memory_gb and candidates:
        stages.append(candidates.pop(0))
        result = estimate(images, [stage for stage in STAGES if stage in stages])
    if result.gib <= gpu_memory_gb:
        return result
    every = [stage for stage in STAGES[1:] if stage not in frozen]
    batch = cfg.solver.batch_size  # fewer images per GPU: a divisor of the batch
    fitting = [count for count in range(images - 1, 0, -1)
               if batch % count == 0 and estimate(count, every).gib <= gpu_memory_gb]
    where = (f"{images} images of {max(cfg.data.min_sizes)}x{cfg.data.max_size} per GPU need about {result.gib:.1f} GB "
             f"even with {', '.join(every)} recomputed, more than the {gpu_memory_gb:g} GB per GPU (--gpu-memory)")
    if not fitting:
        one = estimate(1, every).gib
        raise UserError(f"{where}; 1 image needs {one:.1f} GB: no layout fits, use GPUs with at least {one:.1f} GB")
    raise UserError(f"{where}: spread the batch over {batch // fitting[0]} GPUs or more ({fitting[0]} images each), "
                    f"or use GPUs with at least {result.gib:.1f} GB")
