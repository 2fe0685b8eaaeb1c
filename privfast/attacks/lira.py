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

Where the reference code (``mi_lira_2021/plot.py``, TF Privacy's ``compute_score_lira``) differs, privfast
follows the paper, so its scores are not a monotone transform of the reference's:

- Gaussians are fitted by the mean and the unbiased (ddof 1) standard deviation of every IN and OUT
  shadow; the reference centres on the median with ddof 0, and ``plot.py`` first cuts every example to the
  fewest IN / OUT shadows any example has.
- With ``fix_variance`` one variance per side (IN, OUT) is the mean of the per-example variances; ``plot.py``
  takes one global standard deviation of all IN confidences for both sides (between-example spread included).
- Offline, the test is the paper's one-sided ``log Pr[Z <= phi]``; both reference codes score the two-sided
  ``-log N(phi; mu_out, sigma_out)``, which ranks a confidence far below the OUT fit as member-like.
- ``tpr_at_fpr`` (:func:`privfast.metrics.attack_summary`) reads the ROC at FPR <= the level; ``plot.py`` at
  FPR < the level. They differ only where the level times the non-members is a whole number.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from privfast.attacks.common import (
    EVAL_BATCH,
    AttackResult,
    attack_result,
    check_pool,
    predict_logits,
    query_views,
    score_queries,
)
from privfast.attacks.training import ShadowModels

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
    is_member = check_pool(shadows.in_mask, x, y, is_member)
    queries = query_views(x, mirror)
    target = score_queries(
        partial(predict_logits, model, batch_size=batch_size), queries, y, logit_confidence
    )  # [N, Q]
    shadow_phi = score_queries(
        partial(shadows.logits, batch_size=batch_size), queries, y, logit_confidence
    )  # [S, N, Q]
    in_mask = shadows.in_mask.cpu()
    mu_out, sigma_out = _fit(shadow_phi, ~in_mask, fix_variance)
    if online:
        mu_in, sigma_in = _fit(shadow_phi, in_mask, fix_variance)
        per_query = _log_normal(target, mu_in, sigma_in) - _log_normal(target, mu_out, sigma_out)
    else:
        per_query = torch.special.log_ndtr((target - mu_out) / sigma_out)
    scores = per_query.mean(-1)
    return attack_result(scores[is_member], scores[~is_member], info={"online": online})
