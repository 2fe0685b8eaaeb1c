"""LiRA, the likelihood-ratio membership attack (Carlini et al., S&P 2022), online and offline.

Shadow models each train on a random half of a data pool (:func:`train_shadow_models`, all at
once under ``vmap``). For every pool example, the logit-scaled confidence
``phi = log p_y - log sum_{y' != y} p_y'`` of the shadows that saw it (IN) and of those that did
not (OUT) are fitted with Gaussians; the target model's confidence is then tested against them:

- online: ``log N(phi; mu_in, sigma_in) - log N(phi; mu_out, sigma_out)``;
- offline (OUT shadows only, so targets need not be in the shadows' pool):
  ``log Pr[Z <= phi]`` with ``Z ~ N(mu_out, sigma_out)``, the one-sided test of the paper.

With ``mirror`` every example is queried as is and mirrored left-right; the per-query statistics
are averaged, as in the reference implementation.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from privfast.attacks.mia import AttackResult, _result
from privfast.attacks.training import EVAL_BATCH, ShadowModels, _check_data, predict_logits

__all__ = ["lira", "logit_confidence"]

_MIN_STD = 1e-6
"""Floor of a fitted standard deviation, so that identical shadow confidences do not divide by zero."""


def logit_confidence(logits: Tensor, labels: Tensor) -> Tensor:
    """LiRA's score ``log p_y - log(1 - p_y)``, computed from logits without forming probabilities.

    Args:
        logits: ``[..., K]``.
        labels: int64 ``[...]``, the true classes.

    Returns:
        ``[...]``: ``z_y - logsumexp_{y' != y} z_y'``, exact even when ``p_y`` rounds to 1.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match the logits' leading dims {tuple(logits.shape[:-1])}")
    true = logits.gather(-1, labels[..., None]).squeeze(-1)
    others = logits.scatter(-1, labels[..., None], float("-inf")).logsumexp(-1)
    return true - others


def _query_confidences(logits_fn: Callable[[Tensor], Tensor], queries: list[Tensor], y: Tensor) -> Tensor:
    """Confidences ``[..., N, Q]`` of ``logits_fn``'s logits ``[..., N, K]`` on each of the Q queries."""
    return torch.stack([logit_confidence(logits, y.to(logits.device).expand(logits.shape[:-1]))
                        for logits in map(logits_fn, queries)], dim=-1).cpu()


def _fit(phi: Tensor, mask: Tensor, fix_variance: bool) -> tuple[Tensor, Tensor]:
    """Gaussian fits ``(mu, sigma) [N, Q]``, per example and query, of ``phi [S, N, Q]`` where ``mask [S, N]``."""
    weights = mask[..., None].to(phi.dtype)
    counts = weights.sum(0)
    if (counts < 2).any():
        raise ValueError("every example needs at least 2 IN and 2 OUT shadow models; train more shadows")
    mu = (weights * phi).sum(0) / counts
    var = (weights * (phi - mu) ** 2).sum(0) / (counts - 1)
    if fix_variance:  # one pooled within-example variance: steadier than per-example fits with few shadows
        var = var.mean().expand_as(var)
    return mu, var.sqrt().clamp_min(_MIN_STD)


def _log_normal(value: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian log-density up to the constant -log(2 pi)/2, which cancels in every use here."""
    return -0.5 * ((value - mu) / sigma) ** 2 - sigma.log()


def lira(
    model: nn.Module,
    shadows: ShadowModels,
    x: Tensor,
    y: Tensor,
    *,
    is_member: Tensor,
    online: bool = True,
    mirror: bool = True,
    fix_variance: bool = False,
    batch_size: int = EVAL_BATCH,
) -> AttackResult:
    """LiRA scores of every pool example against the target model.

    Args:
        model: the target classifier.
        shadows: shadow models trained on halves of this same pool (:func:`train_shadow_models`).
        x: the pool ``[N, ...]``, in the order the shadows were trained on.
        y: its labels ``[N]``.
        is_member: bool ``[N]``, the ground truth (true = in the target's training set), used only
            to split the scores for the summary.
        online: use IN and OUT shadows (True) or OUT shadows only (False).
        mirror: also query the left-right mirror of each example and average.
        fix_variance: fit one variance shared by all examples (advised below ~64 shadows).
        batch_size: rows per forward pass.

    Returns:
        :class:`AttackResult` with the likelihood-ratio scores (no fixed decision: LiRA is read at
        a chosen FPR, see ``summary["tpr_at_fpr"]``); ``info["online"]`` says which variant ran.
    """
    _check_data(x, y, "pool")
    if shadows.in_mask.shape[1] != len(y):
        raise ValueError(f"the shadows were trained on a pool of {shadows.in_mask.shape[1]} examples but x has "
                         f"{len(y)}; pass the same pool, in the same order")
    is_member = torch.as_tensor(is_member, dtype=torch.bool).cpu()
    if is_member.shape != y.shape or is_member.all() or not is_member.any():
        raise ValueError(f"is_member must be bool [N={len(y)}] with both members and non-members")
    queries = [x, torch.flip(x, dims=[-1])] if mirror else [x]
    target = _query_confidences(partial(predict_logits, model, batch_size=batch_size), queries, y)  # [N, Q]
    shadow_phi = _query_confidences(partial(shadows.logits, batch_size=batch_size), queries, y)  # [S, N, Q]
    in_mask = shadows.in_mask.cpu()
    mu_out, sigma_out = _fit(shadow_phi, ~in_mask, fix_variance)
    if online:
        mu_in, sigma_in = _fit(shadow_phi, in_mask, fix_variance)
        per_query = _log_normal(target, mu_in, sigma_in) - _log_normal(target, mu_out, sigma_out)
    else:
        per_query = torch.special.log_ndtr((target - mu_out) / sigma_out)
    scores = per_query.mean(-1)
    return _result(scores[is_member], scores[~is_member], info={"online": online})
