"""LayerNorm: ``grad weight_b = sum over rows and positions of x_hat * D``, ``grad bias_b = sum of D``.

Also the shared affine-normalization rule that GroupNorm uses.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from privfast.grad_sample.base import Call, MaterializedGrads, fold_rows, register_rule


def affine_grads(module: nn.Module, calls: list[Call], fold: int, *, normalize: Callable[[Tensor], Tensor],
                 channel_dim: Optional[int]) -> MaterializedGrads:
    """Per-example gradients of ``y = x_hat * weight + bias``.

    Args:
        normalize: ``x -> x_hat``, the layer without its affine part.
        channel_dim: the dimension the parameters index (GroupNorm: 1), or None when they cover
            the trailing ``weight.dim()`` dimensions (LayerNorm).
    """
    weight = module.weight if module.weight is not None and module.weight.requires_grad else None
    bias = module.bias if module.bias is not None and module.bias.requires_grad else None
    params = [p for p in (weight, bias) if p is not None]
    shape_dims = (module.weight if module.weight is not None else module.bias).dim()

    def per_example(t: Tensor) -> Tensor:
        folded = fold_rows(t, fold)  # [B, fold, ...]: the parameter dims move one to the right
        if channel_dim is not None:
            keep = {channel_dim + 1}
        else:
            keep = set(range(folded.dim() - shape_dims, folded.dim()))
        return folded.sum(dim=[i for i in range(1, folded.dim()) if i not in keep])

    totals: list[Optional[Tensor]] = [None] * len(params)
    for call in calls:
        d = call.grads[0]
        parts = []
        if weight is not None:
            parts.append(per_example(normalize(call.args[0]) * d))
        if bias is not None:
            parts.append(per_example(d))
        totals = [p if t is None else t + p for t, p in zip(totals, parts)]
    return MaterializedGrads(params, totals)


@register_rule(nn.LayerNorm)
def layer_norm_rule(module: nn.LayerNorm, calls: list[Call], fold: int) -> MaterializedGrads:
    """Inputs and output gradients ``[B*fold, ..., *normalized_shape]``; grads ``[B, *normalized_shape]``."""
    return affine_grads(
        module, calls, fold, normalize=lambda x: F.layer_norm(x, module.normalized_shape, eps=module.eps),
        channel_dim=None,
    )
