"""Fallback for any layer with parameters and no rule: ``torch.func`` over examples.

Each example's ``fold`` rows go through the layer together (vmap over examples, not rows), so
the result is the per-example gradient ``[B, *shape]`` with the K augmentations already summed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_leaves

from privfast.grad_sample.base import Call, MaterializedGrads, fold_rows, trainable


def vmap_rule(module: nn.Module, calls: list[Call], fold: int) -> MaterializedGrads:
    """Per-example gradients of ``module``'s own parameters from its captured calls.

    Tensor positional inputs must be batch-first; other inputs are passed to every example as is.
    """
    named = trainable(module)
    params = {name: p.detach() for name, p in named}
    totals = None
    for call in calls:
        tensor_arg = [isinstance(a, Tensor) and a.dim() > 0 for a in call.args]
        args = tuple(fold_rows(a, fold) if t else a for a, t in zip(call.args, tensor_arg))
        in_dims = tuple(0 if t else None for t in tensor_arg)

        def objective(theta, unit_args, unit_grads, kwargs=call.kwargs):
            outputs = [o for o in tree_leaves(functional_call(module, theta, unit_args, kwargs)) if isinstance(o, Tensor)]
            return sum((o * g).sum() for o, g in zip(outputs, unit_grads) if g is not None)

        grads = [None if g is None else fold_rows(g, fold) for g in call.grads]
        units = next(g.shape[0] for g in grads if g is not None)
        if units == 0:  # vmap cannot map over an empty batch (an empty Poisson sample)
            per_example = {name: p.new_zeros(0, *p.shape) for name, p in params.items()}
        else:
            per_example = vmap(grad(objective), in_dims=(None, in_dims, 0))(params, args, grads)
        totals = per_example if totals is None else {n: totals[n] + per_example[n] for n in totals}
    return MaterializedGrads([p for _, p in named], [totals[name] for name, _ in named])
