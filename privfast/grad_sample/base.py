"""What a layer rule hands the engine: one layer's per-example gradient information for one batch.

Shapes: B examples (units of ``fold`` contiguous rows: the K augmentations of one example, times
the microbatch size), ``R`` rows of a contraction per example (K * positions), G groups.

A rule turns the captured layer inputs and output gradients into a :class:`LayerGrads`, which
offers the per-example squared norms and the clipped sum in up to two ways:

- ``"materialize"``: build the per-example gradients ``[B, *shape]`` and reduce them;
- ``"ghost"``: norms from Gram matrices and the clipped sum as one contraction ``A^T (c * D)``,
  never holding a per-example gradient (only rules that return a cost for it support it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from privfast import ops

MATERIALIZE = "materialize"
GHOST = "ghost"


@dataclass
class Call:
    """One forward call of a layer: its positional and keyword inputs, then its output gradients."""

    args: tuple
    kwargs: dict
    grads: Optional[list[Tensor]] = field(default=None)


class LayerGrads:
    """Per-example gradients of one layer's parameters, computed on demand.

    Subclasses implement :meth:`per_example`; those that can avoid materializing also override
    :meth:`ghost_cost`, :meth:`_ghost_norm_sq` and :meth:`_contract`.
    """

    def __init__(self, params: Sequence[nn.Parameter], batch: int):
        self.params = list(params)
        self.batch = batch
        self._per_example: Optional[list[Tensor]] = None

    # -- costs (multiply-adds), used to pick a strategy per layer --------------------------
    def materialize_cost(self) -> float:
        """Cost of building ``[B, *shape]`` for every parameter."""
        return self.reduce_cost()

    def reduce_cost(self) -> float:
        """Cost of one pass over the materialized ``[B, *shape]`` (a norm or a weighted sum)."""
        return float(self.batch * sum(p.numel() for p in self.params))

    def ghost_cost(self) -> float:
        """Cost of the Gram-matrix norms; ``inf`` where the rule has none."""
        return math.inf

    def contract_cost(self) -> float:
        """Cost of the clipped sum as one contraction; ``inf`` where the rule has none."""
        return math.inf

    # -- results ----------------------------------------------------------------------------
    def per_example(self) -> list[Tensor]:
        """Per-example gradients, ``[B, *p.shape]`` for each parameter (computed once)."""
        if self._per_example is None:
            self._per_example = self._compute_per_example()
        return self._per_example

    def _compute_per_example(self) -> list[Tensor]:
        raise NotImplementedError

    def norm_sq(self, how: str) -> Tensor:
        """``[B]`` squared per-example norms over this layer's parameters."""
        if how == GHOST:
            return self._ghost_norm_sq()
        return ops.per_sample_norms(self.per_example()).pow(2)

    def clipped_sum(self, weights: Tensor, how: str) -> list[Tensor]:
        """``sum_b weights[b] * G[b]`` for each parameter; ``weights`` is ``[B]``."""
        if how == GHOST:
            return self._contract(weights)
        return [torch.tensordot(weights.to(g.dtype), g, dims=1) for g in self.per_example()]

    def _ghost_norm_sq(self) -> Tensor:
        raise NotImplementedError

    def _contract(self, weights: Tensor) -> list[Tensor]:
        raise NotImplementedError


class MaterializedGrads(LayerGrads):
    """A layer whose per-example gradients are small or have no cheaper form (norms, fallback)."""

    def __init__(self, params: Sequence[nn.Parameter], per_example: list[Tensor]):
        super().__init__(params, per_example[0].shape[0])
        self._per_example = per_example


class ContractionGrads(LayerGrads):
    """A layer whose weight gradient is ``sum_r D_r^T A_r`` (Linear, Conv): K folds into ``r``.

    Args:
        weight, bias: the layer's parameters (``bias`` may be None or frozen).
        a: inputs ``[B, G, R, d]`` (unfolded for convolutions).
        d: output gradients ``[B, G, R, p]``.
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], a: Tensor, d: Tensor):
        self.weight = weight if weight.requires_grad else None
        self.bias = bias if bias is not None and bias.requires_grad else None
        super().__init__([p for p in (self.weight, self.bias) if p is not None], a.shape[0])
        self.a, self.d = a, d

    def _bias_per_example(self) -> Tensor:
        return self.d.sum(2).flatten(1)

    def materialize_cost(self) -> float:
        b, g, r, d = self.a.shape
        return float(b * g * r * d * self.d.shape[-1])

    def ghost_cost(self) -> float:
        b, g, r, d = self.a.shape
        return float(b * g * r * r * (d + self.d.shape[-1]))

    def contract_cost(self) -> float:
        return self.materialize_cost()

    def _compute_per_example(self) -> list[Tensor]:
        out = []
        if self.weight is not None:
            out.append(torch.matmul(self.d.transpose(-1, -2), self.a).reshape(self.batch, *self.weight.shape))
        if self.bias is not None:
            out.append(self._bias_per_example())
        return out

    def _ghost_norm_sq(self) -> Tensor:
        total = self.a.new_zeros(self.batch)
        if self.weight is not None:
            gram_a = torch.matmul(self.a, self.a.transpose(-1, -2))
            gram_d = torch.matmul(self.d, self.d.transpose(-1, -2))
            total = total + (gram_a * gram_d).sum(dim=(1, 2, 3))
        if self.bias is not None:
            total = total + self._bias_per_example().pow(2).sum(1)
        return total

    def _contract(self, weights: Tensor) -> list[Tensor]:
        b, g, r, p = self.d.shape
        out = []
        if self.weight is not None:
            # [G, p, B*R] @ [G, B*R, d]: the clipped sum is one GEMM per group.
            dw = (self.d * weights.to(self.d.dtype).view(b, 1, 1, 1)).permute(1, 3, 0, 2).reshape(g, p, b * r)
            a = self.a.permute(1, 0, 2, 3).reshape(g, b * r, self.a.shape[-1])
            out.append(torch.bmm(dw, a).reshape(self.weight.shape))
        if self.bias is not None:
            out.append(torch.mv(self._bias_per_example().t(), weights.to(self.d.dtype)).reshape(self.bias.shape))
        return out


Rule = Callable[[nn.Module, list[Call], int], LayerGrads]
"""``rule(module, calls, fold) -> LayerGrads``; ``calls[i].grads`` are already loss-scaled."""

RULES: dict[type, Rule] = {}


def register_rule(*module_types: type) -> Callable[[Rule], Rule]:
    """Register ``rule`` for exactly these module types (subclasses fall back to vmap)."""

    def decorate(rule: Rule) -> Rule:
        for t in module_types:
            RULES[t] = rule
        return rule

    return decorate


def fold_rows(t: Tensor, fold: int) -> Tensor:
    """``[B*fold, *rest] -> [B, fold, *rest]``: the rows of one example are contiguous."""
    return t.reshape(t.shape[0] // fold, fold, *t.shape[1:])


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's own (non-recursive) parameters that require a gradient."""
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
