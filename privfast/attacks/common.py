"""What the attacks share: data checks, predictions and losses in eval mode, and the result type.

Internal to :mod:`privfast.attacks` (its public names are re-exported there): every attack module
imports its checks and its :class:`AttackResult` from here, so that no attack reaches into another
attack's module.

Two advantages are kept apart in every result, because they answer different questions:

- ``decision_advantage``: TPR - FPR of the attack's own decision (a threshold calibrated on the
  examples the attacker knows), measured on the examples it did not know. This is what an
  attacker achieves.
- ``best_advantage``: the largest TPR - FPR over every threshold, chosen after seeing every score
  *and* its membership label, the attacker's known examples included. An optimistic upper bound
  on any threshold on this score, not an attack.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privfast.data import Split
from privfast.metrics import attack_summary, threshold_metrics

__all__ = [
    "EVAL_BATCH",
    "AttackResult",
    "attack_result",
    "check_data",
    "check_pool",
    "eval_mode",
    "example_losses",
    "labelled",
    "predict_logits",
    "query_views",
    "score_queries",
]

EVAL_BATCH = 2048
"""Rows per forward pass when only predicting; inference memory is small."""


def check_data(x: Tensor, y: Tensor, name: str = "data") -> None:
    """Raise ValueError unless ``x`` is a float tensor ``[N, ...]`` and ``y`` int64 labels ``[N]``."""
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"{name}: x must be a float tensor [N, ...], got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.dtype != torch.int64:
        raise ValueError(
            f"{name}: y must be int64 labels [N={x.shape[0]}], got "
            f"{getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}"
        )


def labelled(data, name: str) -> Split:
    """``data`` as a non-empty, checked :class:`~privfast.data.Split` (any pair ``(x [N, ...], y [N])``)."""
    if not isinstance(data, tuple) or len(data) != 2:
        raise ValueError(f"{name} must be a pair (x [N, ...], y [N]) such as a privfast.data.Split")
    split = Split(*data)
    check_data(split.x, split.y, name)
    if len(split.y) == 0:
        raise ValueError(f"{name} is empty")
    return split


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, no_grad: bool = True) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block (without autograd unless ``no_grad=False``, for scores that
    differentiate the model); the previous mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield model
    finally:
        model.train(was_training)


def predict_logits(model: nn.Module, x: Tensor, *, batch_size: int = EVAL_BATCH) -> Tensor:
    """Logits ``[N, K]`` of ``model`` on ``x [N, ...]`` (moved to the model's device chunk by chunk), in eval mode
    and without gradients."""
    device = next(model.parameters(), x).device
    with eval_mode(model):
        return torch.cat([model(chunk.to(device)) for chunk in x.split(batch_size)]) if len(x) else model(x.to(device))


def example_losses(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = EVAL_BATCH) -> Tensor:
    """Per-example cross-entropy losses ``[N]`` of ``model`` on ``(x [N, ...], y [N])``, in eval mode."""
    check_data(x, y)
    logits = predict_logits(model, x, batch_size=batch_size)
    return F.cross_entropy(logits, y.to(logits.device), reduction="none")


def query_views(x: Tensor, mirror: bool) -> list[Tensor]:
    """The queries of each example: ``[x]``, and its left-right mirror too with ``mirror`` (LiRA, RMIA)."""
    return [x, torch.flip(x, dims=[-1])] if mirror else [x]


def score_queries(
    logits_fn: Callable[[Tensor], Tensor], queries: list[Tensor], y: Tensor, score: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """``score(logits, labels)`` ``[..., N, Q]`` on the CPU, for ``logits_fn``'s logits ``[..., N, K]`` of each
    query."""
    return torch.stack(
        [score(logits, y.to(logits.device).expand(logits.shape[:-1])) for logits in map(logits_fn, queries)], dim=-1
    ).cpu()


def check_pool(in_mask: Tensor, x: Tensor, y: Tensor, is_member) -> Tensor:
    """Check a shadow-model attack's pool against the shadows' ``in_mask [S, N]``; returns bool ``is_member [N]``."""
    check_data(x, y, "pool")
    if in_mask.shape[1] != len(y):
        raise ValueError(
            f"the shadows were trained on a pool of {in_mask.shape[1]} examples but x has "
            f"{len(y)}; pass the same pool, in the same order"
        )
    is_member = torch.as_tensor(is_member, dtype=torch.bool).cpu()
    if is_member.shape != y.shape or is_member.all() or not is_member.any():
        raise ValueError(f"is_member must be bool [N={len(y)}] with both members and non-members")
    return is_member


@dataclass
class AttackResult:
    """Per-example scores of one attack and what they achieve.

    Attributes:
        member_scores: ``[N_m]`` scores of the members, in input order (higher = "member").
        nonmember_scores: ``[N_n]`` scores of the non-members.
        summary: :func:`privfast.metrics.attack_summary` of the scores (AUC, ``best_advantage``,
            TPR@FPR, ROC), over every example, known ones included.
        member_pred: bool ``[N_m]``, the attack's own decision when it has one (a calibrated
            threshold), else None.
        nonmember_pred: bool ``[N_n]``, likewise.
        decision: :func:`privfast.metrics.threshold_metrics` of that decision (Inf, advantage, FPR,
            FNR, P_err) on the examples the attacker did not know, or None.
        info: attack-specific details (the threshold, the chosen reduction, ...).
    """

    member_scores: Tensor
    nonmember_scores: Tensor
    summary: dict
    member_pred: Optional[Tensor] = None
    nonmember_pred: Optional[Tensor] = None
    decision: Optional[dict] = None
    info: dict = field(default_factory=dict)

    @property
    def decision_advantage(self) -> Optional[float]:
        """TPR - FPR of the attack's own decision on the examples it did not know; None without a
        decision (LiRA and RMIA are read at a chosen FPR instead)."""
        return None if self.decision is None else self.decision["advantage"]

    @property
    def best_advantage(self) -> float:
        """The best TPR - FPR over all thresholds, chosen knowing every label: an upper bound, not an attack."""
        return self.summary["best_advantage"]


def attack_result(
    member_scores: Tensor,
    nonmember_scores: Tensor,
    *,
    member_threshold=None,
    nonmember_threshold=None,
    known: tuple[Tensor, ...] = (),
    info: Optional[dict] = None,
) -> AttackResult:
    """Score summary, plus the decision "score >= threshold" when a threshold is given (scalar or per example).

    ``known`` holds the indices of the members (and non-members) the attacker calibrated on; they
    get a decision too but are left out of its metrics, which would otherwise flatter the attack.
    """
    member_scores, nonmember_scores = member_scores.detach().cpu(), nonmember_scores.detach().cpu()
    result = AttackResult(
        member_scores, nonmember_scores, attack_summary(member_scores, nonmember_scores), info=info or {}
    )
    if member_threshold is not None:
        result.member_pred = member_scores >= member_threshold
        result.nonmember_pred = nonmember_scores >= nonmember_threshold
        unseen = [torch.ones(len(pred), dtype=torch.bool) for pred in (result.member_pred, result.nonmember_pred)]
        for mask, index in zip(unseen, known):
            mask[index] = False
        result.decision = threshold_metrics(result.member_pred[unseen[0]], result.nonmember_pred[unseen[1]])
    return result
