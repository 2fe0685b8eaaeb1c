"""Conv1d and Conv2d (any groups, stride, padding, padding mode, dilation) as contractions over
the unfolded input: ``grad W_b[g] = sum_t D[b, g, t] A[b, g, t]^T`` with ``t`` over the K
augmentations and the output positions. Conv1d is unfolded as a convolution of height 1.

Materialized per-example gradients come instead from the convolution's own weight-gradient
kernel, run once: a layer with many input channels takes the B examples as groups and the K
augmentations as its batch (the kernel sums over its batch, which is the fold; the rows are
transposed into that layout); a narrow layer takes every row as a group of a batch of one, which
needs no copy of the input or output gradient, and the rows' gradients (small: few input
channels) are summed over the fold after. Unfolding copies the input ``prod(kernel)`` times,
which is slower on CPU.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privfast.grad_sample.base import Call, ContractionGrads, cat_positions, fold_rows, register_rule

Conv = Union[nn.Conv1d, nn.Conv2d]

# Measured on CPU (benchmarks/bench_training.py's ConvNet, K = 16): below this many input channels
# per group the kernel with one group per row is fastest (3 -> 32 channels: 16 ms against 32 ms with
# the examples as groups and 34 ms unfolded); at 32 -> 64 it is the examples as groups (37 ms
# against 52 ms per row and 84 ms unfolded).
GROUPED_KERNEL_MIN_CHANNELS = 16


def _padded(module: Conv, x: Tensor) -> Tensor:
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    return x


def _as_2d(module: Conv, x: Tensor) -> tuple[Tensor, tuple, tuple, tuple]:
    """A Conv1d input as height-1 images, with the kernel, dilation and stride to match."""
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if x.dim() == 3:
        return x.unsqueeze(2), (1, *kernel), (1, *dilation), (1, *stride)
    return x, kernel, dilation, stride


def _unfold(module: Conv, x: Tensor) -> Tensor:
    """``[n, C_in, *spatial] -> [n, G, C_in/G * prod(kernel), T]``."""
    x, kernel, dilation, stride = _as_2d(module, _padded(module, x))
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)
    return cols.reshape(cols.shape[0], module.groups, cols.shape[1] // module.groups, cols.shape[2])


class ConvGrads(ContractionGrads):
    """A convolution's captured calls; the unfolded input is built only when a path needs it."""

    def __init__(self, module: Conv, calls: list[Call], fold: int):
        groups = module.groups
        d = [fold_rows(g.reshape(g.shape[0], groups, g.shape[1] // groups, g.shape[2:].numel()), fold)
             for g in (c.grads[0] for c in calls)]
        super().__init__(module.weight, module.bias, None, cat_positions(d))
        self.module, self.fold = module, fold
        self.inputs, self.outputs_grad = [c.args[0] for c in calls], [c.grads[0] for c in calls]

    @property
    def a(self) -> Tensor:
        if self._a is None:
            self._a = cat_positions([fold_rows(_unfold(self.module, x), self.fold) for x in self.inputs])
        return self._a

    def weight_columns(self) -> int:
        return self.module.weight[0].numel()

    def _weight_per_example(self) -> Tensor:
        module = self.module
        if len(self.inputs) > 1 or self.batch == 0:  # the kernel takes no zero groups
            return super()._weight_per_example()
        x, padding = self.inputs[0], module.padding
        if module.padding_mode != "zeros" or isinstance(padding, str):  # the kernel pads only symmetric zeros
            x, padding = _padded(module, x), (0,) * len(module.kernel_size)
        x, kernel, dilation, stride = _as_2d(module, x)
        padding = (0, *padding) if len(padding) == 1 else padding
        grad = self.outputs_grad[0]
        grad = grad.unsqueeze(2) if grad.dim() == 3 else grad
        b, k = self.batch, self.fold
        per_row = module.in_channels // module.groups < GROUPED_KERNEL_MIN_CHANNELS
        if per_row:
            # [B*K, C, ...] -> [1, B*K*C, ...]: a view; every row's own gradient, then the sum over its fold.
            groups = b * k * module.groups
            x, grad = x.reshape(1, -1, *x.shape[2:]), grad.reshape(1, -1, *grad.shape[2:])
        else:
            # [B*K, C, ...] -> [K, B*C, ...]: the examples become groups, the augmentations the batch.
            groups = b * module.groups
            x = x.reshape(b, k, *x.shape[1:]).transpose(0, 1).reshape(k, b * x.shape[1], *x.shape[2:])
            grad = grad.reshape(b, k, *grad.shape[1:]).transpose(0, 1).reshape(k, b * grad.shape[1], *grad.shape[2:])
        rows_out = groups // module.groups * module.out_channels
        shape_only = grad.new_empty(1).view(1, 1, 1, 1).expand(rows_out, module.weight.shape[1], *kernel)
        _, weight, _ = torch.ops.aten.convolution_backward(
            grad, x, shape_only, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
            [False, True, False],
        )
        return weight.reshape(b, k, -1).sum(1) if per_row else weight

    def release(self) -> None:
        super().release()
        self.inputs = self.outputs_grad = None


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(module: Conv, calls: list[Call], fold: int) -> ConvGrads:
    """Inputs ``[B*fold, C_in, *spatial]`` and output gradients ``[B*fold, C_out, *spatial_out]``."""
    return ConvGrads(module, calls, fold)
