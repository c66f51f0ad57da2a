"""Large-batch optimizers written with multi-tensor ``torch._foreach_*`` kernels.

    from hpc.optim import PMDLAMB, param_groups
    optimizer = PMDLAMB(param_groups(model, weight_decay=5e-4), lr=0.32)

``PMDLAMB`` (LargeDet Algorithm 1), ``LAMB`` (bias-corrected), ``LARS`` (momentum). Each ``step()``
gathers the tensors and their state, and one functional kernel does the math for all of them, a cache
block at a time on CPU. ``PMDLAMB(compiled=True)`` runs CPU tensors of 64 Ki elements and more through
one ``torch.compile``'d kernel each instead (fewer passes over memory; compiled at the first step).
"""
from hpc.optim.lamb import LAMB
from hpc.optim.lars import LARS
from hpc.optim.param_groups import param_groups
from hpc.optim.pmd_lamb import PMDLAMB

__all__ = ["LAMB", "LARS", "PMDLAMB", "param_groups"]
