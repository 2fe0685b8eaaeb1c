"""Opacus's ``SequenceBias`` (``DPMultiheadAttention(add_bias_kv=True)``): a learned vector appended
to every sequence, so example b's gradient is the output gradient at its appended (last) position,
summed over its rows."""

from __future__ import annotations

from opacus.layers.dp_multihead_attention import SequenceBias

from privfast.grad_sample.base import Call, MaterializedGrads, fold_rows, register_rule


@register_rule(SequenceBias)
def sequence_bias_rule(module: SequenceBias, calls: list[Call], fold: int) -> MaterializedGrads:
    """Output gradients ``[B*fold, T+1, E]`` (example-first, as the engine passes them); grads ``[B, E]``."""
    total = None
    for call in calls:
        part = fold_rows(call.grads[0][:, -1], fold).sum(1)
        total = part if total is None else total + part
    return MaterializedGrads([module.bias], [total])
