"""GroupNorm: ``grad weight_b[c] = sum over rows and positions of x_hat * D``, ``grad bias_b[c] = sum of D``.

With ``x_hat = (x - mu_g) * rstd_g`` the weight gradient is ``(sum x*D - mu_g * sum D) * rstd_g``
per channel: the sums are batched dot products, so no tensor the size of the activation is formed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from privfast.grad_sample.base import Call, MaterializedGrads, register_rule


def _statistics(module: nn.GroupNorm, call: Call, rows: int, positions: int) -> tuple[Tensor, Tensor]:
    """The group means and reciprocal standard deviations ``[rows, groups]`` of the call's input.

    The forward saved them for its backward, and the rule runs from the output hook, before that
    backward frees them; a first layer's output is tapped (its node is not the layer's), so there
    the layer's own kernel recomputes them (torch.var_mean is several times slower on CPU).
    """
    node = call.grad_fns[0] if call.grad_fns else None
    if type(node).__name__ == "NativeGroupNormBackward0":
        return node._saved_result1, node._saved_result2
    _, mean, rstd = torch.native_group_norm(call.args[0], None, None, rows, module.num_channels, positions,
                                            module.num_groups, module.eps)
    return mean, rstd


@register_rule(nn.GroupNorm)
def group_norm_rule(module: nn.GroupNorm, calls: list[Call], fold: int) -> MaterializedGrads:
    """Inputs and output gradients ``[B*fold, C, *spatial]``; per-example gradients ``[B, C]``."""
    weight = module.weight if module.weight is not None and module.weight.requires_grad else None
    bias = module.bias if module.bias is not None and module.bias.requires_grad else None
    channels, groups = module.num_channels, module.num_groups
    totals = None
    for call in calls:
        x, d = call.args[0], call.grads[0]
        rows, positions = x.shape[0], x.shape[2:].numel()
        x, d = x.reshape(rows, channels, positions), d.reshape(rows, channels, positions)
        sum_d = d.sum(2)
        parts = []
        if weight is not None:
            mean, rstd = _statistics(module, call, rows, positions)
            mean, rstd = (t.reshape(rows, groups).repeat_interleave(channels // groups, dim=1) for t in (mean, rstd))
            sum_xd = torch.bmm(x.reshape(rows * channels, 1, positions),
                               d.reshape(rows * channels, positions, 1)).view(rows, channels)
            parts.append((sum_xd - mean * sum_d) * rstd)
        if bias is not None:
            parts.append(sum_d)
        parts = [p.reshape(rows // fold, fold, channels).sum(1) for p in parts]
        totals = parts if totals is None else [t + p for t, p in zip(totals, parts)]
    return MaterializedGrads([p for p in (weight, bias) if p is not None], totals)
