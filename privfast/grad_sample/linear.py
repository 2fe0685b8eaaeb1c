"""Linear: ``grad W_b = sum_t D[b, t] A[b, t]^T`` over the K augmentations and all leading positions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from privfast.grad_sample.base import Call, ContractionGrads, fold_rows, register_rule, shared_operand


def _positions_last(parts: list[Tensor], fold: int) -> Tensor:
    """``[B*fold, ..., c]`` per call -> ``[B, fold, 1, c, T]``, the calls' positions joined: a view of a
    single call; several calls (a recurrent cell's time steps) are joined positions-major, as one
    call's rows lie, so that the rule's GEMMs read them without another copy."""
    folded = []
    for t in parts:
        f = fold_rows(t, fold)
        folded.append(f.reshape(*f.shape[:2], f.shape[2:-1].numel(), t.shape[-1]))  # [B, fold, T_i, c]
    joined = folded[0] if len(folded) == 1 else torch.cat(folded, dim=2)
    return joined.transpose(2, 3).unsqueeze(2)


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, calls: list[Call], fold: int) -> ContractionGrads:
    """Inputs ``[B*fold, ..., d]`` and output gradients ``[B*fold, ..., p]``."""
    a = _positions_last([c.args[0] for c in calls], fold)
    grads = [c.grads[0] for c in calls]
    # A recurrent cell's two Linear get the same gradient tensors (of the gates they are summed into).
    d = shared_operand(("linear", fold), grads, lambda: _positions_last(grads, fold))
    return ContractionGrads(module.weight, module.bias, a, d)
