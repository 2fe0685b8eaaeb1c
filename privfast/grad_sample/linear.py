"""Linear: ``grad W_b = sum_r D[b, r]^T A[b, r]`` over the K augmentations and all leading positions."""

from __future__ import annotations

import torch
from torch import nn

from privfast.grad_sample.base import Call, ContractionGrads, fold_rows, register_rule


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, calls: list[Call], fold: int) -> ContractionGrads:
    """Inputs ``[B*fold, ..., d]`` and output gradients ``[B*fold, ..., p]`` become ``[B, 1, R, d|p]``."""

    def rows(t):
        folded = fold_rows(t, fold)
        return folded.reshape(folded.shape[0], 1, folded.shape[1:-1].numel(), t.shape[-1])

    a = torch.cat([rows(c.args[0]) for c in calls], dim=2)
    d = torch.cat([rows(c.grads[0]) for c in calls], dim=2)
    return ContractionGrads(module.weight, module.bias, a, d)
