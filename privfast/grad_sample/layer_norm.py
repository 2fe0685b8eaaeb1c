"""LayerNorm: ``grad weight_b = sum over rows and leading positions of x_hat * D``, ``grad bias_b = sum of D``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from privfast.grad_sample.base import Call, MaterializedGrads, fold_rows, register_rule


@register_rule(nn.LayerNorm)
def layer_norm_rule(module: nn.LayerNorm, calls: list[Call], fold: int) -> MaterializedGrads:
    """Inputs and output gradients ``[B*fold, ..., *normalized_shape]``; grads ``[B, *normalized_shape]``."""
    weight = module.weight if module.weight is not None and module.weight.requires_grad else None
    bias = module.bias if module.bias is not None and module.bias.requires_grad else None
    shape = module.normalized_shape

    def per_example(t: Tensor) -> Tensor:
        folded = fold_rows(t, fold)  # [B, fold, ..., *normalized_shape]
        return folded.sum(dim=tuple(range(1, folded.dim() - len(shape))))

    totals = None
    for call in calls:
        d = call.grads[0]
        parts = []
        if weight is not None:
            parts.append(per_example(F.layer_norm(call.args[0], shape, eps=module.eps) * d))
        if bias is not None:
            parts.append(per_example(d))
        totals = parts if totals is None else [t + p for t, p in zip(totals, parts)]
    return MaterializedGrads([p for p in (weight, bias) if p is not None], totals)
