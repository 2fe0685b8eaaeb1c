"""LayerNorm and RMSNorm: ``grad weight_b = sum over rows and leading positions of x_hat * D``,
``grad bias_b = sum of D`` (``x_hat`` the input normalized without the affine part)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from privfast.grad_sample.base import Call, MaterializedGrads, fold_rows, register_rule, saved_by_forward


def _normalized(module: nn.Module, call: Call) -> Tensor:
    """The call's input normalized, without the affine part."""
    x = call.args[0]
    if not isinstance(module, nn.LayerNorm):
        return F.rms_norm(x, module.normalized_shape, eps=module.eps)
    # With the statistics the forward saved for its backward, normalizing is one pass over x instead of
    # F.layer_norm's recomputation (benchmarks/RESULTS.md, "The LayerNorm rule").
    saved = saved_by_forward(call, "NativeLayerNormBackward0", "_saved_result1", "_saved_result2")
    if saved is None:
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    mean, rstd = (t.movedim(call.moved, 0) for t in saved)  # as the engine moved x's example dimension first
    return ((x - mean) * rstd).to(x.dtype)


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
            parts.append(per_example(_normalized(module, call) * d))
        if bias is not None:
            parts.append(per_example(d))
        totals = parts if totals is None else [t + p for t, p in zip(totals, parts)]
    return MaterializedGrads([p for p in (weight, bias) if p is not None], totals)
