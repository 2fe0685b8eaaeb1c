"""LayerNorm and RMSNorm: ``grad weight_b = sum over rows and leading positions of x_hat * D``,
``grad bias_b = sum of D`` (``x_hat`` the input normalized without the affine part)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from privfast.grad_sample.base import Call, MaterializedGrads, fold_rows, register_rule


def _normalized(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    return F.rms_norm(x, module.normalized_shape, eps=module.eps)


@register_rule(nn.LayerNorm, nn.RMSNorm)
def layer_norm_rule(module: nn.Module, calls: list[Call], fold: int) -> MaterializedGrads:
    """Inputs and output gradients ``[B*fold, ..., *normalized_shape]``; grads ``[B, *normalized_shape]``."""
    weight = module.weight if module.weight is not None and module.weight.requires_grad else None
    bias = getattr(module, "bias", None)
    bias = bias if bias is not None and bias.requires_grad else None
    shape = module.normalized_shape

    def per_example(t: Tensor) -> Tensor:
        folded = fold_rows(t, fold)  # [B, fold, ..., *normalized_shape]
        return folded.sum(dim=tuple(range(1, folded.dim() - len(shape))))

    totals = None
    for call in calls:
        d = call.grads[0]
        parts = []
        if weight is not None:
            parts.append(per_example(_normalized(module, call.args[0]) * d))
        if bias is not None:
            parts.append(per_example(d))
        totals = parts if totals is None else [t + p for t, p in zip(totals, parts)]
    return MaterializedGrads([p for p in (weight, bias) if p is not None], totals)
