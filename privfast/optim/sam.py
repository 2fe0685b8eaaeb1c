"""SAM (Foret et al., 2021) and its private versions.

As in Liu, Oya & Kerschbaum, "Generalization Techniques Empirically Outperform Differential Privacy
against Membership Inference" (arXiv:2110.05524, 2021), Appendix B.

DP-SAM privatizes both gradients of a SAM step: the ascent direction ``e = rho * g / ||g||`` is
computed from the clipped, noised gradient at ``w`` (using the raw batch gradient there would
make every example's gradient at ``w + e`` depend on the others, which the DP-SGD analysis does
not cover), and the descent gradient at ``w + e`` is clipped and noised again. Each SAM step is
therefore two Gaussian releases, and the accountant is stepped twice. With ``noise_multiplier=0``
it is "SAM with clipping" (no privacy guarantee, that paper's comparison point).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.optim import Optimizer

from privfast.optim.optimizer import DPOptimizer


class SAM(Optimizer):
    """Sharpness-aware minimization around a base optimizer.

    Args:
        params: parameters or parameter groups.
        base_optimizer: the optimizer class of the descent step (e.g. ``torch.optim.SGD``).
        rho: radius of the neighbourhood, > 0 (0.05 in the seed).
        **kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...).
    """

    def __init__(self, params, base_optimizer: type[Optimizer] = torch.optim.SGD, *, rho: float = 0.05, **kwargs):
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to ``w + rho * g / ||g||`` (``g`` is the current ``.grad``)."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = p.grad * scale
                p.add_(e_w)
                self.state[p]["e_w"] = e_w
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``w`` and step the base optimizer with the gradient taken at ``w + e``."""
        for group in self.param_groups:
            for p in group["params"]:
                if "e_w" in self.state[p]:
                    p.sub_(self.state[p].pop("e_w"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], float]] = None):
        """One SAM step; ``closure`` must zero nothing and run forward and backward on the same batch."""
        if closure is None:
            raise ValueError("SAM needs a closure that recomputes the loss and calls backward on the same batch")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()


class DPSAMOptimizer(DPOptimizer):
    """DP-SAM: a :class:`SAM` optimizer whose two gradients per step are both privatized.

    ``step(closure)`` expects the first backward to have run already (as for any DPOptimizer);
    ``closure`` reruns forward and backward on the same batch at the perturbed weights.
    """

    releases_per_step = 2

    def __init__(self, optimizer: SAM, **kwargs):
        if not isinstance(optimizer, SAM):
            raise ValueError(f"DPSAMOptimizer wraps a privfast.optim.SAM, got {type(optimizer).__name__}")
        super().__init__(optimizer, **kwargs)

    def signal_skip_step(self, do_skip: bool = True) -> None:
        if do_skip:
            raise ValueError("DP-SAM cannot split a logical batch into physical batches: its closure reruns the batch")
        super().signal_skip_step(do_skip)

    def step(self, closure: Optional[Callable[[], float]] = None):
        if closure is None:
            raise ValueError("DP-SAM needs a closure that reruns forward and backward on the same batch")
        self.pre_step()
        self.original_optimizer.first_step()
        with torch.enable_grad():
            loss = closure()
        self.pre_step()
        self.original_optimizer.second_step()
        return loss
