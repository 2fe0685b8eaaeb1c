"""Privacy and utility metrics for membership inference.

Convention: an attack's *score* is higher for "more likely a member"; a *decision* is a boolean
"predicted member". Rates are fractions in [0, 1] (multiply by 100 for the papers' percentages):
``advantage = TPR - FPR = 2 * (Inf - 1/2) = 1 - 2 * P_err`` with ``Inf`` the balanced inference
accuracy and ``P_err = (FPR + FNR) / 2``.

Every function accepts tensors, numpy arrays or sequences, and works in float64.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import scipy.special
import scipy.stats
import torch
from scipy.spatial.distance import jensenshannon
from sklearn.metrics import roc_auc_score, roc_curve

__all__ = [
    "attack_summary",
    "dp_perr_bound",
    "js_distance",
    "loss_rank_correlation",
    "outliers",
    "relative_accuracy_drop",
    "threshold_metrics",
]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]

TPR_AT_FPR_LEVELS = (0.001, 0.01)
"""The false-positive rates at which :func:`attack_summary` reports the true-positive rate."""


def _as_array(values, name: str, *, dtype=np.float64, ndim: int = 1) -> np.ndarray:
    """``values`` as a numpy array of ``ndim`` dimensions, with a clear error otherwise."""
    if hasattr(values, "detach"):  # a torch tensor, possibly on an accelerator
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=dtype)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty; expected at least one value")
    if dtype == np.float64 and np.isnan(array).any():
        raise ValueError(f"{name} holds NaN values; scores and losses must be numbers (inf is allowed)")
    return array


def _labelled(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    members = _as_array(member_scores, "member_scores")
    nonmembers = _as_array(nonmember_scores, "nonmember_scores")
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    scores = np.concatenate([members, nonmembers])
    # scikit-learn refuses infinities; every metric here depends only on the ranking, so put them
    # just beyond the finite range (e.g. -loss for a loss that overflowed).
    finite = scores[np.isfinite(scores)]
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    return labels, np.clip(scores, low - 1, high + 1)


def attack_summary(member_scores: ArrayLike, nonmember_scores: ArrayLike) -> dict:
    """Threshold-free summary of an attack's scores (higher score = more likely a member).

    Every threshold is tried, "member iff score >= threshold"; rates are balanced, so member and
    non-member sets of different sizes weigh the same.

    Args:
        member_scores: ``[N_m]`` scores of true members.
        nonmember_scores: ``[N_n]`` scores of true non-members.

    Returns:
        A dict with ``auc``; ``best_advantage`` = max over thresholds of TPR - FPR, the threshold
        chosen knowing every label (an upper bound on a threshold attack, not one: see
        :func:`threshold_metrics` for a decision's advantage); ``accuracy`` = the best balanced
        accuracy ``(TPR + TNR) / 2``; ``p_err`` = ``(FPR + FNR) / 2`` at that threshold;
        ``threshold`` reaching it; ``tpr_at_fpr`` = ``{0.001: ..., 0.01: ...}``, the
        highest TPR with FPR at most that level; ``roc`` = ``{"fpr", "tpr", "thresholds"}`` numpy arrays.
    """
    labels, scores = _labelled(member_scores, nonmember_scores)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    advantage = float(tpr[best] - fpr[best])
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "best_advantage": advantage,
        "accuracy": 0.5 + advantage / 2,
        "p_err": (1.0 - advantage) / 2,
        "threshold": float(thresholds[best]),
        # roc_curve's first point is (0, 0), so some FPR always qualifies.
        "tpr_at_fpr": {level: float(tpr[fpr <= level].max()) for level in TPR_AT_FPR_LEVELS},
        "roc": {"fpr": fpr, "tpr": tpr, "thresholds": thresholds},
    }


def threshold_metrics(member_pred: ArrayLike, nonmember_pred: ArrayLike) -> dict:
    """Metrics of one fixed decision rule (True = "predicted member").

    Args:
        member_pred: ``[N_m]`` decisions on true members.
        nonmember_pred: ``[N_n]`` decisions on true non-members.

    Returns:
        A dict with ``inf`` (balanced inference accuracy), ``advantage`` = 2 * (inf - 1/2),
        ``fpr``, ``fnr``, ``tpr`` and ``p_err`` = (fpr + fnr) / 2.
    """
    members = _as_array(member_pred, "member_pred", dtype=bool)
    nonmembers = _as_array(nonmember_pred, "nonmember_pred", dtype=bool)
    fpr = float(nonmembers.mean())
    fnr = 1.0 - float(members.mean())
    p_err = (fpr + fnr) / 2
    return {"inf": 1.0 - p_err, "advantage": 1.0 - 2 * p_err, "fpr": fpr, "fnr": fnr, "tpr": 1.0 - fnr, "p_err": p_err}


def dp_perr_bound(epsilon: Union[float, ArrayLike], delta: float) -> Union[float, np.ndarray]:
    """Lower bound on any membership attack's error under (epsilon, delta)-DP: ``(1 - delta) / (1 + e^epsilon)``.

    Args:
        epsilon: privacy budget(s), >= 0 (``inf`` gives the trivial bound 0).
        delta: failure probability in [0, 1).

    Returns:
        The bound, a float for a scalar ``epsilon``, else an array of its shape.
    """
    eps = np.asarray(epsilon, dtype=np.float64)
    if np.isnan(eps).any() or (eps < 0).any():
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    bound = (1.0 - delta) * scipy.special.expit(-eps)  # expit(-eps) = 1 / (1 + e^eps), stable for large eps
    return float(bound) if bound.ndim == 0 else bound


def relative_accuracy_drop(acc: float, base_acc: float) -> float:
    """RAD (Kaya & Dumitraş, ICML 2021): ``(base_acc - acc) / base_acc``, a mechanism's cost (negative: a gain)."""
    if not base_acc > 0:
        raise ValueError(f"base_acc must be > 0, got {base_acc}")
    return (base_acc - acc) / base_acc


def loss_rank_correlation(losses_a: ArrayLike, losses_b: ArrayLike) -> float:
    """LRC: Spearman's rank correlation of two models' losses on the same examples.

    From Kaya & Dumitraş, "When Does Data Augmentation Help With Membership Inference Attacks?"
    (ICML 2021), Figs. 6-8.

    Args:
        losses_a: ``[N]`` per-example losses of model a.
        losses_b: ``[N]`` losses of model b on the same examples, in the same order.
    """
    a = _as_array(losses_a, "losses_a")
    b = _as_array(losses_b, "losses_b")
    if a.shape != b.shape:
        raise ValueError(f"losses_a has shape {a.shape} and losses_b {b.shape}; they must hold the same examples")
    if len(a) < 2:
        raise ValueError("a rank correlation needs at least two examples")
    return float(scipy.stats.spearmanr(a, b).statistic)


def js_distance(member_losses: ArrayLike, nonmember_losses: ArrayLike, bins: Union[int, ArrayLike] = 100) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between the member and non-member loss histograms.

    Kaya & Dumitraş (ICML 2021, Fig. 1) compare the two histograms as probability distributions;
    both use the same bins, spanning the union of the losses when ``bins`` is a count.

    Args:
        member_losses: ``[N_m]`` losses on members.
        nonmember_losses: ``[N_n]`` losses on non-members.
        bins: number of equal-width bins, or the bin edges ``[n_bins + 1]``.
    """
    members = _as_array(member_losses, "member_losses")
    nonmembers = _as_array(nonmember_losses, "nonmember_losses")
    both = np.concatenate([members, nonmembers])
    if not np.isfinite(both).all():
        raise ValueError("losses must be finite to be binned")
    if np.ndim(bins) == 0:
        if int(bins) < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        edges = np.histogram_bin_edges(both, bins=int(bins))
    else:
        edges = _as_array(bins, "bins")
    p, _ = np.histogram(members, bins=edges)
    q, _ = np.histogram(nonmembers, bins=edges)
    if p.sum() == 0 or q.sum() == 0:
        raise ValueError("no loss falls inside the bins for one of the two sets; widen the bin edges")
    return float(jensenshannon(p / p.sum(), q / q.sum(), base=2))


def outliers(per_run_member_correct: ArrayLike, per_run_nonmember_correct: ArrayLike) -> dict:
    """Examples an attack got right in every run, members and non-members apart.

    Liu, Oya & Kerschbaum, "Generalization Techniques Empirically Outperform Differential Privacy
    against Membership Inference" (arXiv:2110.05524, 2021), Section V-D.

    Args:
        per_run_member_correct: bool ``[R, N_m]``: run r's attack called member m a member.
        per_run_nonmember_correct: bool ``[R, N_n]``: run r's attack called non-member n a non-member.

    Returns:
        A dict with ``members`` and ``nonmembers`` (int index arrays of the outliers) and
        ``member_fraction`` and ``nonmember_fraction`` (their share of each set).
    """
    members = _as_array(per_run_member_correct, "per_run_member_correct", dtype=bool, ndim=2)
    nonmembers = _as_array(per_run_nonmember_correct, "per_run_nonmember_correct", dtype=bool, ndim=2)
    if members.shape[0] != nonmembers.shape[0]:
        raise ValueError(
            f"member results have {members.shape[0]} runs and non-member results "
            f"{nonmembers.shape[0]}; pass the same runs for both"
        )
    member_outliers = np.flatnonzero(members.all(axis=0))
    nonmember_outliers = np.flatnonzero(nonmembers.all(axis=0))
    return {
        "members": member_outliers,
        "nonmembers": nonmember_outliers,
        "member_fraction": len(member_outliers) / members.shape[1],
        "nonmember_fraction": len(nonmember_outliers) / nonmembers.shape[1],
    }
