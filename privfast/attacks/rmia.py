"""RMIA, the relative membership inference attack (Zarifzadeh, Liu, Bajaj and Shokri, ICML 2024), online and offline.

RMIA compares the target model's probability of an example with the reference (shadow) models'
and with the same comparison on population points z::

    LR(x, z) = [p(x | theta) / p(x)] / [p(z | theta) / p(z)]
    score(x) = Pr_z[ LR(x, z) >= gamma ]                             (the paper's Eq. 4 and Sec. 3)

where ``p(x | theta)`` is the probability the model gives x's true label and ``p(x)`` its average
over reference models, ``(p_IN(x) + p_OUT(x)) / 2``:

- online: IN and OUT references for x (:func:`~privfast.attacks.train_shadow_models` makes every
  pool example IN for exactly half the shadows);
- offline: OUT references only, with the paper's linear correction for the missing IN half,
  ``p(x) = ((1 + a) p_OUT(x) + (1 - a)) / 2`` (Sec. 4: ``p_IN ~ a p_OUT + 1 - a``), ``a`` tuned by
  attacking one reference model with the others (:func:`tune_offline_a`).

The shadows are the vectorized ones LiRA uses, so the two attacks run on the same reference models
(:func:`~privfast.attacks.lira`). With ``mirror`` each example is also queried mirrored and the
scores of the two queries averaged, as LiRA does.

Where the authors' code (privacytrustlab/ml_privacy_meter) differs, privfast follows the paper's text:
``p(x)`` and ``p(z)`` are plain means over the references (the paper's runs take a 20% trimmed mean, and
the current code the largest half of the OUT signals); a ratio counts when ``LR >= gamma`` (Eq. 4; the code
counts ``>``, which differs on ties); two queries (``mirror``) average their fractions (the code takes a
majority vote per pair, which with two queries is an AND); the population defaults to the whole pool; and
the signal is the plain softmax probability (the paper's runs use a Taylor soft-margin softmax).
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from privfast.attacks.common import (
    EVAL_BATCH,
    AttackResult,
    attack_result,
    check_data,
    check_pool,
    predict_logits,
    query_views,
    score_queries,
)
from privfast.attacks.training import ShadowModels

__all__ = ["A_GRID", "reference_probability", "rmia", "rmia_scores", "true_class_log_probability", "tune_offline_a"]

A_GRID = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
"""Values of ``a`` :func:`tune_offline_a` tries (the reference implementation's grid)."""

_TINY = torch.finfo(torch.float64).tiny


def true_class_log_probability(logits: Tensor, labels: Tensor) -> Tensor:
    """``log p(y | x, theta)`` ``[...]`` from logits ``[..., K]`` and labels ``[...]``, in float64 (no underflow)."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match the logits' leading dims {tuple(logits.shape[:-1])}")
    return logits.double().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)


def reference_probability(
    reference: Tensor, in_mask: Optional[Tensor], *, online: bool, offline_a: Optional[float]
) -> Tensor:
    """``p(x)``, the reference models' probability of each example, as RMIA estimates it.

    Args:
        reference: ``[S, N, Q]`` probabilities of the S reference models (Q queries per example).
        in_mask: bool ``[S, N]``: reference s trained on example n; None: no reference did.
        online: ``(mean_IN + mean_OUT) / 2`` (needs IN and OUT references for every example);
            otherwise, or for examples no reference trained on, ``((1 + a) mean_OUT + (1 - a)) / 2``.
        offline_a: ``a`` in [0, 1] of the offline estimate.

    Returns:
        ``[N, Q]`` float64.
    """
    reference = reference.double()
    in_mask = torch.zeros(reference.shape[:2], dtype=torch.bool) if in_mask is None else in_mask.cpu()
    out_w, in_w = (~in_mask)[..., None].double(), in_mask[..., None].double()
    out_count, in_count = out_w.sum(0), in_w.sum(0)
    if (out_count == 0).any():
        raise ValueError("every example needs at least one OUT reference model; train more shadows")
    mean_out = (out_w * reference).sum(0) / out_count
    use_online = online and bool((in_count > 0).all())
    if use_online:
        return ((in_w * reference).sum(0) / in_count + mean_out) / 2
    if online and bool((in_count > 0).any()):
        raise ValueError("online RMIA needs IN and OUT reference models for every example; some have no IN model")
    if offline_a is None or not 0 <= offline_a <= 1:
        raise ValueError(f"the offline estimate of p(x) needs offline_a in [0, 1], got {offline_a}")
    return ((1 + offline_a) * mean_out + (1 - offline_a)) / 2


def rmia_scores(
    target: Tensor,
    reference: Tensor,
    in_mask: Optional[Tensor],
    population_target: Tensor,
    population_reference: Tensor,
    population_in_mask: Optional[Tensor],
    *,
    online: bool,
    offline_a: Optional[float] = None,
    gamma: float = 1.0,
) -> Tensor:
    """RMIA's score of every example: the fraction of population points z with ``LR(x, z) >= gamma``.

    ``LR(x, z) = [p(x|theta) / p(x)] / [p(z|theta) / p(z)]`` (Zarifzadeh et al., ICML 2024, Eq. 4),
    with ``p(.)`` from :func:`reference_probability` for x and z alike. Computed in log space and
    by sorting the population's ratios (``O((N + Z) log Z)`` rather than ``N * Z`` comparisons);
    with Q queries the per-query fractions are averaged.

    Args:
        target: ``[N, Q]`` the target model's ``p(x | theta)``.
        reference: ``[S, N, Q]`` the reference models' probabilities of the same examples.
        in_mask: bool ``[S, N]`` reference memberships of the examples (None: all OUT).
        population_target: ``[Z, Q]`` the target's probabilities of the population points.
        population_reference: ``[S, Z, Q]`` the references' probabilities of them.
        population_in_mask: bool ``[S, Z]`` (None: no reference trained on the population).
        online: IN and OUT references (True) or OUT only (False), see :func:`reference_probability`.
        offline_a: ``a`` of the offline estimate (also used online for population points no
            reference trained on).
        gamma: the likelihood-ratio threshold, > 0 (the paper's gamma; 1 in the reference code).

    Returns:
        ``[N]`` float64 scores in [0, 1], higher = more likely a member.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if (
        target.dim() != 2
        or reference.shape[1:] != target.shape
        or population_reference.shape[1:] != population_target.shape
        or population_target.shape[1] != target.shape[1]
    ):
        raise ValueError(
            f"shapes disagree: target {tuple(target.shape)} [N, Q], reference {tuple(reference.shape)} "
            f"[S, N, Q], population {tuple(population_target.shape)} [Z, Q] and "
            f"{tuple(population_reference.shape)} [S, Z, Q]"
        )
    p_x = reference_probability(reference, in_mask, online=online, offline_a=offline_a)
    pop_online = online and population_in_mask is not None and bool(population_in_mask.any())
    p_z = reference_probability(population_reference, population_in_mask, online=pop_online, offline_a=offline_a)
    log_x = target.double().clamp_min(_TINY).log() - p_x.clamp_min(_TINY).log()  # [N, Q]
    log_z = population_target.double().clamp_min(_TINY).log() - p_z.clamp_min(_TINY).log()  # [Z, Q]
    # LR(x, z) >= gamma  <=>  log ratio_z <= log ratio_x - log gamma: count with a search in the sorted z's.
    ordered = log_z.T.contiguous().sort(dim=1).values  # [Q, Z]
    bound = (log_x - float(np.log(gamma))).T.contiguous()  # [Q, N]
    counts = torch.searchsorted(ordered, bound, right=True)  # [Q, N]
    return (counts.double() / ordered.shape[1]).mean(0)


def _true_class_probability(logits: Tensor, labels: Tensor) -> Tensor:
    return true_class_log_probability(logits, labels).exp()


def _per_query(logits_fn, queries: list[Tensor], y: Tensor) -> Tensor:
    """``p(y | query)`` ``[..., N, Q]`` from ``logits_fn``'s logits ``[..., N, K]`` per query, float64, on the CPU."""
    return score_queries(logits_fn, queries, y, _true_class_probability)


def _probabilities(
    model: nn.Module, shadows: ShadowModels, queries: list[Tensor], y: Tensor, batch_size: int
) -> tuple[Tensor, Tensor]:
    """``p(y | query)`` of the target ``[N, Q]`` and of the shadows ``[S, N, Q]``."""
    return (
        _per_query(partial(predict_logits, model, batch_size=batch_size), queries, y),
        _shadow_probabilities(shadows, queries, y, batch_size),
    )


def _tune(
    reference: Tensor,
    in_mask: Tensor,
    pop_reference: Tensor,
    pop_in_mask: Optional[Tensor],
    grid: Sequence[float],
    gamma: float,
) -> tuple[float, dict]:
    """The ``a`` whose offline RMIA on reference 0, with the other references OUT only, has the best AUC."""
    if reference.shape[0] < 2:
        raise ValueError("tuning offline_a attacks one reference model with the others: train at least 2 shadows")
    truth = in_mask[0].numpy()
    if truth.all() or not truth.any():
        raise ValueError("reference model 0 must have members and non-members in the pool to tune offline_a")
    aucs = {}
    for a in grid:
        scores = rmia_scores(
            reference[0],
            reference[1:],
            in_mask[1:],
            pop_reference[0],
            pop_reference[1:],
            None if pop_in_mask is None else pop_in_mask[1:],
            online=False,
            offline_a=float(a),
            gamma=gamma,
        )
        aucs[float(a)] = float(roc_auc_score(truth, scores.numpy()))
    best = max(aucs, key=aucs.get)
    return best, aucs


def _population(shadows: ShadowModels, x: Tensor, y: Tensor, population) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    if population is None:
        return x, y, shadows.in_mask.cpu()
    px, py = population
    check_data(px, py, "population")
    return px, py, None


def tune_offline_a(
    shadows: ShadowModels,
    x: Tensor,
    y: Tensor,
    *,
    population=None,
    grid: Sequence[float] = A_GRID,
    gamma: float = 1.0,
    mirror: bool = True,
    batch_size: int = EVAL_BATCH,
) -> tuple[float, dict]:
    """Tune offline RMIA's ``a`` as the paper does: attack one reference model with the rest, keep the best AUC.

    Shadow 0 plays the target (its pool memberships are known to the attacker, who trained it);
    shadows 1..S-1 are the OUT references.

    Args:
        shadows: reference models trained on halves of the pool ``(x, y)``.
        x: the pool ``[N, ...]``.
        y: its labels ``[N]``.
        population: ``(x_z, y_z)`` population points, or None for the pool itself.
        grid: the values of ``a`` tried, each in [0, 1].
        gamma: RMIA's threshold.
        mirror: also query mirrored examples.
        batch_size: rows per forward pass.

    Returns:
        ``(best a, {a: AUC})``.
    """
    check_data(x, y, "pool")
    px, py, pop_mask = _population(shadows, x, y, population)
    reference = _shadow_probabilities(shadows, query_views(x, mirror), y, batch_size)
    pop_reference = _shadow_probabilities(shadows, query_views(px, mirror), py, batch_size)
    return _tune(reference, shadows.in_mask.cpu(), pop_reference, pop_mask, grid, gamma)


def _shadow_probabilities(shadows: ShadowModels, queries: list[Tensor], y: Tensor, batch_size: int) -> Tensor:
    return _per_query(partial(shadows.logits, batch_size=batch_size), queries, y)


def rmia(
    model: nn.Module,
    shadows: ShadowModels,
    x: Tensor,
    y: Tensor,
    *,
    is_member: Tensor,
    online: bool = True,
    offline_a: Optional[float] = None,
    population=None,
    gamma: float = 1.0,
    mirror: bool = True,
    batch_size: int = EVAL_BATCH,
) -> AttackResult:
    """RMIA scores of every pool example against the target model (Zarifzadeh et al., ICML 2024).

    Args:
        model: the target classifier.
        shadows: reference models trained on halves of this same pool (:func:`train_shadow_models`),
            the same ones :func:`~privfast.attacks.lira` uses.
        x: the pool ``[N, ...]``, in the order the shadows were trained on.
        y: its labels ``[N]``.
        is_member: bool ``[N]``, the ground truth, used only to split the scores for the summary.
        online: IN and OUT references (True), or OUT references only with the ``a`` correction.
        offline_a: ``a`` for the offline estimate of ``p(x)``; None tunes it with
            :func:`tune_offline_a` (offline, or online with an external population).
        population: ``(x_z [Z, ...], y_z [Z])`` population points z, never in the shadows' pool;
            None compares against the pool itself (every example is then also a z).
        gamma: the likelihood-ratio threshold (> 0).
        mirror: also query the left-right mirror of each example and average the scores.
        batch_size: rows per forward pass.

    Returns:
        :class:`AttackResult` (no fixed decision; read it at a chosen FPR); ``info``: ``online``,
        ``offline_a`` (the value used, or None online), ``a_auc`` (the tuning curve, when tuned), ``gamma``.
    """
    is_member = check_pool(shadows.in_mask, x, y, is_member)
    px, py, pop_mask = _population(shadows, x, y, population)
    target, reference = _probabilities(model, shadows, query_views(x, mirror), y, batch_size)
    if population is None:
        pop_target, pop_reference = target, reference
    else:
        pop_target, pop_reference = _probabilities(model, shadows, query_views(px, mirror), py, batch_size)
    in_mask = shadows.in_mask.cpu()
    needs_a = not online or population is not None
    a_auc = None
    if needs_a and offline_a is None:
        offline_a, a_auc = _tune(reference, in_mask, pop_reference, pop_mask, A_GRID, gamma)
    scores = rmia_scores(
        target,
        reference,
        in_mask,
        pop_target,
        pop_reference,
        pop_mask,
        online=online,
        offline_a=offline_a if needs_a else None,
        gamma=gamma,
    )
    return attack_result(
        scores[is_member],
        scores[~is_member],
        info={"online": online, "offline_a": offline_a if needs_a else None, "a_auc": a_auc, "gamma": gamma},
    )
