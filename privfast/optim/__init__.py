"""Private optimizers: DPOptimizer around any torch optimizer (DP-SGD, DP-Adam, DP-RMSProp, ...),
microbatch clipping (via the engine's ``microbatch_size``), SAM and DP-SAM."""

from privfast.optim.optimizer import DPOptimizer
from privfast.optim.sam import SAM, DPSAMOptimizer

__all__ = ["DPOptimizer", "DPSAMOptimizer", "SAM"]
