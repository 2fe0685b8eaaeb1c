"""privfast.metrics on hand-computed cases and on score distributions with known answers."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from privfast import metrics


def test_attack_summary_hand_computed():
    # Pairs (member > non-member): 0.9 beats both, 0.6 both, 0.4 only 0.1 -> AUC 5/6.
    # Best threshold 0.6: TPR 2/3, FPR 0 (0.4 -> TPR 1 but FPR 1/2).
    summary = metrics.attack_summary(torch.tensor([0.9, 0.4, 0.6]), [0.5, 0.1])
    assert summary["auc"] == pytest.approx(5 / 6)
    assert summary["best_advantage"] == pytest.approx(2 / 3)
    assert summary["accuracy"] == pytest.approx(5 / 6)
    assert summary["p_err"] == pytest.approx(1 / 6)
    assert summary["threshold"] == pytest.approx(0.6)
    assert summary["tpr_at_fpr"] == {0.001: pytest.approx(2 / 3), 0.01: pytest.approx(2 / 3)}
    assert summary["roc"]["fpr"][0] == 0 and summary["roc"]["tpr"][-1] == 1


def test_attack_summary_separable_and_identical():
    perfect = metrics.attack_summary([3.0, 4.0], [1.0, 2.0])
    assert (perfect["auc"], perfect["best_advantage"], perfect["p_err"]) == (1.0, 1.0, 0.0)
    same = metrics.attack_summary(np.zeros(10), np.zeros(7))
    assert (same["auc"], same["best_advantage"], same["p_err"]) == (0.5, 0.0, 0.5)


def test_attack_summary_ranks_infinite_scores_at_the_ends():
    # inf ties inf (1/2), beats 0 (1); 1 loses to inf (0), beats 0 (1): AUC 2.5 / 4.
    summary = metrics.attack_summary([math.inf, 1.0], [math.inf, 0.0])
    assert summary["auc"] == pytest.approx(0.625)
    assert metrics.attack_summary([math.inf], [-math.inf])["best_advantage"] == 1.0


def test_attack_summary_with_ties_matches_mann_whitney_and_its_own_decision():
    """Many tied scores: the AUC gives a tie 1/2, and the best advantage is the one of the decision
    "score >= threshold" at the reported threshold, the rule the calibrated attacks apply."""
    rng = np.random.default_rng(0)
    members, nonmembers = rng.integers(0, 6, 300).astype(float), 1.5 * rng.integers(0, 4, 200)
    summary = metrics.attack_summary(members, nonmembers)
    diff = members[:, None] - nonmembers[None, :]
    assert summary["auc"] == pytest.approx((diff > 0).mean() + (diff == 0).mean() / 2)
    advantages = {
        t: metrics.threshold_metrics(members >= t, nonmembers >= t)["advantage"]
        for t in np.unique(np.concatenate([members, nonmembers]))
    }
    assert summary["best_advantage"] == pytest.approx(max(advantages.values()))
    assert advantages[summary["threshold"]] == pytest.approx(summary["best_advantage"])


def test_attack_summary_auc_one_half_with_an_advantage():
    """The shape of an overfitted model's losses: members and most non-members alike, some
    non-members far off. AUC sums over all thresholds and the advantage is the best one: a ROC
    that crosses the diagonal gives AUC 1/2 with advantage 1/2."""
    members = np.arange(10.0)
    nonmembers = np.concatenate([members - 100, members + 100])  # half below every member, half above
    summary = metrics.attack_summary(members, nonmembers)
    assert summary["auc"] == pytest.approx(0.5)
    assert summary["best_advantage"] == pytest.approx(0.5)
    assert summary["threshold"] == members.min()


def test_attack_summary_two_gaussians():
    """Members ~ N(d, 1), non-members ~ N(0, 1): AUC = Phi(d / sqrt 2), max TPR - FPR = 2 Phi(d / 2) - 1."""
    d, n = 1.5, 40_000
    rng = np.random.default_rng(0)
    summary = metrics.attack_summary(rng.normal(d, 1, n), rng.normal(0, 1, n))
    norm = scipy.stats.norm
    assert summary["auc"] == pytest.approx(norm.cdf(d / math.sqrt(2)), abs=0.01)
    assert summary["best_advantage"] == pytest.approx(2 * norm.cdf(d / 2) - 1, abs=0.015)
    assert summary["threshold"] == pytest.approx(d / 2, abs=0.15)
    for level in (0.001, 0.01):
        assert summary["tpr_at_fpr"][level] == pytest.approx(norm.sf(norm.isf(level) - d), abs=0.02)


def test_threshold_metrics_hand_computed():
    out = metrics.threshold_metrics([True, True, True, False], [True, False, False, False, False])
    assert out["tpr"] == 0.75 and out["fnr"] == 0.25 and out["fpr"] == 0.2
    assert out["p_err"] == pytest.approx(0.225)
    assert out["inf"] == pytest.approx(0.775)
    assert out["advantage"] == pytest.approx(2 * (0.775 - 0.5))


def test_dp_perr_bound():
    assert metrics.dp_perr_bound(0.0, 0.0) == 0.5
    assert metrics.dp_perr_bound(1.0, 0.0) == pytest.approx(1 / (1 + math.e))
    # Liu, Oya & Kerschbaum's reading (arXiv:2110.05524): eps = 1 ensures P_err >= 0.26; eps = 1e4 is a trivial bound.
    assert 0.26 < metrics.dp_perr_bound(1.0, 1e-5) < 0.27
    assert metrics.dp_perr_bound(1e4, 1e-5) == 0.0
    bounds = metrics.dp_perr_bound(np.array([0.0, 1.0, 8.0]), 0.1)
    np.testing.assert_allclose(bounds, 0.9 / (1 + np.exp([0.0, 1.0, 8.0])))
    with pytest.raises(ValueError, match="epsilon"):
        metrics.dp_perr_bound(-1.0, 0.0)
    with pytest.raises(ValueError, match="delta"):
        metrics.dp_perr_bound(1.0, 1.0)


def test_relative_accuracy_drop():
    assert metrics.relative_accuracy_drop(0.8, 0.9) == pytest.approx(1 / 9)
    assert metrics.relative_accuracy_drop(0.95, 0.9) < 0
    with pytest.raises(ValueError, match="base_acc"):
        metrics.relative_accuracy_drop(0.5, 0.0)


def test_loss_rank_correlation_equals_direct_spearman():
    rng = np.random.default_rng(1)
    a = rng.exponential(size=500)
    b = a + rng.exponential(size=500)  # correlated, no ties
    ranks_a, ranks_b = a.argsort().argsort(), b.argsort().argsort()
    direct = np.corrcoef(ranks_a, ranks_b)[0, 1]
    assert metrics.loss_rank_correlation(a, b) == pytest.approx(direct, abs=1e-12)
    assert metrics.loss_rank_correlation(a, a) == pytest.approx(1.0)
    assert metrics.loss_rank_correlation(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same examples"):
        metrics.loss_rank_correlation(a, b[:-1])


def test_js_distance():
    assert metrics.js_distance([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], bins=3) == pytest.approx(0.0, abs=1e-12)
    assert metrics.js_distance([0.0, 0.1], [0.9, 1.0], bins=2) == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 1/2): JSD = H(m) - (H(p) + H(q)) / 2 with m = (3/4, 1/4), in bits.
    entropy = lambda p: -sum(x * math.log2(x) for x in p if x > 0)  # noqa: E731
    expected = math.sqrt(entropy([0.75, 0.25]) - (entropy([1, 0]) + entropy([0.5, 0.5])) / 2)
    got = metrics.js_distance([0.2, 0.3], [0.2, 0.8], bins=np.array([0.0, 0.5, 1.0]))
    assert got == pytest.approx(expected)
    with pytest.raises(ValueError, match="finite"):
        metrics.js_distance([0.0, math.inf], [1.0], bins=3)


def test_outliers():
    members = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]], dtype=bool)
    nonmembers = np.array([[0, 1], [1, 1], [1, 1]], dtype=bool)
    out = metrics.outliers(members, nonmembers)
    np.testing.assert_array_equal(out["members"], [0, 3])
    np.testing.assert_array_equal(out["nonmembers"], [1])
    assert out["member_fraction"] == 0.5 and out["nonmember_fraction"] == 0.5
    with pytest.raises(ValueError, match="runs"):
        metrics.outliers(members, nonmembers[:2])


@pytest.mark.parametrize("bad, match", [([], "empty"), ([[1.0]], "dimension"), ([float("nan")], "NaN")])
def test_inputs_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        metrics.attack_summary(bad, [0.0])
