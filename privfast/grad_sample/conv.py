"""Conv1d and Conv2d (any groups, stride, padding, padding mode, dilation) as contractions over
the unfolded input: ``grad W_b[g] = sum_r D[b, g, r]^T A[b, g, r]`` with ``r`` over the K
augmentations and the output positions. Conv1d is unfolded as a convolution of height 1."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privfast.grad_sample.base import Call, ContractionGrads, fold_rows, register_rule


def _unfold(module: Union[nn.Conv1d, nn.Conv2d], x: Tensor) -> Tensor:
    """``[n, C_in, *spatial] -> [n, G, T, C_in/G * prod(kernel)]``."""
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if x.dim() == 3:
        x, kernel, dilation, stride = x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)
    n, _, positions = cols.shape
    return cols.reshape(n, module.groups, cols.shape[1] // module.groups, positions).transpose(2, 3)


def _grouped_rows(t: Tensor, groups: int, fold: int) -> Tensor:
    """``[B*fold, G, T, c] -> [B, G, fold*T, c]``."""
    folded = fold_rows(t, fold)
    b, _, g, positions, c = folded.shape
    return folded.transpose(1, 2).reshape(b, g, fold * positions, c)


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(module: Union[nn.Conv1d, nn.Conv2d], calls: list[Call], fold: int) -> ContractionGrads:
    """Inputs ``[B*fold, C_in, *spatial]`` and output gradients ``[B*fold, C_out, *spatial_out]``."""
    groups = module.groups
    a_parts, d_parts = [], []
    for call in calls:
        a_parts.append(_grouped_rows(_unfold(module, call.args[0]), groups, fold))
        grad = call.grads[0]
        d = grad.reshape(grad.shape[0], groups, grad.shape[1] // groups, grad.shape[2:].numel()).transpose(2, 3)
        d_parts.append(_grouped_rows(d, groups, fold))
    return ContractionGrads(module.weight, module.bias, torch.cat(a_parts, dim=2), torch.cat(d_parts, dim=2))
