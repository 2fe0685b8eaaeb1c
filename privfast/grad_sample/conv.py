"""Conv1d and Conv2d (any groups, stride, padding, padding mode, dilation) as contractions over
the unfolded input: ``grad W_b[g] = sum_t D[b, g, t] A[b, g, t]^T`` with ``t`` over the K
augmentations and the output positions. Conv1d is unfolded as a convolution of height 1."""

from __future__ import annotations

from typing import Union

import torch.nn.functional as F
from torch import Tensor, nn

from privfast.grad_sample.base import Call, ContractionGrads, cat_positions, fold_rows, register_rule


def _unfold(module: Union[nn.Conv1d, nn.Conv2d], x: Tensor) -> Tensor:
    """``[n, C_in, *spatial] -> [n, G, C_in/G * prod(kernel), T]``."""
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if x.dim() == 3:
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)
    return cols.reshape(cols.shape[0], module.groups, cols.shape[1] // module.groups, cols.shape[2])


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(module: Union[nn.Conv1d, nn.Conv2d], calls: list[Call], fold: int) -> ContractionGrads:
    """Inputs ``[B*fold, C_in, *spatial]`` and output gradients ``[B*fold, C_out, *spatial_out]``."""
    groups = module.groups
    a = [fold_rows(_unfold(module, c.args[0]), fold) for c in calls]
    d = [fold_rows(g.reshape(g.shape[0], groups, g.shape[1] // groups, g.shape[2:].numel()), fold)
         for g in (c.grads[0] for c in calls)]
    return ContractionGrads(module.weight, module.bias, cat_positions(a), cat_positions(d))
