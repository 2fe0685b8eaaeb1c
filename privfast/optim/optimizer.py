"""DPOptimizer: any torch optimizer made private with the per-example gradient engine.

Opacus's names and step protocol (``signal_skip_step`` for physical batches, ``attach_step_hook``
for the accountant), with the clipping done by :class:`~privfast.grad_sample.GradSampleModule`
and the noise added once per logical step by the fused op.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from privfast import ops
from privfast.grad_sample import GradSampleModule


def check_privacy_args(noise_multiplier: float, max_grad_norm: float) -> None:
    """Raise ValueError unless ``0 <= noise_multiplier < inf`` and ``0 < max_grad_norm < inf`` (NaN fails both)."""
    if isinstance(max_grad_norm, (list, tuple)):
        raise ValueError(
            f"max_grad_norm must be one bound, got {max_grad_norm!r}: each example's whole gradient is clipped to it "
            "(Opacus's clipping='flat'); per-layer bounds are not supported"
        )
    if not (0 <= noise_multiplier < math.inf):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not (0 < max_grad_norm < math.inf):
        raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")


class DPOptimizer(Optimizer):
    """Clips per-example gradients, sums them, adds Gaussian noise and steps the wrapped optimizer.

    The update written to ``p.grad`` is ``scale * (sum_b clip_C(G_b) + sigma * C * z)`` with
    ``scale = microbatch_size / expected_batch_size`` for a mean loss (1 for a sum), ``G_b`` the
    gradient of example b averaged over its K augmentations (or of a microbatch, averaged over its
    examples) and ``z ~ N(0, I)``. Works around any optimizer (SGD, Adam, RMSprop, ...).

    Args:
        optimizer: the optimizer to make private; its parameters must belong to ``module``.
        module: the wrapped model whose backward passes feed this optimizer.
        noise_multiplier: sigma >= 0.
        max_grad_norm: the clipping bound C > 0.
        expected_batch_size: expected examples per logical batch (required for a mean loss).
        loss_reduction: ``"mean"`` or ``"sum"``, as the loss reduces over rows.
        generator: source of the noise keys; its state is the noise counter to checkpoint.
        secure_mode: key the noise from the operating system's entropy instead.
        check_finite: raise on a non-finite per-example gradient instead of stepping (one sync).

    Raises:
        ValueError: on a negative or non-finite noise multiplier, a non-positive clipping bound or
            batch size, or an unknown loss reduction.
    """

    releases_per_step = 1  # Gaussian releases (accountant steps) per optimizer step

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        module: GradSampleModule,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: Optional[int],
        loss_reduction: str = "mean",
        generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
        check_finite: bool = True,
    ):
        check_privacy_args(noise_multiplier, max_grad_norm)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if loss_reduction != module.loss_reduction:
            raise ValueError(f"loss_reduction {loss_reduction!r} differs from the module's {module.loss_reduction!r}")
        if loss_reduction == "mean" and not (expected_batch_size is not None and expected_batch_size > 0):
            raise ValueError(f"a mean loss needs expected_batch_size > 0, got {expected_batch_size}")
        self.original_optimizer = optimizer
        self.module = module
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self.generator = generator
        self.secure_mode = secure_mode
        self.check_finite = check_finite
        self.step_hook: Optional[Callable[[DPOptimizer], None]] = None
        self.audit_canary = None  # white-box audit (privfast.auditing.GradientCanary), see add_noise
        self._step_skip_queue: list[bool] = []
        self._is_last_step_skipped = False
        self._summed: dict[nn.Parameter, Tensor] = {}
        owned = set(module.parameters())
        if any(p not in owned for p in self.params):
            raise ValueError(
                "the optimizer holds parameters that are not the module's: build it from model.parameters()"
            )
        stepped = set(self.params)
        idle = [name for name, p in module.named_parameters() if p.requires_grad and p not in stepped]
        if idle:
            warnings.warn(
                f"the optimizer leaves out {len(idle)} trainable parameter(s) of the model (e.g. {idle[0]!r}): their "
                "per-example gradients are still computed and count in each example's norm, so every example is "
                "clipped harder than the updated parameters need (Opacus leaves them out of the norm). Freeze them "
                "with requires_grad_(False) before make_private to train only the optimizer's parameters.",
                stacklevel=2,
            )

    # -- the wrapped optimizer's view ---------------------------------------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    @property
    def params(self) -> list[nn.Parameter]:
        """The trainable parameters, in the optimizer's order."""
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self):
        return f"DPOptimizer({self.original_optimizer!r})"

    # -- privacy ------------------------------------------------------------------------------
    @property
    def sensitivity(self) -> int:
        """How many C one example can move the clipped sum by: 2 with microbatches (one example
        shifts its microbatch's clipped mean from one end of the C-ball to the other), else 1."""
        return 2 if self.module.microbatch_size > 1 else 1

    @property
    def accounting_noise_multiplier(self) -> float:
        """The noise multiplier the accountant sees: ``sigma / sensitivity``."""
        return self.noise_multiplier / self.sensitivity

    @property
    def noise_scale(self) -> float:
        """What the noisy sum is multiplied by: ``1 / expected clipped units`` for a mean loss."""
        if self.loss_reduction == "sum":
            return 1.0
        return self.module.microbatch_size / self.expected_batch_size

    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]) -> None:
        """Call ``fn(self)`` after every noisy step (the accountant's hook)."""
        self.step_hook = fn

    def attach_audit_canary(self, canary) -> None:
        """Audit option: ``canary.insert(self, sums)`` adds its clipped gradients to the sum before the noise and
        ``canary.record(self)`` reads the released ``p.grad`` after it (:class:`privfast.auditing.GradientCanary`)."""
        self.audit_canary = canary

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Make the next ``step()`` only clip and accumulate (a physical batch of a larger logical one)."""
        self._step_skip_queue.append(do_skip)

    def _check_skip_next_step(self) -> bool:
        return self._step_skip_queue.pop(0) if self._step_skip_queue else False

    def clip_and_accumulate(self) -> None:
        """Add this physical batch's clipped per-example sum to the logical batch's."""
        for p, s in self.module.clipped_sum(self.max_grad_norm, check_finite=self.check_finite).items():
            self._summed[p] = self._summed[p] + s if p in self._summed else s

    def add_noise(self) -> None:
        """Write ``p.grad = scale * (clipped sum + sigma * C * z)`` for all parameters in one fused call."""
        params = self.params
        if self.audit_canary is not None:
            self.audit_canary.insert(self, self._summed)
        sums = [(self._summed[p] if p in self._summed else torch.zeros_like(p)).unsqueeze(0) for p in params]
        noisy = ops.clip_accumulate_noise(
            sums,
            math.inf,
            noise_std=self.noise_multiplier * self.max_grad_norm,
            scale=self.noise_scale,
            generator=self.generator,
            secure_mode=self.secure_mode,
            check_finite=False,
        )
        for p, g in zip(params, noisy):
            p.grad = g.to(p.dtype).view_as(p)
        if self.audit_canary is not None:
            self.audit_canary.record(self)
        self._summed = {}

    def pre_step(self) -> bool:
        """Clip and accumulate; at the end of a logical batch also add noise and run the step hook.

        Returns:
            Whether the wrapped optimizer should step now.
        """
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        if self.step_hook is not None:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def step(self, closure: Optional[Callable[[], float]] = None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        return self.original_optimizer.step() if self.pre_step() else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` and the capture; the accumulated sum survives a skipped (physical) step."""
        self.module.clear()
        if not self._is_last_step_skipped:
            self._summed = {}
        self.original_optimizer.zero_grad(set_to_none)
