"""Fallback for any layer with parameters and no rule: ``torch.func`` over examples.

Each example's ``fold`` rows go through the layer together (vmap over examples, not rows), so
the result is the per-example gradient ``[B, *shape]`` with the K augmentations already summed.
The examples may sit in any dimension of each tensor (``Call.arg_dims``, ``Call.out_dims``): the
fold splits that dimension and vmap maps over it, so the layer sees its own layout with ``fold``
rows. Outputs that received no gradient (an unused ``h_n``) are left out of the objective.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_leaves

from privfast.grad_sample.base import Call, MaterializedGrads, trainable


def _fold_at(t: Tensor, dim: int, fold: int) -> Tensor:
    """``[..., N, ...] -> [..., N / fold, fold, ...]`` at ``dim``: an example's rows are contiguous there."""
    return t.reshape(*t.shape[:dim], t.shape[dim] // fold, fold, *t.shape[dim + 1 :])


def vmap_rule(module: nn.Module, calls: list[Call], fold: int) -> MaterializedGrads:
    """Per-example gradients of ``module``'s own parameters from its captured calls.

    Tensor inputs with an example dimension (``arg_dims``) are split per example; other inputs
    are passed to every example as they are.
    """
    named = trainable(module)
    params = {name: p.detach() for name, p in named}
    totals = None
    for call in calls:
        args = tuple(a if d is None else _fold_at(a, d, fold) for a, d in zip(call.args, call.arg_dims))
        kwargs = {
            k: v if call.kwarg_dims.get(k) is None else _fold_at(v, call.kwarg_dims[k], fold)
            for k, v in call.kwargs.items()
        }
        used = [i for i, g in enumerate(call.grads) if g is not None]
        grads = [_fold_at(call.grads[i], call.out_dims[i], fold) for i in used]

        def objective(theta, unit_args, unit_kwargs, unit_grads):
            outputs = [
                o for o in tree_leaves(functional_call(module, theta, unit_args, unit_kwargs)) if isinstance(o, Tensor)
            ]
            return sum((outputs[i] * g).sum() for i, g in zip(used, unit_grads))

        units = call.rows // fold
        if units == 0:  # vmap cannot map over an empty batch (an empty Poisson sample)
            per_example = {name: p.new_zeros(0, *p.shape) for name, p in params.items()}
        else:
            in_dims = (
                None,
                tuple(call.arg_dims),
                {k: call.kwarg_dims.get(k) for k in kwargs},
                [call.out_dims[i] for i in used],
            )
            # The layer's calls under autocast run under it again: its gradients are those of what it computed.
            precision = torch.autocast(*call.autocast) if call.autocast else contextlib.nullcontext()
            with precision:
                per_example = vmap(grad(objective), in_dims=in_dims)(params, args, kwargs, grads)
        totals = per_example if totals is None else {n: totals[n] + per_example[n] for n in totals}
    return MaterializedGrads([p for _, p in named], [totals[name] for name, _ in named])
