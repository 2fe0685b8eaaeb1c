"""GroupNorm: ``grad weight_b = sum over rows and positions of x_hat * D``, ``grad bias_b = sum of D``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from privfast.grad_sample.base import Call, MaterializedGrads, register_rule
from privfast.grad_sample.layer_norm import affine_grads


@register_rule(nn.GroupNorm)
def group_norm_rule(module: nn.GroupNorm, calls: list[Call], fold: int) -> MaterializedGrads:
    """Inputs and output gradients ``[B*fold, C, *spatial]``; per-example grads ``[B, C]``."""
    return affine_grads(
        module, calls, fold, normalize=lambda x: F.group_norm(x, module.num_groups, eps=module.eps), channel_dim=1
    )
