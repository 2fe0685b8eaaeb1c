"""Embedding: example b's gradient adds its rows' output gradients at their token ids.

Materialized it is ``[B, V, E]`` (large for big vocabularies), so the ghost form matters here:
``||G_b||^2 = sum_{r, r'} [id_r == id_r'] <D_r, D_r'>`` and the clipped sum is one ``index_add``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from privfast.grad_sample.base import Call, LayerGrads, Workspace, fold_rows, register_rule


class EmbeddingGrads(LayerGrads):
    """Token ids ``[B, R]`` and output gradients ``[B, R, E]`` of one embedding table ``[V, E]``."""

    def __init__(self, weight: nn.Parameter, ids: Tensor, d: Tensor):
        super().__init__([weight], ids.shape[0])
        self.weight, self.ids, self.d = weight, ids, d

    def materialize_cost(self) -> float:
        return float(self.batch * (self.weight.numel() + self.d.shape[1] * self.d.shape[2]))

    def ghost_cost(self) -> float:
        return float(self.d.shape[0] * self.d.shape[1] ** 2 * self.d.shape[2])

    def contract_cost(self) -> float:
        return float(self.d.numel())

    def plan_key(self):
        b, rows, dim = self.d.shape
        return "embedding", b.bit_length(), rows, dim, self.weight.shape[0], self.d.dtype, self.d.device.type

    def ghost_bytes(self) -> float:
        return float(2 * self.d.shape[0] * self.d.shape[1] ** 2 * self.d.element_size())  # id matches, Gram matrix

    def _compute_per_example(self) -> list[Tensor]:
        return self.scaled_per_example(1.0)

    def scaled_per_example(self, scale: float, workspace: Optional[Workspace] = None) -> list[Tensor]:
        # [B, V, E] is mostly zeros: written into kept memory (a fresh block costs its page faults every step)
        # and scaled through the B*R gradient rows that fill it, not by a pass over all of it.
        vocab, dim = self.weight.shape
        shape = (self.batch, vocab, dim)
        if workspace is None:
            out = self.d.new_zeros(shape)
        else:
            out = workspace.take([shape], self.d.dtype, self.d.device)[0].zero_()
        rows = self.ids + vocab * torch.arange(self.batch, device=self.ids.device).unsqueeze(1)
        d = self.d.reshape(-1, dim)
        out.view(-1, dim).index_add_(0, rows.flatten(), d, alpha=scale)
        return [out]

    def _ghost_norm_sq(self) -> Tensor:
        same = (self.ids.unsqueeze(2) == self.ids.unsqueeze(1)).to(self.d.dtype)
        return (same * torch.bmm(self.d, self.d.transpose(1, 2))).sum(dim=(1, 2))

    def contract(self, weights: Tensor) -> list[Tensor]:
        dim = self.weight.shape[1]
        scaled = (self.d * weights.to(self.d.dtype).view(-1, 1, 1)).reshape(-1, dim)
        return [self.d.new_zeros(self.weight.shape).index_add_(0, self.ids.flatten(), scaled)]


@register_rule(nn.Embedding)
def embedding_rule(module: nn.Embedding, calls: list[Call], fold: int) -> EmbeddingGrads:
    """Ids ``[B*fold, ...]`` and output gradients ``[B*fold, ..., E]``."""
    if module.sparse or module.scale_grad_by_freq or module.max_norm is not None:
        raise ValueError(
            f"{module} uses sparse=True, scale_grad_by_freq=True or max_norm, which change the gradient in "
            "ways the per-example rule does not model; construct the Embedding without them"
        )
    ids = torch.cat([fold_rows(c.args[0], fold).flatten(1) for c in calls], dim=1)
    d = torch.cat([fold_rows(c.grads[0], fold).flatten(1, -2) for c in calls], dim=1)
    if module.padding_idx is not None:
        d = d * (ids != module.padding_idx).unsqueeze(2).to(d.dtype)  # the padding row gets no gradient
    return EmbeddingGrads(module.weight, ids, d)
