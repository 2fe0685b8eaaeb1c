"""GroupNorm: ``grad weight_b[c] = sum over rows and positions of x_hat * D``, ``grad bias_b[c] = sum of D``.

The layer's own backward kernel sums these over its batch; seen as one image whose channels are
every row's channels (and whose groups every row's groups) it gives them per row instead, in one
pass over the input and output gradient with no tensor the size of the activation formed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from privfast.grad_sample.base import Call, MaterializedGrads, register_rule, saved_by_forward


def _statistics(module: nn.GroupNorm, call: Call, x: Tensor) -> tuple[Tensor, Tensor]:
    """The group means and reciprocal standard deviations ``[rows, groups]`` of the call's input ``x``
    (contiguous, as the kernels want it).

    The forward saved them for its backward, and a layer called once runs its rule from the output
    hook, before that backward frees them. Where they are not there (a tapped first layer, a layer
    called twice), the layer's own kernel recomputes them (torch.var_mean is several times slower on CPU).
    """
    saved = saved_by_forward(call, "NativeGroupNormBackward0", "_saved_result1", "_saved_result2")
    if saved is not None:
        return saved
    _, mean, rstd = torch.native_group_norm(
        x, None, None, x.shape[0], module.num_channels, x.shape[2:].numel(), module.num_groups, module.eps
    )
    return mean, rstd


@register_rule(nn.GroupNorm)
def group_norm_rule(module: nn.GroupNorm, calls: list[Call], fold: int) -> MaterializedGrads:
    """Inputs and output gradients ``[B*fold, C, *spatial]``; per-example gradients ``[B, C]``."""
    weight = module.weight if module.weight is not None and module.weight.requires_grad else None
    bias = module.bias if module.bias is not None and module.bias.requires_grad else None
    channels, groups = module.num_channels, module.num_groups
    totals = None
    for call in calls:
        x, d = call.args[0].contiguous(), call.grads[0].contiguous()
        rows, positions = x.shape[0], x.shape[2:].numel()
        mean, rstd = _statistics(module, call, x)
        units = rows * channels
        # The gamma argument only scales the input gradient, which is not asked for; the kernel wants one.
        _, grad_weight, grad_bias = torch.ops.aten.native_group_norm_backward(
            d.view(1, units, positions),
            x.view(1, units, positions),
            mean.reshape(1, -1),
            rstd.reshape(1, -1),
            x.new_ones(units),
            1,
            units,
            positions,
            rows * groups,
            [False, weight is not None, bias is not None],
        )
        parts = [p.reshape(rows // fold, fold, channels).sum(1) for p in (grad_weight, grad_bias) if p is not None]
        totals = parts if totals is None else [t + p for t, p in zip(totals, parts)]
    return MaterializedGrads([p for p in (weight, bias) if p is not None], totals)
