"""Linear: ``grad W_b = sum_t D[b, t] A[b, t]^T`` over the K augmentations and all leading positions."""

from __future__ import annotations

from torch import Tensor, nn

from privfast.grad_sample.base import Call, ContractionGrads, cat_positions, fold_rows, register_rule


def _channels_first(t: Tensor, fold: int) -> Tensor:
    """``[B*fold, ..., c] -> [B, fold, 1, c, T]`` (a view)."""
    folded = fold_rows(t, fold)
    return folded.reshape(*folded.shape[:2], folded.shape[2:-1].numel(), t.shape[-1]).transpose(2, 3).unsqueeze(2)


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, calls: list[Call], fold: int) -> ContractionGrads:
    """Inputs ``[B*fold, ..., d]`` and output gradients ``[B*fold, ..., p]``."""
    a = [_channels_first(c.args[0], fold) for c in calls]
    d = [_channels_first(c.grads[0], fold) for c in calls]
    return ContractionGrads(module.weight, module.bias, cat_positions(a), cat_positions(d))
