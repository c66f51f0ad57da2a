"""The choices the hpc layer offers, importable without torch: ``megdet.config`` checks a config
against them before anything heavy is imported, and the modules that implement them import them
from here."""

AMP_MODES = ("none", "bf16", "fp16", "auto")       # hpc.amp.resolve
DEVICE_KINDS = ("auto", "cuda", "cpu")             # hpc.device.select
COMPRESSIONS = ("none", "fp16")                    # hpc.distributed.DistributedOptimizer(compression=...)
