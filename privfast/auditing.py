"""Empirical privacy auditing: lower bounds on epsilon from attacks on canaries, and the audits that make them.

An accountant's epsilon is an upper bound that holds if the implementation does what the analysis
assumes. An audit measures the same run from the other side: canaries are each included with
probability 1/2, an attack guesses which were, and the attack's success gives a lower bound on the
epsilon the run can have. A lower bound above the accountant's epsilon is a privacy bug.

Bounds (pure functions, float64):

- :func:`clopper_pearson_bound`: an attack's false positives and false negatives at a threshold,
  turned into ``eps >= log((1 - delta - FNR) / FPR)`` with Clopper-Pearson confidence bounds on the
  two rates, maximised over thresholds with a Bonferroni correction (Jagielski et al., NeurIPS 2020;
  Nasr et al., IEEE S&P 2021);
- :func:`one_run_epsilon` / :func:`one_run_bound`: the one-run bound of Steinke, Nasr and Jagielski
  ("Privacy Auditing with One (1) Training Run", NeurIPS 2023): m canaries, the attacker guesses
  the k+ highest and k- lowest scores, the bound from the number of correct guesses;
- :func:`gdp_estimate`: the Gaussian-DP estimate of Nasr et al. ("Tight Auditing of Differentially
  Private Machine Learning", USENIX Security 2023): mu from the canary statistic's two Gaussian
  fits, then :func:`gdp_epsilon`, with an exact confidence interval.

Audits wired into training:

- :func:`audit_one_run` (black box): m mislabelled canary images, each inserted with probability
  1/2, one training run through :class:`~privfast.privacy_engine.PrivacyEngine` (any method of
  :class:`~privfast.config.TrainConfig`), canaries scored by an attack, :func:`one_run_bound`;
- :func:`audit_white_box`: :class:`GradientCanary` makes the private optimizer add, at every release,
  canary gradients of norm C along fixed orthonormal random directions, each with probability 1/2,
  before the noise (the real clipped-sum, noise and scale path of every ``grad_sample_mode``, K > 1
  included), and records the update's projection on each; :func:`gdp_estimate` of the projections.

    result = audit_white_box(TrainConfig(method="dp-sgd", target_epsilon=4, epochs=10))
    print(result.table())       # the accountant's epsilon beside the empirical one, with its confidence
    result.plot("canaries.png")
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats
import torch
from torch import Tensor, nn

from privfast.reports import table

__all__ = [
    "EPSILON_BOUNDS",
    "LM_SCORES",
    "SCORES",
    "AttackComparison",
    "AuditResult",
    "EpsilonBound",
    "GDPEstimate",
    "GradientCanary",
    "audit_checkpoint",
    "audit_one_run",
    "audit_one_run_language_model",
    "audit_white_box",
    "clopper_pearson_bound",
    "clopper_pearson_epsilon",
    "clopper_pearson_upper",
    "epsilon_from_error_rates",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_estimate",
    "mislabelled_canaries",
    "one_run_bound",
    "one_run_epsilon",
    "one_run_p_value",
    "rmia_audit",
]

ArrayLike = Union[np.ndarray, Tensor, Sequence[float]]


def _array(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name} holds NaN values")
    return array


def _check_delta(delta: float) -> None:
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


@dataclass
class EpsilonBound:
    """A lower bound on epsilon: with probability at least ``confidence`` over the audit's randomness,
    no (epsilon', delta)-DP mechanism with epsilon' < ``epsilon`` produces the observed outcome.

    Attributes:
        epsilon: the lower bound (0 when the outcome proves nothing).
        confidence: the probability that the bound holds, multiple comparisons included.
        delta: the delta it is stated at.
        method: ``"clopper-pearson"`` or ``"one-run"``.
        details: what the bound was computed from (counts, threshold, comparisons).
    """

    epsilon: float
    confidence: float
    delta: float
    method: str
    details: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Clopper-Pearson bound from an attack's error rates
# ------------------------------------------------------------------------------------------------
def clopper_pearson_upper(successes: ArrayLike, trials: ArrayLike, *, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper confidence bound of a binomial rate (Clopper & Pearson, 1934).

    ``P[rate > bound] <= alpha`` for every true rate: the bound is the ``1 - alpha`` quantile of
    ``Beta(k + 1, n - k)``, and 1 when ``k = n``.

    Args:
        successes: counts ``k``, any shape.
        trials: counts ``n >= k``, broadcastable with ``successes``.
        alpha: the one-sided error level in (0, 1).

    Returns:
        float64 bounds in (0, 1], of the broadcast shape.
    """
    k, n = np.broadcast_arrays(np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64))
    if (k < 0).any() or (k > n).any() or (n < 1).any():
        raise ValueError("need 0 <= successes <= trials and trials >= 1")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    full = k >= n
    bound = scipy.stats.beta.ppf(1 - alpha, k + 1, np.where(full, 1.0, n - k))
    return np.where(full, 1.0, bound)


def epsilon_from_error_rates(fpr: ArrayLike, fnr: ArrayLike, *, delta: float) -> np.ndarray:
    """The smallest epsilon an (epsilon, delta)-DP mechanism needs to let a test reach these error rates.

    Any test of "canary in" against "canary out" on an (epsilon, delta)-DP output satisfies
    ``FPR + e^eps FNR >= 1 - delta`` and ``FNR + e^eps FPR >= 1 - delta`` (Kairouz, Oh and
    Viswanath, ICML 2015, Thm. 2.1), so ``eps >= max(log((1 - delta - FNR) / FPR),
    log((1 - delta - FPR) / FNR))``.

    Args:
        fpr: false-positive rates in [0, 1].
        fnr: false-negative rates in [0, 1], broadcastable with ``fpr``.
        delta: in [0, 1).

    Returns:
        float64 epsilons >= 0 (``inf`` for a perfect test).
    """
    _check_delta(delta)
    fpr, fnr = np.broadcast_arrays(np.asarray(fpr, dtype=np.float64), np.asarray(fnr, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.clip(1 - delta - fnr, 0, None)) - np.log(fpr)
        two = np.log(np.clip(1 - delta - fpr, 0, None)) - np.log(fnr)
    eps = np.fmax(np.where(np.isnan(one), -np.inf, one), np.where(np.isnan(two), -np.inf, two))
    return np.maximum(eps, 0.0)


def clopper_pearson_epsilon(
    *,
    false_positives: ArrayLike,
    negatives: int,
    false_negatives: ArrayLike,
    positives: int,
    delta: float,
    confidence: float = 0.95,
    comparisons: int = 1,
) -> np.ndarray:
    """Lower bound on epsilon from an attack's errors at one threshold (or several, corrected).

    Both error rates are replaced by their one-sided Clopper-Pearson upper bounds and put in
    :func:`epsilon_from_error_rates`. Each of the ``2 * comparisons`` upper bounds is taken at level
    ``(1 - confidence) / (2 * comparisons)``, so that by the union bound (Bonferroni) every bound in
    the returned array holds together with probability at least ``confidence``: the maximum over
    them is a valid lower bound.

    Args:
        false_positives: non-canaries (OUT) called IN, per threshold.
        negatives: OUT trials.
        false_negatives: canaries (IN) called OUT, per threshold.
        positives: IN trials.
        delta: in [0, 1).
        confidence: in (0, 1).
        comparisons: the number of thresholds the maximum is taken over.

    Returns:
        float64 lower bounds, one per threshold.
    """
    _check_confidence(confidence)
    if comparisons < 1:
        raise ValueError(f"comparisons must be >= 1, got {comparisons}")
    alpha = (1 - confidence) / (2 * comparisons)
    fpr = clopper_pearson_upper(false_positives, negatives, alpha=alpha)
    fnr = clopper_pearson_upper(false_negatives, positives, alpha=alpha)
    return epsilon_from_error_rates(fpr, fnr, delta=delta)


def clopper_pearson_bound(
    in_scores: ArrayLike,
    out_scores: ArrayLike,
    *,
    delta: float,
    confidence: float = 0.95,
    thresholds: Optional[ArrayLike] = None,
) -> EpsilonBound:
    """Clopper-Pearson lower bound on epsilon, maximised over the thresholds "IN iff score >= t".

    Multiple comparisons: with T thresholds each rate bound is taken at ``(1 - confidence) / (2T)``
    (:func:`clopper_pearson_epsilon`). Taking every distinct score as a threshold (the default) is a
    data-dependent choice the union bound still covers: at a threshold equal to one of the OUT
    scores, the true FPR is a Beta-distributed order statistic that the Clopper-Pearson bound of
    that count dominates, and thresholds equal to IN scores are fixed given the IN sample (and
    symmetrically for the FNR); the T events are a fixed family indexed by rank.

    Args:
        in_scores: ``[N_in]`` scores of trials with the canary (higher = "IN").
        out_scores: ``[N_out]`` scores of trials without it.
        delta: in [0, 1).
        confidence: in (0, 1).
        thresholds: ``[T]`` thresholds fixed before seeing the scores (fewer comparisons, a smaller
            correction), or None for every distinct score.

    Returns:
        :class:`EpsilonBound` with ``details``: ``threshold``, ``fpr``, ``fnr`` (observed),
        ``comparisons``.
    """
    inside, outside = _array(in_scores, "in_scores"), _array(out_scores, "out_scores")
    if thresholds is None:
        candidates = np.unique(np.concatenate([inside, outside]))
    else:
        candidates = _array(thresholds, "thresholds")
    outside_sorted, inside_sorted = np.sort(outside), np.sort(inside)
    false_positives = len(outside) - np.searchsorted(outside_sorted, candidates, side="left")  # OUT with score >= t
    false_negatives = np.searchsorted(inside_sorted, candidates, side="left")  # IN with score < t
    eps = clopper_pearson_epsilon(
        false_positives=false_positives,
        negatives=len(outside),
        false_negatives=false_negatives,
        positives=len(inside),
        delta=delta,
        confidence=confidence,
        comparisons=len(candidates),
    )
    best = int(np.argmax(eps))
    return EpsilonBound(
        float(eps[best]),
        confidence,
        delta,
        "clopper-pearson",
        {
            "threshold": float(candidates[best]),
            "fpr": float(false_positives[best] / len(outside)),
            "fnr": float(false_negatives[best] / len(inside)),
            "comparisons": len(candidates),
            "in_trials": len(inside),
            "out_trials": len(outside),
        },
    )


# ------------------------------------------------------------------------------------------------
# One training run (Steinke, Nasr and Jagielski, NeurIPS 2023)
# ------------------------------------------------------------------------------------------------
def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not (
        isinstance(canaries, (int, np.integer))
        and isinstance(guesses, (int, np.integer))
        and isinstance(correct, (int, np.integer))
    ):
        raise ValueError(f"canaries, guesses and correct must be integers, got {canaries!r}, {guesses!r}, {correct!r}")
    if not 0 <= correct <= guesses <= canaries or canaries < 1:
        raise ValueError(
            f"need 0 <= correct <= guesses <= canaries and canaries >= 1, got correct={correct}, "
            f"guesses={guesses}, canaries={canaries}"
        )


def one_run_p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``correct`` right guesses out of ``guesses`` under (epsilon, delta)-DP.

    Steinke, Nasr and Jagielski (NeurIPS 2023), Corollary 5.4 as computed by their Appendix D: with
    m canaries each included independently with probability 1/2 and r guesses (the rest abstained
    on), ``P[W >= v] <= P[Binomial(r, q) >= v] + 2 m delta alpha`` with ``q = e^eps / (1 + e^eps)``
    (the accuracy of eps-DP randomized response) and
    ``alpha = max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i``.

    Args:
        canaries: m, each included with probability 1/2.
        guesses: r <= m, the canaries the attacker did not abstain on.
        correct: v <= r, its correct guesses.
        epsilon: the null hypothesis' epsilon >= 0.
        delta: its delta in [0, 1).

    Returns:
        The p-value, in [0, 1].
    """
    _check_counts(canaries, guesses, correct)
    _check_delta(delta)
    if not 0 <= epsilon < math.inf:
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    q = scipy.special.expit(epsilon)
    tail = scipy.stats.binom.sf(correct - 1, guesses, q)
    alpha = 0.0
    if delta > 0 and correct > 0:
        below = np.cumsum(scipy.stats.binom.pmf(correct - np.arange(1, correct + 1), guesses, q))
        alpha = float(np.max(below / np.arange(1, correct + 1)))
    return float(min(tail + alpha * delta * 2 * canaries, 1.0))


def one_run_epsilon(*, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``correct`` right guesses out of ``guesses`` reject at ``confidence``.

    Steinke, Nasr and Jagielski (NeurIPS 2023), Appendix D's ``get_eps_audit``: the p-value of
    :func:`one_run_p_value` grows with epsilon; the bound is where it reaches ``1 - confidence``
    (found by Brent's method, returned rounded down). Reproduces the paper's 0.673 for m = 1000,
    r = 100, v = 75, delta = 1e-4 at 95%.

    Returns:
        The lower bound on epsilon (0 when even epsilon = 0 is not rejected).
    """
    _check_confidence(confidence)
    beta = 1 - confidence

    def excess(eps: float) -> float:
        return one_run_p_value(canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta) - beta

    if excess(0.0) >= 0:
        return 0.0
    high = 1.0
    while excess(high) < 0:
        high *= 2
        if high > 1e4:  # p-values this small are below floating point: report the cap rather than loop
            return high
    root = scipy.optimize.brentq(excess, 0.0, high, xtol=1e-9, rtol=1e-12)
    return max(0.0, root - 1e-9)


def _guess_grid(canaries: int) -> list[int]:
    """Default numbers of guesses: fractions of m, so that a perfect attack uses them all and a weak one few."""
    grid = sorted({max(2, 2 * round(f * canaries / 2)) for f in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)})
    return [r for r in grid if r <= canaries] or [canaries]


def one_run_bound(
    scores: ArrayLike,
    inserted: ArrayLike,
    *,
    delta: float,
    confidence: float = 0.95,
    guesses: Optional[Sequence[int]] = None,
) -> EpsilonBound:
    """One-run lower bound on epsilon from canary scores (Steinke, Nasr and Jagielski, NeurIPS 2023).

    For each number of guesses r the attacker guesses IN for the ``ceil(r / 2)`` highest scores
    and OUT for the ``floor(r / 2)`` lowest, abstaining on the rest, and :func:`one_run_epsilon`
    turns its correct guesses into a bound. The best over the r tried is reported, each tried at
    ``1 - (1 - confidence) / len(guesses)`` (Bonferroni), so the reported bound holds at ``confidence``.

    Args:
        scores: ``[m]`` canary scores (higher = "included").
        inserted: bool ``[m]``: canary i was included (by an independent fair coin).
        delta: the delta of the bound.
        confidence: in (0, 1).
        guesses: the numbers of guesses r to try (default: 2%, 5%, 10%, 20%, 50% and 100% of m).

    Returns:
        :class:`EpsilonBound` with ``details``: ``canaries``, ``guesses``, ``k_plus``, ``k_minus``,
        ``correct``, ``comparisons``.
    """
    values = _array(scores, "scores")
    included = np.asarray(inserted.detach().cpu() if hasattr(inserted, "detach") else inserted, dtype=bool)
    if included.shape != values.shape:
        raise ValueError(f"inserted has shape {included.shape} but scores {values.shape}")
    m = len(values)
    grid = _guess_grid(m) if guesses is None else [int(r) for r in guesses]
    if not grid or any(not 1 <= r <= m for r in grid):
        raise ValueError(f"guesses must be in [1, {m}], got {grid}")
    order = np.argsort(-values, kind="stable")  # highest first
    level = 1 - (1 - confidence) / len(grid)
    best = None
    for r in grid:
        k_plus, k_minus = (r + 1) // 2, r // 2
        correct = int(included[order[:k_plus]].sum()) + int((~included[order[m - k_minus :]]).sum() if k_minus else 0)
        eps = one_run_epsilon(canaries=m, guesses=r, correct=correct, delta=delta, confidence=level)
        if best is None or eps > best[0]:
            best = (eps, r, k_plus, k_minus, correct)
    eps, r, k_plus, k_minus, correct = best
    return EpsilonBound(
        eps,
        confidence,
        delta,
        "one-run",
        {
            "canaries": m,
            "guesses": r,
            "k_plus": k_plus,
            "k_minus": k_minus,
            "correct": correct,
            "comparisons": len(grid),
        },
    )


# ------------------------------------------------------------------------------------------------
# Gaussian differential privacy (Dong, Roth and Su 2022; Nasr et al., USENIX Security 2023)
# ------------------------------------------------------------------------------------------------
def gdp_delta(mu: float, epsilon: float) -> float:
    """The delta of mu-GDP at epsilon: ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``.

    Dong, Roth and Su (JRSS-B 2022), Corollary 2.13: the exact privacy profile of the Gaussian
    mechanism with sensitivity / noise std = mu. The second term is formed in log space
    (``exp(eps + log Phi(.))``), so it neither overflows nor cancels for large epsilon.
    """
    if not mu >= 0 or not epsilon >= 0:
        raise ValueError(f"need mu >= 0 and epsilon >= 0, got mu={mu}, epsilon={epsilon}")
    if mu == 0:
        return 0.0
    first = scipy.special.ndtr(-epsilon / mu + mu / 2)
    second = math.exp(epsilon + scipy.special.log_ndtr(-epsilon / mu - mu / 2))
    return float(max(first - second, 0.0))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon of mu-GDP at delta: the root of :func:`gdp_delta` ``(mu, eps) = delta`` (Brent's method).

    Args:
        mu: >= 0 (``inf`` gives ``inf``).
        delta: in (0, 1).

    Returns:
        The smallest epsilon >= 0 with ``gdp_delta(mu, epsilon) <= delta``.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if math.isnan(mu) or mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    if math.isinf(mu):
        return math.inf
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    high = max(1.0, mu * mu)
    while gdp_delta(mu, high) > delta:  # delta(eps) decreases in eps: widen until the root is bracketed
        high *= 2
    return float(scipy.optimize.brentq(lambda eps: gdp_delta(mu, eps) - delta, 0.0, high, xtol=1e-12, rtol=1e-12))


@dataclass
class GDPEstimate:
    """mu and epsilon of Gaussian DP fitted to a canary statistic, with a confidence interval.

    Attributes:
        mu: the point estimate ``(mean_in - mean_out) / pooled std``.
        mu_low, mu_high: its two-sided ``confidence`` interval.
        epsilon: :func:`gdp_epsilon` of ``|mu|``.
        epsilon_low, epsilon_high: the interval mapped through :func:`gdp_epsilon` (monotone in ``|mu|``).
        confidence: of the interval.
        delta: of the epsilons.
        details: ``mean_in``, ``mean_out``, ``std_in``, ``std_out``, ``std``, ``n_in``, ``n_out``.
    """

    mu: float
    mu_low: float
    mu_high: float
    epsilon: float
    epsilon_low: float
    epsilon_high: float
    confidence: float
    delta: float
    details: dict = field(default_factory=dict)


def _noncentrality_interval(t: float, df: float, confidence: float) -> tuple[float, float]:
    """Exact interval of the noncentrality of a noncentral t observed at ``t`` (CDF inverted by Brent's method)."""
    tail = (1 - confidence) / 2
    dist = scipy.stats.nct

    def solve(target: float) -> float:
        # cdf(t; nc) decreases in nc from 1 to 0: bracket the nc with cdf = target around t, a few
        # standard errors of the normal approximation wide (scipy's nct returns NaN far in the tails,
        # where the CDF is 1 below t and 0 above).
        def f(nc: float) -> float:
            value = dist.cdf(t, df, nc)
            return (1.0 if nc < t else 0.0) - target if math.isnan(value) else value - target

        width = 3.0 * math.sqrt(1 + t * t / (2 * df))
        low, high = t - width, t + width
        while f(low) < 0:
            low -= width
        while f(high) > 0:
            high += width
        return scipy.optimize.brentq(f, low, high, xtol=1e-10)

    return solve(1 - tail), solve(tail)


def gdp_estimate(in_scores: ArrayLike, out_scores: ArrayLike, *, delta: float, confidence: float = 0.95) -> GDPEstimate:
    """Gaussian-DP estimate of the mechanism behind a canary statistic (Nasr et al., USENIX Security 2023).

    Under mu-GDP with a Gaussian statistic of equal variance under both hypotheses (the white-box
    gradient canary's projection is exactly that), ``mu = (mean_in - mean_out) / std``: the fitted
    Gaussians' shift in units of their common standard deviation (pooled). Then
    ``epsilon = gdp_epsilon(mu, delta)`` (Nasr et al., Sec. 4; Dong, Roth and Su, Cor. 2.13).

    Confidence interval: ``mu_hat * sqrt(n_in n_out / (n_in + n_out))`` is Student's two-sample t,
    distributed as a noncentral t with ``n_in + n_out - 2`` degrees of freedom and noncentrality
    ``mu * sqrt(n_in n_out / (n_in + n_out))``; inverting its CDF (scipy's ``nct``) gives an exact
    interval for mu, which :func:`gdp_epsilon` maps to epsilon.

    Args:
        in_scores: ``[N_in]`` statistic with the canary.
        out_scores: ``[N_out]`` statistic without it.
        delta: in (0, 1).
        confidence: two-sided level of the interval, in (0, 1).

    Returns:
        :class:`GDPEstimate`.
    """
    inside, outside = _array(in_scores, "in_scores"), _array(out_scores, "out_scores")
    _check_confidence(confidence)
    n_in, n_out = len(inside), len(outside)
    if n_in < 2 or n_out < 2:
        raise ValueError(f"need at least 2 trials with and without the canary, got {n_in} and {n_out}")
    pooled = ((n_in - 1) * inside.var(ddof=1) + (n_out - 1) * outside.var(ddof=1)) / (n_in + n_out - 2)
    if not pooled > 0:
        raise ValueError("the statistic does not vary: a Gaussian cannot be fitted (is the noise zero?)")
    std = math.sqrt(pooled)
    mu = (inside.mean() - outside.mean()) / std
    scale = math.sqrt(n_in * n_out / (n_in + n_out))
    nc_low, nc_high = _noncentrality_interval(mu * scale, n_in + n_out - 2, confidence)
    mu_low, mu_high = nc_low / scale, nc_high / scale
    eps_low = 0.0 if mu_low <= 0 <= mu_high else gdp_epsilon(min(abs(mu_low), abs(mu_high)), delta)
    eps_high = gdp_epsilon(max(abs(mu_low), abs(mu_high)), delta)
    return GDPEstimate(
        float(mu),
        float(mu_low),
        float(mu_high),
        gdp_epsilon(abs(mu), delta),
        eps_low,
        eps_high,
        confidence,
        delta,
        {
            "mean_in": float(inside.mean()),
            "mean_out": float(outside.mean()),
            "std_in": float(inside.std(ddof=1)),
            "std_out": float(outside.std(ddof=1)),
            "std": std,
            "n_in": n_in,
            "n_out": n_out,
        },
    )


# ------------------------------------------------------------------------------------------------
# White-box gradient canaries inside the private optimizer
# ------------------------------------------------------------------------------------------------
class GradientCanary:
    """White-box canaries: extra clipped gradients along fixed random directions, each present with probability 1/2.

    Attached to a :class:`~privfast.optim.DPOptimizer` (:meth:`attach`), at every Gaussian release
    (every noisy step; two per DP-SAM step) it flips one fair coin per canary j and adds
    ``s * C * u_j`` to the clipped sum of the batch *before the noise* (``C`` the clipping bound,
    ``s`` the optimizer's sensitivity, 2 with microbatches), so that the canary goes through the
    same noise, scale and parameter-update path as the real examples, whatever the
    ``grad_sample_mode`` and K. After the noise it records the released update's projection on each
    ``u_j``. The directions are orthonormal random unit vectors over all trainable parameters
    (Nasr et al., USENIX Security 2023, Sec. 5's gradient canaries), so the c canaries of one release
    are c independent trials: ``<z, u_j>`` are independent standard normals for the noise ``z``.

    The statistic of canary j at a release is ``(<update, u_j> / scale - <S, u_j>) / (s C)``, with
    ``S`` the clipped sum of the batch's real examples: a white-box adversary knows the rest of the
    data set and the model, hence ``S`` (DP protects the canary against exactly that adversary).
    For a correct implementation it is ``b_j + (sigma / s) * N(0, 1)`` with ``b_j`` the coin: a Gaussian
    mechanism with ``mu = s / sigma = 1 / accounting noise multiplier``. Without the subtraction
    (``subtract_known=False`` in :meth:`estimate`) the batch's own projection adds variance and the
    estimate is conservative.

    Args:
        params: the optimizer's trainable parameters (``optimizer.params``), in its order.
        canaries: c, the canaries per release (orthonormal directions; c <= number of parameters).
        generator: CPU generator of the directions and the coins (default: a fresh seed from torch's).

    Attributes:
        claimed_mu: ``1 / accounting_noise_multiplier`` of the optimizer at the last release.
    """

    def __init__(
        self, params: Sequence[nn.Parameter], *, canaries: int = 1, generator: Optional[torch.Generator] = None
    ):
        params = [p for p in params if p.requires_grad]
        dim = sum(p.numel() for p in params)
        if not params:
            raise ValueError("no trainable parameters to place gradient canaries on")
        if not 1 <= canaries <= dim:
            raise ValueError(
                f"canaries must be in [1, {dim}] (orthonormal directions in the parameter space), got {canaries}"
            )
        self.generator = (
            generator if generator is not None else torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
        )
        gaussian = torch.randn(dim, canaries, generator=self.generator, dtype=torch.float64)
        # Orthonormal columns: a random rotation's first c axes, uniformly distributed directions.
        basis = torch.linalg.qr(gaussian).Q if canaries > 1 else gaussian / gaussian.norm()
        self.directions: dict[nn.Parameter, Tensor] = {}
        for p, chunk in zip(params, basis.split([p.numel() for p in params])):
            self.directions[p] = chunk.T.reshape(canaries, *p.shape).to(device=p.device, dtype=p.dtype)
        self.canaries = canaries
        self.claimed_mu = math.nan
        self._pending = None
        self._coins: list[Tensor] = []
        self._statistic: list[Tensor] = []
        self._raw: list[Tensor] = []

    def attach(self, optimizer) -> "GradientCanary":
        """Make ``optimizer`` (a :class:`~privfast.optim.DPOptimizer`) call :meth:`insert` and :meth:`record`."""
        owned = set(optimizer.params)
        if any(p not in owned for p in self.directions):
            raise ValueError("the canary was built for other parameters than the optimizer's: pass optimizer.params")
        optimizer.attach_audit_canary(self)
        return self

    def _project(self, tensor: Tensor, p: nn.Parameter) -> Tensor:
        """``[c]`` float64 inner products of ``tensor`` (shaped like ``p``) with the c directions."""
        return self.directions[p].reshape(self.canaries, -1).double() @ tensor.reshape(-1).double()

    def insert(self, optimizer, summed: dict) -> None:
        """Before the noise: add each canary whose coin comes up to ``summed`` (parameter -> clipped sum), in place."""
        magnitude = optimizer.sensitivity * optimizer.max_grad_norm
        first = next(iter(self.directions))
        known = torch.zeros(self.canaries, dtype=torch.float64, device=first.device)
        for p in self.directions:
            if p in summed:
                known = known + self._project(summed[p], p)
        coins = torch.rand(self.canaries, generator=self.generator) < 0.5
        weights = coins.to(device=first.device)
        for p, u in self.directions.items():
            canary = magnitude * torch.tensordot(weights.to(u.dtype), u, dims=1)
            summed[p] = summed[p] + canary.to(summed[p].dtype) if p in summed else canary
        self.claimed_mu = math.inf if optimizer.noise_multiplier == 0 else 1 / optimizer.accounting_noise_multiplier
        self._pending = (coins, known, optimizer.noise_scale, magnitude)

    def record(self, optimizer) -> None:
        """After the noise: record the released update's projections (kept on the device: no host sync per step)."""
        if self._pending is None:
            raise RuntimeError("record() without insert(): the optimizer must call both around its noise")
        coins, known, scale, magnitude = self._pending
        projection = torch.zeros_like(known)
        for p in self.directions:
            if p.grad is not None:
                projection = projection + self._project(p.grad, p)
        projection = projection / scale / magnitude
        self._coins.append(coins)
        self._statistic.append(projection - known / magnitude)
        self._raw.append(projection)
        self._pending = None

    @property
    def releases(self) -> int:
        """Gaussian releases recorded so far."""
        return len(self._coins)

    @property
    def inserted(self) -> Tensor:
        """bool ``[releases, c]``: whether canary j was in the sum at release t."""
        return torch.stack(self._coins) if self._coins else torch.zeros(0, self.canaries, dtype=torch.bool)

    def statistic(self, *, subtract_known: bool = True) -> Tensor:
        """float64 ``[releases, c]`` projections in units of ``s * C``, the batch's known part subtracted or not."""
        values = self._statistic if subtract_known else self._raw
        if not values:
            return torch.zeros(0, self.canaries, dtype=torch.float64)
        return torch.stack(values).cpu()

    def estimate(self, *, delta: float, confidence: float = 0.95, subtract_known: bool = True) -> GDPEstimate:
        """:func:`gdp_estimate` of one release's mechanism from all recorded (release, canary) trials."""
        if self.releases == 0:
            raise ValueError("no release recorded: attach the canary and train first")
        values, inserted = self.statistic(subtract_known=subtract_known), self.inserted
        return gdp_estimate(values[inserted], values[~inserted], delta=delta, confidence=confidence)


# ------------------------------------------------------------------------------------------------
# Audits of a training recipe
# ------------------------------------------------------------------------------------------------
@dataclass
class AuditResult:
    """One audit of a training run: the accountant's epsilon beside the empirical one.

    Attributes:
        method: ``"one-run"`` (black box) or ``"white-box"``.
        accountant_epsilon: the run's epsilon from its accountant (``inf`` for a non-private run).
        epsilon: the empirical lower bound (one-run), or the whole run's estimate (white-box).
        epsilon_low, epsilon_high: the estimate's confidence interval (white-box); for one-run both
            are ``epsilon`` (a one-sided bound).
        confidence: the level of the bound or interval.
        delta: of every epsilon.
        in_scores, out_scores: the canary scores (one-run) or statistics (white-box) with and
            without the canary, for :meth:`plot`.
        seconds: wall time of the audit (training included).
        details: method-specific numbers (the bound's counts; the per-release estimate, ...).
    """

    method: str
    accountant_epsilon: float
    epsilon: float
    epsilon_low: float
    epsilon_high: float
    confidence: float
    delta: float
    in_scores: np.ndarray
    out_scores: np.ndarray
    seconds: float
    details: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        """Table rows: what is compared, the accountant's epsilon, the empirical one with its confidence."""
        pct = f"{100 * self.confidence:g}%"
        if self.method == "one-run":
            d = self.details
            return [
                {
                    "audit": "one-run (black box), whole run",
                    "accountant": self.accountant_epsilon,
                    "empirical": f"{self.epsilon:.3f}",
                    "kind": f"lower bound, {pct} confidence",
                    "trials": f"{d['canaries']} canaries, {d['correct']}/{d['guesses']} guesses right",
                }
            ]
        step = self.details["per_release"]
        return [
            {
                "audit": "white-box, one release",
                "accountant": self.details["per_release_accountant_epsilon"],
                "empirical": f"{step['epsilon']:.3f} [{step['epsilon_low']:.3f}, {step['epsilon_high']:.3f}]",
                "kind": f"GDP estimate [{pct} CI]",
                "trials": f"{step['details']['n_in'] + step['details']['n_out']} canary releases (mu {step['mu']:.3f})",
            },
            {
                "audit": "white-box, whole run",
                "accountant": self.accountant_epsilon,
                "empirical": f"{self.epsilon:.3f} [{self.epsilon_low:.3f}, {self.epsilon_high:.3f}]",
                "kind": f"accountant at the measured noise [{pct} CI]",
                "trials": f"claimed mu {self.details['claimed_mu']:.3f} per release",
            },
        ]

    def table(self, *, markdown: bool = False) -> str:
        """The rows of :meth:`rows` as aligned text or Markdown."""
        header = ["audit", "accountant eps", "empirical eps", "kind", "trials"]
        body = [[r["audit"], f"{r['accountant']:.3f}", r["empirical"], r["kind"], r["trials"]] for r in self.rows()]
        return table(header, body, markdown=markdown, align="l" * len(header))

    def plot(self, path, *, bins: int = 40):
        """Histogram of the canaries' scores with and without the canary (PNG at ``path``); returns the path."""
        from pathlib import Path

        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        both = np.concatenate([self.in_scores, self.out_scores])
        finite = both[np.isfinite(both)]
        edges = np.histogram_bin_edges(finite, bins=bins) if finite.size else bins
        ax.hist(
            np.clip(self.out_scores, finite.min(), finite.max()) if finite.size else self.out_scores,
            bins=edges,
            alpha=0.6,
            label=f"canary out ({len(self.out_scores)})",
        )
        ax.hist(
            np.clip(self.in_scores, finite.min(), finite.max()) if finite.size else self.in_scores,
            bins=edges,
            alpha=0.6,
            label=f"canary in ({len(self.in_scores)})",
        )
        what = "canary score" if self.method == "one-run" else "update projection on the canary (units of C)"
        ax.set_xlabel(what)
        ax.set_ylabel("count")
        ax.set_title(f"{self.method}: empirical eps {self.epsilon:.2f} vs accountant {self.accountant_epsilon:.2f}")
        ax.legend()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        return path

    def to_dict(self) -> dict:
        """JSON-ready numbers (scores as lists)."""
        values = dataclasses.asdict(self)
        values["in_scores"], values["out_scores"] = self.in_scores.tolist(), self.out_scores.tolist()
        return values


Score = Union[str, Callable[[nn.Module, Tensor, Tensor], Tensor]]
SCORES = ("loss", "confidence")
"""Canary scores :func:`audit_one_run` knows by name: ``-loss`` (Yeom's) and LiRA's logit-scaled confidence."""


def _canary_scores(score: Score, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    from privfast.attacks import example_losses, logit_confidence, predict_logits

    if callable(score):
        values = torch.as_tensor(score(model, x, y))
    elif score == "loss":
        values = -example_losses(model, x, y)
    elif score == "confidence":
        logits = predict_logits(model, x)
        values = logit_confidence(logits.double(), y.to(logits.device))
    else:
        raise ValueError(f"unknown score {score!r}; expected one of {SCORES} or a callable (model, x, y) -> [m]")
    if values.shape != y.shape:
        raise ValueError(f"the score returned shape {tuple(values.shape)} for {len(y)} canaries")
    return values.detach().cpu().double()


def _audit_config(config):
    """The recipe as it is audited: no per-epoch membership attacks (they cost time and measure something else)."""
    return dataclasses.replace(config, attacks=())


def mislabelled_canaries(data, *, canaries: int, num_classes: int, generator: torch.Generator):
    """``canaries`` images of ``data`` with a wrong label each, and the rest of ``data``.

    A mislabelled image is the black-box one-run audit's canary (Steinke, Nasr and Jagielski, Sec. 7):
    the model fits it only by memorizing it, and its loss says whether it did.

    Args:
        data: ``(x [N, ...], y [N])`` never trained on otherwise (e.g. the test split).
        canaries: m < N.
        num_classes: labels are drawn among these.
        generator: picks the images and their wrong labels.

    Returns:
        ``(canaries (x [m, ...], y [m]), rest (x [N - m, ...], y [N - m]))``.
    """
    from privfast.data import Split

    x, y = data
    if not 1 <= canaries < len(y):
        raise ValueError(
            f"canaries must be in [1, {len(y) - 1}] (taken from {len(y)} held-out examples), got {canaries}"
        )
    if num_classes < 2:
        raise ValueError("mislabelled canaries need at least 2 classes")
    order = torch.randperm(len(y), generator=generator)
    chosen, rest = order[:canaries], order[canaries:]
    shift = torch.randint(1, num_classes, (canaries,), generator=generator)
    return Split(x[chosen], (y[chosen] + shift) % num_classes), Split(x[rest], y[rest])


def _one_run_result(
    scores,
    inserted: Tensor,
    *,
    accountant: float,
    delta: float,
    confidence: float,
    guesses: Optional[Sequence[int]],
    start: float,
    details: dict,
) -> AuditResult:
    """The :class:`AuditResult` of a one-run audit: :func:`one_run_bound` of the canaries' ``[m]`` scores."""
    included = inserted.numpy()
    bound = one_run_bound(scores, included, delta=delta, confidence=confidence, guesses=guesses)
    return AuditResult(
        "one-run",
        float(accountant),
        bound.epsilon,
        bound.epsilon,
        bound.epsilon,
        confidence,
        delta,
        scores[included],
        scores[~included],
        time.perf_counter() - start,
        {**bound.details, **details},
    )


def audit_one_run(
    config,
    *,
    canaries: int = 256,
    score: Score = "loss",
    confidence: float = 0.95,
    seed: int = 0,
    data=None,
    guesses: Optional[Sequence[int]] = None,
    progress: bool = False,
) -> AuditResult:
    """Black-box one-run audit of a training recipe (Steinke, Nasr and Jagielski, NeurIPS 2023, Sec. 7).

    m mislabelled test images (:func:`mislabelled_canaries`) are each added to the training set with
    probability 1/2; the recipe trains once (through :class:`~privfast.privacy_engine.PrivacyEngine`
    for the private methods, so DP-SGD, Self-Aug, DP-Mix and DP-SAM are audited as they run); the
    final model scores every canary and :func:`one_run_bound` turns the scores into a lower bound.

    Args:
        config: the :class:`~privfast.config.TrainConfig` to audit.
        canaries: m, drawn from the test split (the rest stays the test set).
        score: ``"loss"`` (-cross-entropy on the wrong label), ``"confidence"`` (LiRA's logit-scaled
            confidence), or any ``score(model, x [m, ...], y [m]) -> [m]`` (higher = "included").
        confidence: of the bound.
        seed: draws the canaries and the coins (the training itself is seeded by ``config.seed``).
        data: ``(train, test)`` splits; default: :func:`~privfast.data.load_data` of ``config``.
        guesses: numbers of guesses to try (see :func:`one_run_bound`).
        progress: show training progress bars.

    Returns:
        :class:`AuditResult` (``details``: the bound's counts, ``test_accuracy``, ``train_seconds``).
    """
    from privfast.data import Split, data_shape, load_data
    from privfast.trainer import Trainer

    start = time.perf_counter()
    train, test = data if data is not None else load_data(config)
    generator = torch.Generator().manual_seed(seed)
    num_classes = data_shape(train, test)["num_classes"]
    canary, rest = mislabelled_canaries(test, canaries=canaries, num_classes=num_classes, generator=generator)
    inserted = torch.rand(canaries, generator=generator) < 0.5
    trained_on = Split(torch.cat([train.x, canary.x[inserted]]), torch.cat([train.y, canary.y[inserted]]))
    trainer = Trainer(_audit_config(config), data=(trained_on, rest), progress=progress)
    history = trainer.fit()
    train_seconds = time.perf_counter() - start
    scores = _canary_scores(score, trainer.model.eval(), canary.x, canary.y).numpy()
    return _one_run_result(
        scores,
        inserted,
        accountant=history[-1].get("epsilon", math.inf),
        delta=config.delta,
        confidence=confidence,
        guesses=guesses,
        start=start,
        details={
            "score": score if isinstance(score, str) else getattr(score, "__name__", "custom"),
            "test_accuracy": history[-1]["test_accuracy"],
            "train_seconds": train_seconds,
        },
    )


LM_SCORES = ("calibrated", "log-perplexity")
"""Canary scores :func:`audit_one_run_language_model` knows by name."""


def audit_one_run_language_model(
    config=None,
    *,
    epsilon: float,
    canaries: int = 256,
    format: str = "digits",
    score: str = "calibrated",
    confidence: float = 0.95,
    seed: int = 0,
    guesses: Optional[Sequence[int]] = None,
    progress: bool = False,
) -> AuditResult:
    """Black-box one-run audit of language-model training with token secrets (Steinke, Nasr and Jagielski, Sec. 7).

    m canaries of one format ("the first number is" + random digits; :func:`~privfast.secret_sharer.secret_canaries`)
    share their context and differ only in their secrets; each is written into one training window
    of its own with probability 1/2 (a window is one example, so the bound audits per-example
    privacy). One model trains through :class:`~privfast.privacy_engine.PrivacyEngine` as
    :func:`~privfast.secret_sharer.train_language_model` trains it for the Secret Sharer; every canary
    is scored by minus its secret's log-perplexity after the shared context, and
    :func:`one_run_bound` turns the scores into a lower bound on epsilon.

    Args:
        config: the model, corpus and training recipe (:class:`~privfast.secret_sharer.SecretSharerConfig`;
            its ``epsilons``, ``repeats`` and ``formats`` are not used). Default: its defaults.
        epsilon: the budget the model trains at (``inf``: non-private, with the config's baseline optimizer).
        canaries: m; needs m / 2 windows of the training stream, about.
        format: the canaries' format, a name from :data:`~privfast.secret_sharer.CANARY_FORMATS`.
        score: ``"calibrated"``: the secret's log-perplexity after another context ("the second
            number is") minus after its own; ``"log-perplexity"``: minus its log-perplexity after its own.
        confidence: of the bound.
        seed: draws the secrets, the coins and the windows (training is seeded by ``config.seed``).
        guesses: numbers of guesses to try (see :func:`one_run_bound`).
        progress: training progress bars.

    Returns:
        :class:`AuditResult` (``details``: the bound's counts, ``test_perplexity``, ``train_seconds``, ``format``).

    Raises:
        ValueError: a bad ``epsilon`` or ``canaries``, a format the vocabulary cannot write, or a
            corpus with fewer windows than inserted canaries.
    """
    from privfast.attacks.exposure import score_candidates
    from privfast.secret_sharer import (
        SecretSharerConfig,
        fit_language_model,
        perplexity,
        secret_canaries,
    )
    from privfast.text import load_corpus, plant, windows

    config = config or SecretSharerConfig()
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 (inf: non-private), got {epsilon}")
    if canaries < 2:
        raise ValueError(f"the one-run audit needs at least 2 canaries, got {canaries}")
    if score not in LM_SCORES:
        raise ValueError(f"score must be one of {LM_SCORES}, got {score!r}")
    start = time.perf_counter()
    corpus = load_corpus(config.corpus, level=config.level, root=config.data_root, min_count=config.min_count)
    generator = torch.Generator().manual_seed(seed)
    drawn = secret_canaries(corpus, format=format, count=canaries, generator=generator)
    inserted = torch.rand(canaries, generator=generator) < 0.5
    eos = torch.tensor([corpus.vocab.id(corpus.tokenizer.eos)])
    chosen = [torch.cat([c.sequence, eos]) for c, keep in zip(drawn, inserted.tolist()) if keep]
    rows = windows(corpus.train, length=config.window)
    if chosen:
        rows, _ = plant(rows, chosen, [1] * len(chosen), generator=generator)
    model, trained = fit_language_model(
        config, rows, vocab_size=len(corpus.vocab), epsilon=epsilon, seed=config.seed, progress=progress
    )
    train_seconds = time.perf_counter() - start
    scores = -torch.stack([score_candidates(model.eval(), c, c.secret[None])[0] for c in drawn])
    if score == "calibrated":
        # The same secret after another context: what the model thinks of those symbols in that
        # order regardless of memorization (digit frequencies, learned formats) cancels out.
        others = secret_canaries(corpus, format=format, count=canaries, generator=generator)
        scores = scores + torch.stack(
            [score_candidates(model, other, c.secret[None])[0] for other, c in zip(others, drawn)]
        )
    return _one_run_result(
        scores.numpy(),
        inserted,
        accountant=trained["epsilon"],
        delta=config.delta,
        confidence=confidence,
        guesses=guesses,
        start=start,
        details={
            "score": score,
            "format": format,
            "test_perplexity": perplexity(model, windows(corpus.test, length=config.window)),
            "train_seconds": train_seconds,
        },
    )


def _epsilon_at_noise(accountant, factor: float, delta: float) -> float:
    """The accountant's epsilon for its own history with every noise multiplier multiplied by ``factor``.

    The white-box audit measures one release's mu; with the run's sampling rates and step counts
    unchanged, this is the run's epsilon at the measured noise. Falls back to the RDP accountant
    where the PRV accountant's discretisation fails (very small noise), and to ``inf`` beyond.
    """
    from opacus.accountants import create_accountant

    if factor <= 0:
        return math.inf
    if math.isinf(factor):
        return 0.0
    history = [(sigma * factor, rate, steps) for sigma, rate, steps in accountant.history]
    for mechanism in dict.fromkeys([accountant.mechanism(), "rdp"]):
        fresh = create_accountant(mechanism=mechanism)
        fresh.history = list(history)
        try:
            value = float(fresh.get_epsilon(delta))
        except (ValueError, OverflowError, ArithmeticError, RuntimeError):
            continue
        if math.isfinite(value):
            return value
    return math.inf


def audit_white_box(
    config,
    *,
    canaries: int = 16,
    confidence: float = 0.95,
    seed: int = 0,
    data=None,
    subtract_known: bool = True,
    progress: bool = False,
) -> AuditResult:
    """White-box audit of a private training recipe with :class:`GradientCanary` (Nasr et al., USENIX Security 2023).

    The recipe trains once with c gradient canaries attached to its private optimizer; every
    release yields c trials of one Gaussian release, so :func:`gdp_estimate` measures the mu of one
    release (``1 / accounting noise multiplier`` when correct). Two comparisons come out:

    - one release: the measured epsilon beside the accountant's epsilon for one release without
      subsampling (``gdp_epsilon(claimed mu)``, exact for the Gaussian mechanism); tight when the
      implementation is right, above it when the noise is too small for the claim;
    - the whole run: the run's own accountant re-run with every noise multiplier scaled by
      ``claimed mu / measured mu``. This is an estimate that trusts the sampling and composition
      (which the canaries do not test), not a lower bound; its interval comes from mu's.

    Args:
        config: a private :class:`~privfast.config.TrainConfig`.
        canaries: c per release (orthonormal directions).
        confidence: two-sided level of the intervals.
        seed: seeds the directions and coins.
        data: ``(train, test)`` splits; default: :func:`~privfast.data.load_data` of ``config``.
        subtract_known: subtract the batch's own (known) projection from the statistic.
        progress: show training progress bars.

    Returns:
        :class:`AuditResult` (``details``: ``per_release`` (a :class:`GDPEstimate` as a dict),
        ``per_release_batch_kept`` (the same without subtracting the batch's projection),
        ``per_release_accountant_epsilon``, ``claimed_mu``, ``releases``, ``test_accuracy``).

    Raises:
        ValueError: for a non-private method (there is no private optimizer to audit).
    """
    from privfast.trainer import Trainer

    if not config.private:
        raise ValueError(
            f"the white-box audit instruments the private optimizer; method {config.method!r} has none "
            "(audit it with the one-run audit)"
        )
    start = time.perf_counter()
    trainer = Trainer(_audit_config(config), data=data, progress=progress)
    canary = GradientCanary(
        trainer.optimizer.params, canaries=canaries, generator=torch.Generator().manual_seed(seed)
    ).attach(trainer.optimizer)
    history = trainer.fit()
    if math.isinf(canary.claimed_mu):
        raise ValueError("the run adds no noise (noise_multiplier 0): its epsilon is infinite, nothing to estimate")
    step = canary.estimate(delta=config.delta, confidence=confidence, subtract_known=subtract_known)
    claimed = canary.claimed_mu
    run = [
        _epsilon_at_noise(trainer.engine.accountant, claimed / abs(mu) if mu else math.inf, config.delta)
        for mu in (step.mu, step.mu_low if step.mu_low > 0 else 0.0, step.mu_high)
    ]
    values, inserted = canary.statistic(subtract_known=subtract_known), canary.inserted
    return AuditResult(
        "white-box",
        float(history[-1]["epsilon"]),
        run[0],
        run[1],
        run[2],
        confidence,
        config.delta,
        values[inserted].numpy(),
        values[~inserted].numpy(),
        time.perf_counter() - start,
        {
            "per_release": dataclasses.asdict(step),
            # With the batch's own projection left in: what a white-box adversary who does
            # not subtract it sees (lower; the gap is the clipped sum's share of the variance).
            "per_release_batch_kept": dataclasses.asdict(
                canary.estimate(delta=config.delta, confidence=confidence, subtract_known=False)
            ),
            "per_release_accountant_epsilon": gdp_epsilon(claimed, config.delta),
            "claimed_mu": claimed,
            "releases": canary.releases,
            "canaries": canaries,
            "test_accuracy": history[-1]["test_accuracy"],
        },
    )


EPSILON_BOUNDS = ("one-run", "white-box")
"""The audits :func:`audit_checkpoint` runs."""


def audit_checkpoint(
    checkpoint,
    *,
    bound: str,
    canaries: Optional[int] = None,
    confidence: float = 0.95,
    score: Optional[Score] = None,
    seed: int = 0,
    epsilon: Optional[float] = None,
    progress: bool = False,
) -> AuditResult:
    """Audit the recipe of a ``privfast train`` checkpoint or of a ``privfast secret-sharer`` run: train it again once.

    Args:
        checkpoint: a checkpoint written by :class:`~privfast.trainer.Trainer` (its configuration
            is the recipe; its own model is not the one audited: canaries must be in from the start),
            or the directory of a Secret Sharer run (its ``config.json``: the language-model recipe,
            audited with token secrets by :func:`audit_one_run_language_model`).
        bound: ``"one-run"`` (:func:`audit_one_run`) or ``"white-box"`` (:func:`audit_white_box`;
            image recipes only).
        canaries: m (one-run, default 256) or c per release (white-box, default 16).
        confidence: of the bound or interval.
        score: the one-run audit's canary score (default ``"loss"`` for images, ``"calibrated"`` for text).
        seed: seeds the canaries.
        epsilon: a Secret Sharer run's budget to audit (default: the smallest of its epsilons).
        progress: show progress bars.

    Returns:
        :class:`AuditResult`; ``details["checkpoint_epsilon"]`` is the epsilon the checkpoint recorded
        (for a Secret Sharer run: the budget audited).
    """
    from pathlib import Path

    if bound not in EPSILON_BOUNDS:
        raise ValueError(f"bound must be one of {EPSILON_BOUNDS}, got {bound!r}")
    run_config = Path(checkpoint) / "config.json"
    if run_config.is_file():
        return _audit_secret_sharer_run(
            run_config,
            bound=bound,
            canaries=canaries,
            confidence=confidence,
            score=score,
            seed=seed,
            epsilon=epsilon,
            progress=progress,
        )
    if epsilon is not None:
        raise ValueError("epsilon chooses among a Secret Sharer run's budgets; a training checkpoint has one")
    from privfast.checkpoint import load_trained

    _, config, history = load_trained(checkpoint)
    if bound == "one-run":
        result = audit_one_run(
            config, canaries=canaries or 256, score=score or "loss", confidence=confidence, seed=seed, progress=progress
        )
    else:
        result = audit_white_box(config, canaries=canaries or 16, confidence=confidence, seed=seed, progress=progress)
    result.details["checkpoint_epsilon"] = history[-1].get("epsilon", math.inf)
    result.details["method"] = config.method
    return result


def _audit_secret_sharer_run(
    path,
    *,
    bound: str,
    canaries: Optional[int],
    confidence: float,
    score: Optional[Score],
    seed: int,
    epsilon: Optional[float],
    progress: bool,
) -> AuditResult:
    import json

    from privfast.secret_sharer import SecretSharerConfig, training_recipe

    try:
        config = SecretSharerConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{path} is not a Secret Sharer run's configuration: {error}") from None
    if bound != "one-run":
        raise ValueError(
            f"a Secret Sharer run ({path.parent}) is audited with --epsilon-bound one-run (token "
            "secrets); the white-box audit takes a `privfast train` checkpoint"
        )
    if score is not None and (callable(score) or score not in LM_SCORES):
        raise ValueError(f"a language model's canary score is one of {LM_SCORES}, got {score!r}")
    epsilon = min(config.epsilons) if epsilon is None else float(epsilon)
    if epsilon not in config.epsilons:
        raise ValueError(f"epsilon {epsilon:g} is not one of the run's epsilons {list(config.epsilons)}")
    result = audit_one_run_language_model(
        config,
        epsilon=epsilon,
        canaries=canaries or 256,
        score=score or "calibrated",
        confidence=confidence,
        seed=seed,
        progress=progress,
    )
    result.details["checkpoint_epsilon"] = epsilon
    optimizer, _ = training_recipe(config, epsilon)
    result.details["method"] = f"{config.model} language model ({optimizer})"
    return result


def _write_outputs(out, stem: str, values: dict, markdown: str, plot) -> list:
    """``out/stem.json``, ``out/stem.md`` and the figure ``plot(path)``; returns the three paths."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(values, indent=1, default=float))
    (out / f"{stem}.md").write_text(markdown)
    return [out / f"{stem}.json", out / f"{stem}.md", plot()]


def _write_audit(self: AuditResult, out) -> list:
    """Write ``epsilon_audit.json``, ``epsilon_audit.md`` and ``canary_scores.png`` under ``out``; returns the paths."""
    from pathlib import Path

    text = "\n".join(
        [
            f"## Privacy audit: {self.method}",
            "",
            self.table(markdown=True),
            "",
            f"delta {self.delta:g}; wall time {self.seconds:.1f} s.",
            "",
            "![canary score distributions](canary_scores.png)",
            "",
        ]
    )
    return _write_outputs(
        out, "epsilon_audit", self.to_dict(), text, lambda: self.plot(Path(out) / "canary_scores.png")
    )


AuditResult.write = _write_audit


# ------------------------------------------------------------------------------------------------
# RMIA beside LiRA on the same shadow models
# ------------------------------------------------------------------------------------------------
@dataclass
class AttackComparison:
    """Membership attacks run on the same target and the same shadow models.

    Attributes:
        results: attack name -> :class:`~privfast.attacks.AttackResult` (``rmia_online``,
            ``rmia_offline``, ``lira_online``, ``lira_offline``).
        shadows: the number of shadow (reference) models.
        seconds: wall time (target and shadow training included).
        details: ``members``, ``nonmembers``, ``offline_a``, ``target`` (where the target came from).
    """

    results: dict
    shadows: int
    seconds: float
    details: dict = field(default_factory=dict)

    def table(self, *, markdown: bool = False) -> str:
        """AUC and TPR at 0.1% and 1% FPR of every attack."""
        header = ["attack", "AUC", "TPR@0.1%FPR", "TPR@1%FPR", "note"]
        body = [
            [
                name,
                f"{r.summary['auc']:.3f}",
                f"{r.summary['tpr_at_fpr'][0.001]:.3f}",
                f"{r.summary['tpr_at_fpr'][0.01]:.3f}",
                f"a = {r.info['offline_a']}" if r.info.get("offline_a") is not None else "",
            ]
            for name, r in self.results.items()
        ]
        body += [[name, "-", "-", "-", f"not run: {why}"] for name, why in self.details.get("skipped", {}).items()]
        return table(header, body, markdown=markdown, align="l" * len(header))

    def write(self, out) -> list:
        """Write ``rmia.json``, ``rmia.md`` and the log-log ROC ``roc.png`` under ``out``; returns the paths."""
        from pathlib import Path

        from privfast.reports import plot_roc

        values = {
            "shadows": self.shadows,
            "seconds": self.seconds,
            "details": self.details,
            "results": {
                name: {k: v for k, v in r.summary.items() if k != "roc"} | {"info": r.info}
                for name, r in self.results.items()
            },
        }
        text = "\n".join(
            [
                f"## RMIA and LiRA on the same {self.shadows} shadow models",
                "",
                f"{self.details['members']} members and {self.details['nonmembers']} non-members; "
                f"offline a = {self.details['offline_a']}.",
                "",
                self.table(markdown=True),
                "",
                "![ROC, log-log](roc.png)",
                "",
            ]
        )
        return _write_outputs(
            out,
            "rmia",
            values,
            text,
            lambda: plot_roc({name: r.summary["roc"] for name, r in self.results.items()}, Path(out) / "roc.png"),
        )


def rmia_audit(
    checkpoint=None,
    *,
    shadows: int = 16,
    shadow_epochs: int = 20,
    examples: int = 500,
    gamma: float = 1.0,
    offline_a: Optional[float] = None,
    seed: int = 0,
    progress: bool = False,
) -> AttackComparison:
    """RMIA (online and offline) and LiRA (online and offline) against one model, on the same shadow models.

    With a checkpoint, members are the model's training examples and non-members its test split
    (up to ``examples`` each, drawn by ``seed``). Without one, the setting of the LiRA and RMIA
    papers: a pool of ``2 * examples`` digits, a target trained by the shadows' own recipe on a
    random half of it (the overfitted digits model: ConvNet, Adam, ``shadow_epochs`` epochs).
    The shadows train together (vectorized, :func:`~privfast.attacks.train_shadow_models`) on
    random halves of the attacked examples, so that every one is IN for half of them. LiRA fits one
    pooled variance below 64 shadows.

    Args:
        checkpoint: a ``privfast train`` checkpoint, or None for the digits setting above.
        shadows: shadow (reference) models, even.
        shadow_epochs: their training epochs.
        examples: members and non-members attacked, each (at most what the data holds).
        gamma: RMIA's likelihood-ratio threshold.
        offline_a: offline RMIA's ``a``; None tunes it on a shadow (needs 4 shadows or more).
        seed: draws the attacked examples and seeds the shadows.
        progress: show progress bars.

    Returns:
        :class:`AttackComparison`; with 2 shadows (1 IN and 1 OUT per example) only online RMIA runs
        (and offline RMIA with ``offline_a`` given), the others are listed in ``details["skipped"]``.
    """
    from functools import partial

    from privfast.attacks import lira, rmia
    from privfast.attacks.training import train_classifier, train_shadow_models
    from privfast.checkpoint import load_trained
    from privfast.config import TrainConfig
    from privfast.data import data_shape, load_data
    from privfast.models import build_model

    start = time.perf_counter()
    if examples < 2:
        raise ValueError(f"examples must be >= 2, got {examples}")
    generator = torch.Generator().manual_seed(seed)
    if checkpoint is None:
        config = TrainConfig(attacks=())
        train, test = load_data(config)
        examples = min(examples, len(train.y) // 2)  # the pool of 2 * examples must fit in the training split
        pool = torch.randperm(len(train.y), generator=generator)[: 2 * examples]
        x, y = train.x[pool], train.y[pool]
        is_member = torch.zeros(len(y), dtype=torch.bool)
        is_member[torch.randperm(len(y), generator=generator)[:examples]] = True
        make_model = partial(build_model, config, **data_shape(train, test))
        with torch.random.fork_rng(devices=[]):  # a seeded initialization without touching the caller's RNG
            torch.manual_seed(seed)
            model = train_classifier(
                make_model(), x[is_member], y[is_member], epochs=shadow_epochs, generator=generator, progress=progress
            ).eval()
        source = f"ConvNet trained on {examples} of {2 * examples} pool digits (Adam, {shadow_epochs} epochs)"
    else:
        model, config, _ = load_trained(checkpoint)
        (train, test), source = load_data(config), str(checkpoint)
        members = torch.randperm(len(train.y), generator=generator)[:examples]
        nonmembers = torch.randperm(len(test.y), generator=generator)[:examples]
        x, y = torch.cat([train.x[members], test.x[nonmembers]]), torch.cat([train.y[members], test.y[nonmembers]])
        is_member = torch.arange(len(y)) < len(members)
        make_model = partial(build_model, config, **data_shape(train, test))
    trained = train_shadow_models(
        make_model, x, y, n_shadows=shadows, epochs=shadow_epochs, generator=generator, progress=progress
    )
    results, skipped = {}, {}
    for online in (True, False):
        kind = "online" if online else "offline"
        # Tuning a attacks shadow 0 with the others' OUT halves: with complementary pairs that needs 4 shadows.
        if online or offline_a is not None or shadows >= 4:
            results[f"rmia_{kind}"] = rmia(
                model,
                trained,
                x,
                y,
                is_member=is_member,
                online=online,
                gamma=gamma,
                offline_a=None if online else offline_a,
            )
        else:
            skipped[f"rmia_{kind}"] = "tuning a needs >= 4 shadows: pass offline_a"
        if shadows >= 4:
            results[f"lira_{kind}"] = lira(
                model, trained, x, y, is_member=is_member, online=online, fix_variance=shadows < 64
            )
        else:
            skipped[f"lira_{kind}"] = "LiRA fits IN and OUT Gaussians: needs >= 4 shadows"
    order = ("rmia_online", "lira_online", "rmia_offline", "lira_offline")
    results = {name: results[name] for name in order if name in results}
    offline = results.get("rmia_offline")
    return AttackComparison(
        results,
        shadows,
        time.perf_counter() - start,
        {
            "members": int(is_member.sum()),
            "nonmembers": int((~is_member).sum()),
            "target": source,
            "offline_a": offline.info["offline_a"] if offline is not None else None,
            "gamma": gamma,
            "skipped": skipped,
            "method": config.method if checkpoint is not None else "nonprivate",
        },
    )
