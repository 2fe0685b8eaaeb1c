"""Conv1d and Conv2d (any groups, stride, padding, padding mode, dilation) as contractions over
the unfolded input: ``grad W_b[g] = sum_t D[b, g, t] A[b, g, t]^T`` with ``t`` over the K
augmentations and the output positions. Conv1d is unfolded as a convolution of height 1.

Ghost norms unfold the input (a copy ``prod(kernel)`` times its size). The clipped sum comes
from the convolution's own weight-gradient kernel, which sums over its batch, in one run over all
rows, each scaled by its example's clip factor; on a few rows whose input is unfolded already it is
one GEMM per row instead (see CONTRACT_LOOP_MAX_ROWS). The per-example gradients come from that kernel too,
except on the CPU for a layer with few output positions or few input channels, where they are batched
GEMMs over the unfolded input (see UNFOLD_MAX_POSITIONS, UNFOLD_NARROW). With the kernel, a narrow
layer runs it once with every row as a group of a batch of one (a view; the rows' gradients, small
with few input channels, are summed over the fold after) and a wider one runs it once per example
with the example's fold rows as the batch (contiguous: no copy).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privfast.grad_sample.base import (
    Call,
    ContractionGrads,
    LayerGrads,
    Workspace,
    cat_positions,
    fold_rows,
    register_rule,
)

Conv = Union[nn.Conv1d, nn.Conv2d]

# Below this many input channels per group one weight-gradient run with a group per row is fastest
# on CPU; from it on, one run per example on its contiguous fold rows, which needs no transposed
# copies (the timings that set it: benchmarks/RESULTS.md, "Notes moved from docstrings"). With
# fold 1 the rows are the examples, and one run with a group per row does it without a copy.
PER_EXAMPLE_MIN_CHANNELS = 8

# At or below this many output positions per row, a convolution's per-example weight gradients on the
# CPU are the unfolded input times the output gradients in batched GEMMs: there the weight-gradient
# kernel, run with one group per example, spends more on its many small groups than on the arithmetic
# (4x slower on WRN-16-4's 8x8 stage with 256 channels, 6x on a 16 -> 32 channel conv at 4x4), while
# from 16x16 on it is as fast or faster (benchmarks/RESULTS.md).
UNFOLD_MAX_POSITIONS = 64

# On the CPU an ungrouped layer with fewer than PER_EXAMPLE_MIN_CHANNELS input channels (a first layer on
# RGB images) is unfolded at any number of positions: its unfolded input is small, and the GEMMs over it
# ran 1.3-2.3x faster than the kernel with a group per row (benchmarks/RESULTS.md). False: the kernel.
UNFOLD_NARROW = True

# Device types whose weight-gradient runs get a dense placeholder weight in kept memory: oneDNN copies a
# stride-0 view into a dense weight on every call (copies x the weight). Elsewhere the stride-0 view,
# which cuDNN reads without a copy; _EXPANDED_WEIGHT_OK records a backend that refuses it.
_DENSE_PLACEHOLDER_DEVICES = {"cpu"}
_EXPANDED_WEIGHT_OK: dict[str, bool] = {}
# Per (device, dtype): the kept memory of the dense placeholder weights.
_PLACEHOLDERS: dict[tuple, Workspace] = {}


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
    """``[n, C_in, *spatial] -> [n, G, C_in/G * prod(kernel), T]``, what ``F.unfold`` gives.

    A strided view of the padded input copied once (a parallel copy), instead of ``F.unfold``'s im2col,
    which is slower on the CPU (benchmarks/RESULTS.md).
    """
    x, (kh, kw), (dh, dw), (sh, sw) = _as_2d(module, _padded(module, x))
    n, c, h, w = x.shape
    rows, cols = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    sn, sc, sy, sx = x.stride()
    patches = x.as_strided((n, c, kh, kw, rows, cols), (sn, sc, sy * dh, sx * dw, sy * sh, sx * sw))
    return patches.reshape(n, module.groups, c // module.groups * kh * kw, rows * cols)


def _placeholder(shape: tuple, like: Tensor) -> Tensor:
    """A dense tensor of ``shape`` whose values do not matter, in memory kept for the next call."""
    workspace = _PLACEHOLDERS.setdefault((like.device, like.dtype), Workspace())
    return workspace.take([shape], like.dtype, like.device)[0]


def _weight_gradient(module: Conv, x: Tensor, grad: Tensor, copies: int = 1) -> Tensor:
    """The layer's weight gradient summed over the batch of ``x`` and ``grad``.

    ``copies``: the channels hold that many instances of the layer side by side (``[1, n * C_in, ...]``
    for one per row), whose gradients come out stacked: ``[copies * C_out, C_in / groups, *kernel]``.
    """
    padding = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):  # the kernel pads only symmetric zeros
        x, padding = _padded(module, x), (0,) * len(module.kernel_size)
    x, kernel, dilation, stride = _as_2d(module, x)
    padding = (0, *padding) if len(padding) == 1 else padding
    grad = grad.unsqueeze(2) if grad.dim() == 3 else grad
    shape = (copies * module.out_channels, module.weight.shape[1], *kernel)
    args = (list(stride), list(padding), list(dilation), False, [0, 0], copies * module.groups, [False, True, False])
    # Only the weight's shape is read when just the weight gradient is asked for.
    if grad.device.type in _DENSE_PLACEHOLDER_DEVICES:
        return torch.ops.aten.convolution_backward(grad, x, _placeholder(shape, grad), None, *args)[1]
    if _EXPANDED_WEIGHT_OK.get(grad.device.type, True):
        # A stride-0 view spares allocating copies x the weight (B*K x it for one copy per row).
        shape_only = grad.new_empty(1).view(1, 1, 1, 1).expand(shape)
        try:
            return torch.ops.aten.convolution_backward(grad, x, shape_only, None, *args)[1]
        except RuntimeError:
            # A backend (e.g. a cuDNN version) that wants a dense weight: allocate one from now on. Any
            # other error recurs with the dense weight below and surfaces there.
            _EXPANDED_WEIGHT_OK[grad.device.type] = False
    return torch.ops.aten.convolution_backward(grad, x, grad.new_empty(shape), None, *args)[1]


# The most rows (B*K) whose clipped sum over an unfolded input is one GEMM per row rather than the
# weight-gradient kernel: on more rows the kernel's one run over the batch is the faster (benchmarks/RESULTS.md,
# "The clipped sum over the unfolded input").
CONTRACT_LOOP_MAX_ROWS = 8


class ConvGrads(ContractionGrads):
    """A convolution's captured calls; the unfolded input is built only for ghost norms."""

    # As for a Linear (ContractionGrads.ghost_margin), timed alone the materialized strategy reads its
    # per-example gradients while they are in cache, which in the step come from memory: layers that timed
    # ghost a little slower made the step faster with it, and those at about 2x and more slower
    # (benchmarks/RESULTS.md, "A convolution's ghost margin").
    ghost_margin = 1.5

    def __init__(self, module: Conv, calls: list[Call], fold: int):
        groups = module.groups
        d = [
            fold_rows(g.reshape(g.shape[0], groups, g.shape[1] // groups, g.shape[2:].numel()), fold)
            for g in (c.grads[0] for c in calls)
        ]
        super().__init__(module.weight, module.bias, None, cat_positions(d))
        self.module, self.fold = module, fold
        self.inputs, self.outputs_grad = [c.args[0] for c in calls], [c.grads[0] for c in calls]

    @property
    def a(self) -> Tensor:
        if self._a is None:
            self._a = cat_positions([fold_rows(_unfold(self.module, x), self.fold) for x in self.inputs])
        return self._a

    def weight_columns(self) -> int:
        return math.prod(self.module.weight.shape[1:])

    def _unfolds(self) -> bool:
        """Whether the per-example gradients are GEMMs over the unfolded input (see UNFOLD_MAX_POSITIONS and
        UNFOLD_NARROW)."""
        if self.inputs[0].device.type != "cpu":
            return False
        narrow = self.module.groups == 1 and self.module.in_channels < PER_EXAMPLE_MIN_CHANNELS
        return (UNFOLD_NARROW and narrow) or self.outputs_grad[0].shape[2:].numel() <= UNFOLD_MAX_POSITIONS

    def _weight_gemm(self, scale: float = 1.0, out: Optional[Tensor] = None) -> Tensor:
        b, g, _, d, p = self._dims()
        k = self.fold
        if k == 1 or g != 1:
            return super()._weight_gemm(scale, out)
        # One batched GEMM per augmentation, accumulating: joining an example's K rows into one operand
        # would copy both the unfolded input and the output gradients first, which cost more than the
        # arithmetic (WRN-16-4's 8x8 stage at K = 4: 6.9 against 5.5 ms a layer, benchmarks/RESULTS.md).
        a, dd = self.a, self.d  # [B, K, 1, d, T], [B, K, 1, p, T]
        out = dd.new_empty(b, p, d) if out is None else out.view(b, p, d)
        for j in range(k):
            torch.baddbmm(out, dd[:, j, 0], a[:, j, 0].transpose(1, 2), beta=0 if j == 0 else 1, alpha=scale, out=out)
        return out

    def scaled_per_example(self, scale: float, workspace=None) -> list[Tensor]:
        if self._unfolds():  # GEMMs: the scale rides on their alpha, the result goes to the workspace
            return super().scaled_per_example(scale, workspace)
        # Convolution backwards, not one GEMM with an alpha: scaled in place.
        return LayerGrads.scaled_per_example(self, scale, workspace)

    def _per_row(self) -> bool:
        # Off the CPU, one run per example would be a Python loop of B kernel launches: one grouped run there.
        return (
            self.fold == 1
            or self.inputs[0].device.type != "cpu"
            or self.module.in_channels // self.module.groups < PER_EXAMPLE_MIN_CHANNELS
        )

    def materialize_cost(self) -> float:
        b, g, r, d, p = self._dims()
        if self._unfolds():
            return super().materialize_cost() + b * g * r * d  # the GEMM and the unfolding
        partials = b * self.fold * g * d * p if self._per_row() else 0  # the rows' gradients, summed over the fold
        return super().materialize_cost() + partials

    def ghost_cost(self) -> float:
        b, g, r, d, p = self._dims()
        return super().ghost_cost() + b * g * r * (2 * d + p)  # unfolding, then both operands copied into rows

    def contract_cost(self) -> float:
        scaled = sum(min(x.numel(), grad.numel()) for x, grad in zip(self.inputs, self.outputs_grad))
        return super().materialize_cost() + scaled

    def _weight_per_example(self) -> Tensor:
        if self.batch == 0 or self._unfolds():  # the kernel takes no zero groups
            return self._weight_gemm()
        module, b, k = self.module, self.batch, self.fold
        if self._per_row():
            # [B*K, C, ...] -> [1, B*K*C, ...]: a view; every row's own gradient, then the sum over its fold.
            rows = (
                _weight_gradient(
                    module, x.reshape(1, -1, *x.shape[2:]), grad.reshape(1, -1, *grad.shape[2:]), copies=b * k
                ).reshape(b, k, -1)
                for x, grad in zip(self.inputs, self.outputs_grad)
            )
            parts = (r[:, 0] if k == 1 else r.sum(1) for r in rows)  # a sum over one row would be a copy
        else:
            parts = (
                torch.stack([_weight_gradient(module, *rows) for rows in zip(x.split(k), grad.split(k))])
                for x, grad in zip(self.inputs, self.outputs_grad)
            )
        return functools.reduce(torch.add, parts)

    def _weight_contract(self, weights: Tensor) -> Tensor:
        b, g, _, d, p = self._dims()
        k = self.fold
        if self._a is not None and self._unfolds() and b * k <= CONTRACT_LOOP_MAX_ROWS:
            # The input is unfolded already (for the ghost norms or the per-example GEMMs): on a few rows, GEMMs
            # over it, one per row with its clip factor as alpha, beat the weight-gradient kernel, and joining
            # the rows into one operand would first copy the unfolded input.
            a, dd = self.a, self.d  # [B, K, G, d, T], [B, K, G, p, T]
            out = dd.new_zeros(g, p, d) if b == 0 else dd.new_empty(g, p, d)
            for i, alpha in enumerate(weights.tolist()):
                for j in range(k):
                    beta = 0 if i == j == 0 else 1
                    torch.baddbmm(out, dd[i, j], a[i, j].transpose(1, 2), beta=beta, alpha=alpha, out=out)
            return out
        rows = weights.to(self.d.dtype).repeat_interleave(self.fold)
        parts = []
        for x, grad in zip(self.inputs, self.outputs_grad):
            # The gradient is linear in either operand: scale the smaller.
            if x.numel() < grad.numel():
                x = x * rows.view(-1, *[1] * (x.dim() - 1))
            else:
                grad = grad * rows.view(-1, *[1] * (grad.dim() - 1))
            parts.append(_weight_gradient(self.module, x, grad))
        return functools.reduce(torch.add, parts)

    def release(self) -> None:
        super().release()
        self.inputs = self.outputs_grad = None


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(module: Conv, calls: list[Call], fold: int) -> ConvGrads:
    """Inputs ``[B*fold, C_in, *spatial]`` and output gradients ``[B*fold, C_out, *spatial_out]``."""
    return ConvGrads(module, calls, fold)
