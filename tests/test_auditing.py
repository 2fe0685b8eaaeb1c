"""Empirical privacy auditing: the lower-bound functions against hand-computed and published values and a
Gaussian mechanism of known mu, the white-box gradient canary through every clipping mode, and the audits
of whole training runs (non-private leaks, DP at epsilon 1 does not, halved noise is caught)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import create_accountant
from opacus.accountants.analysis import gdp as opacus_gdp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import privfast.ops
from privfast import PrivacyEngine
from privfast.auditing import (
    GradientCanary,
    audit_one_run,
    audit_one_run_language_model,
    audit_white_box,
    clopper_pearson_bound,
    clopper_pearson_epsilon,
    clopper_pearson_upper,
    epsilon_from_error_rates,
    gdp_delta,
    gdp_epsilon,
    gdp_estimate,
    one_run_bound,
    one_run_epsilon,
    one_run_p_value,
)
from privfast.config import TrainConfig

DELTA = 1e-5


# ------------------------------------------------------------------------------------------------
# Bound functions: hand-computed and published cases
# ------------------------------------------------------------------------------------------------
def test_clopper_pearson_upper_hand_values():
    # No success in n trials: the bound solves (1 - p)^n = alpha.
    assert clopper_pearson_upper(0, 10, alpha=0.05) == pytest.approx(1 - 0.05 ** (1 / 10), rel=1e-12)
    # All successes: nothing to bound.
    assert clopper_pearson_upper(10, 10, alpha=0.05) == 1.0
    # n - 1 successes of n: the bound solves 1 - p^n = alpha.
    assert clopper_pearson_upper(9, 10, alpha=0.05) == pytest.approx((1 - 0.05) ** (1 / 10), rel=1e-12)
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson_upper(11, 10, alpha=0.05)


def test_epsilon_from_error_rates_hand_values():
    # max(log(0.8 / 0.1), log(0.9 / 0.2)) = log 8
    assert epsilon_from_error_rates(0.1, 0.2, delta=0.0) == pytest.approx(math.log(8.0), rel=1e-12)
    assert epsilon_from_error_rates(0.2, 0.1, delta=0.0) == pytest.approx(math.log(8.0), rel=1e-12)
    assert epsilon_from_error_rates(0.1, 0.2, delta=0.05) == pytest.approx(math.log(0.75 / 0.1), rel=1e-12)
    assert epsilon_from_error_rates(0.5, 0.5, delta=0.0) == 0.0  # a coin flip proves nothing
    assert epsilon_from_error_rates(0.0, 0.3, delta=0.0) == math.inf


def test_clopper_pearson_epsilon_hand_value_and_correction():
    # A perfect attack on 100 + 100 trials, one threshold: both rates bounded by 1 - 0.025^(1/100).
    rate = 1 - 0.025 ** (1 / 100)
    eps = clopper_pearson_epsilon(false_positives=0, negatives=100, false_negatives=0, positives=100, delta=0.0)
    assert float(eps) == pytest.approx(math.log((1 - rate) / rate), rel=1e-10)
    # The multiple-comparison correction: 10 thresholds, each bound at level 0.05 / 20.
    rate10 = 1 - (0.05 / 20) ** (1 / 100)
    eps10 = clopper_pearson_epsilon(
        false_positives=0, negatives=100, false_negatives=0, positives=100, delta=0.0, comparisons=10
    )
    assert float(eps10) == pytest.approx(math.log((1 - rate10) / rate10), rel=1e-10)
    assert eps10 < eps


def test_clopper_pearson_bound_sweeps_thresholds_with_the_correction():
    inside, outside = np.arange(50, 100.0), np.arange(0, 50.0)  # separated: threshold 50 is perfect
    bound = clopper_pearson_bound(inside, outside, delta=0.0)
    assert bound.details["threshold"] == 50.0 and bound.details["fpr"] == 0 and bound.details["fnr"] == 0
    assert bound.details["comparisons"] == 100
    expected = clopper_pearson_epsilon(
        false_positives=0, negatives=50, false_negatives=0, positives=50, delta=0.0, comparisons=100
    )
    assert bound.epsilon == pytest.approx(float(expected), rel=1e-12)
    fixed = clopper_pearson_bound(inside, outside, delta=0.0, thresholds=[50.0])  # chosen in advance: no correction
    assert fixed.epsilon > bound.epsilon and fixed.details["comparisons"] == 1


def test_one_run_reproduces_the_papers_values():
    # Steinke, Nasr and Jagielski, arXiv:2305.08846: Appendix D's example and Sec. 7's (Fig. 11) figure.
    assert one_run_epsilon(canaries=1000, guesses=100, correct=75, delta=1e-4) == pytest.approx(0.673, abs=5e-4)
    assert one_run_epsilon(canaries=100_000, guesses=1510, correct=1439, delta=1e-5) == pytest.approx(2.6758, abs=1e-3)


def test_one_run_hand_cases():
    # delta = 0, every guess right: P[Binomial(r, q) >= r] = q^r = beta, so eps = logit(beta^(1/r)).
    q = 0.05 ** (1 / 40)
    assert one_run_epsilon(canaries=100, guesses=40, correct=40, delta=0.0) == pytest.approx(
        math.log(q / (1 - q)), abs=1e-7
    )
    # Half right is what guessing achieves: no bound.
    assert one_run_epsilon(canaries=100, guesses=40, correct=20, delta=0.0) == 0.0
    # The delta term only loosens the bound, and the p-value grows with epsilon.
    assert one_run_epsilon(canaries=100, guesses=40, correct=38, delta=1e-3) < one_run_epsilon(
        canaries=100, guesses=40, correct=38, delta=0.0
    )
    p = [one_run_p_value(canaries=100, guesses=40, correct=35, epsilon=e, delta=1e-5) for e in (0.5, 1.0, 2.0)]
    assert p[0] < p[1] < p[2]
    with pytest.raises(ValueError, match="correct"):
        one_run_epsilon(canaries=10, guesses=20, correct=5, delta=0.0)


def test_one_run_bound_guesses_the_extremes():
    scores = np.arange(20.0)
    inserted = scores >= 10  # a perfect attack
    bound = one_run_bound(scores, inserted, delta=0.0, guesses=[20])
    assert (bound.details["k_plus"], bound.details["k_minus"], bound.details["correct"]) == (10, 10, 20)
    assert bound.epsilon == pytest.approx(one_run_epsilon(canaries=20, guesses=20, correct=20, delta=0.0), abs=1e-9)
    # Several guess counts: each at the Bonferroni-corrected level.
    several = one_run_bound(scores, inserted, delta=0.0, guesses=[10, 20])
    assert several.epsilon == pytest.approx(
        one_run_epsilon(canaries=20, guesses=20, correct=20, delta=0.0, confidence=0.975), abs=1e-9
    )
    flipped = one_run_bound(-scores, inserted, delta=0.0, guesses=[20])  # every guess wrong
    assert flipped.details["correct"] == 0 and flipped.epsilon == 0.0


def test_gdp_conversion():
    for mu in (0.5, 1.0, 2.0, 5.0):
        eps = gdp_epsilon(mu, DELTA)
        assert gdp_delta(mu, eps) == pytest.approx(DELTA, rel=1e-8)
        # The dual of Opacus's GDP analysis (an independent implementation of the same formula).
        assert gdp_delta(mu, 1.3) == pytest.approx(opacus_gdp.delta_eps_mu(eps=1.3, mu=mu), rel=1e-9, abs=1e-15)
    # mu-GDP of one Gaussian release is what the PRV accountant computes for one full-batch step.
    accountant = create_accountant("prv")
    accountant.step(noise_multiplier=1.0, sample_rate=1.0)
    assert gdp_epsilon(1.0, DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=0.01)
    assert gdp_epsilon(0.01, 0.5) == 0.0  # delta above delta(0): no epsilon needed
    assert gdp_epsilon(40.0, DELTA) > 700  # large epsilons do not overflow


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_bounds_against_a_gaussian_mechanism_of_known_mu(mu):
    rng = np.random.default_rng(int(mu * 10))
    n = 20_000
    inside, outside = rng.normal(mu, 1.0, n), rng.normal(0.0, 1.0, n)
    true_eps = gdp_epsilon(mu, DELTA)
    estimate = gdp_estimate(inside, outside, delta=DELTA)
    assert abs(estimate.epsilon / true_eps - 1) < 0.10  # (the interval's coverage: test_gdp_interval_is_exact)
    assert clopper_pearson_bound(inside, outside, delta=DELTA).epsilon < true_eps
    inserted = rng.random(2 * n) < 0.5
    scores = np.where(inserted, rng.normal(mu, 1.0, 2 * n), rng.normal(0.0, 1.0, 2 * n))
    assert 0 < one_run_bound(scores, inserted, delta=DELTA).epsilon < true_eps


def test_gdp_interval_is_exact():
    """The noncentral-t interval covers the true mu at its level (2.5% misses each side)."""
    rng = np.random.default_rng(3)
    trials, below, above = 400, 0, 0
    for _ in range(trials):
        estimate = gdp_estimate(rng.normal(1.5, 2.0, 30), rng.normal(0.0, 2.0, 50), delta=DELTA)
        below += estimate.mu_high < 0.75
        above += estimate.mu_low > 0.75
    # Binomial(400, 0.025): mean 10, sd 3.1.
    assert 2 <= below <= 21 and 2 <= above <= 21


def test_bad_inputs():
    with pytest.raises(ValueError, match="Gaussian cannot be fitted"):
        gdp_estimate([1.0, 1.0], [0.0, 0.0], delta=DELTA)
    with pytest.raises(ValueError, match="at least 2"):
        gdp_estimate([1.0], [0.0, 0.1], delta=DELTA)
    with pytest.raises(ValueError, match="shape"):
        one_run_bound([1.0, 2.0], [True], delta=DELTA)
    with pytest.raises(ValueError, match="NaN"):
        clopper_pearson_bound([np.nan], [0.0], delta=DELTA)
    with pytest.raises(ValueError, match="delta"):
        gdp_epsilon(1.0, 0.0)


# ------------------------------------------------------------------------------------------------
# White-box gradient canaries through the real optimizer
# ------------------------------------------------------------------------------------------------
B, SIGMA = 6, 0.5


def _one_step_optimizer(mode, k, sigma=SIGMA):
    """A full-batch private step on a small float64 model (sample rate 1), and its expanded batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(B, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=B)  # one batch: sample rate 1
    wrapped, optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        augmult=k,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    rows = x.repeat_interleave(k, 0) + 0.1 * torch.randn(B * k, 5, generator=g, dtype=torch.float64)
    return wrapped, optimizer, rows, y.repeat_interleave(k)


def _run(wrapped, optimizer, x, y, steps):
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("k", [1, 8])
def test_white_box_audit_of_one_gaussian_step_is_tight(k, one_thread):
    """150 full-batch steps, 8 canaries each: 1,200 trials of one release, for each clipping mode."""
    accountant = create_accountant("prv")
    accountant.step(noise_multiplier=SIGMA, sample_rate=1.0)
    claimed = accountant.get_epsilon(DELTA)
    known = {}
    for mode in ("materialize", "ghost", "bk"):
        wrapped, optimizer, x, y = _one_step_optimizer(mode, k)
        canary = GradientCanary(optimizer.params, canaries=8, generator=torch.Generator().manual_seed(2))
        canary.attach(optimizer)
        _run(wrapped, optimizer, x, y, 150)
        estimate = canary.estimate(delta=DELTA)
        assert canary.releases == 150 and canary.claimed_mu == pytest.approx(1 / SIGMA)
        assert abs(estimate.epsilon / claimed - 1) < 0.20, (mode, estimate.epsilon, claimed)
        # What the batch's own clipped sum projects on the canaries is the same in every mode.
        known[mode] = canary.statistic(subtract_known=False) - canary.statistic()
    torch.testing.assert_close(known["ghost"], known["materialize"], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(known["bk"], known["materialize"], rtol=1e-7, atol=1e-9)
    assert known["bk"].abs().max() > 1e-3  # the batch does project on the canaries: the check is not vacuous


@pytest.mark.parametrize("mode", ["materialize", "ghost", "bk"])
def test_noiseless_canary_is_exactly_its_coin(mode, one_thread):
    """Without noise the update's projection, less the batch's, is the canary's own clipped gradient: C or 0."""
    wrapped, optimizer, x, y = _one_step_optimizer(mode, 2, sigma=0.0)
    canary = GradientCanary(optimizer.params, canaries=3, generator=torch.Generator().manual_seed(4)).attach(optimizer)
    _run(wrapped, optimizer, x, y, 10)
    torch.testing.assert_close(canary.statistic(), canary.inserted.double(), rtol=0, atol=1e-9)
    assert 0 < canary.inserted.sum() < canary.inserted.numel()


def test_microbatch_canary_has_the_doubled_sensitivity(one_thread):
    """Microbatches of 2 are accounted with sensitivity 2C: the canary is 2C, and the audit stays tight."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    wrapped, optimizer, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        microbatch_size=2,
        poisson_sampling=False,
    )
    canary = GradientCanary(optimizer.params, canaries=8, generator=torch.Generator().manual_seed(2)).attach(optimizer)
    _run(wrapped, optimizer, x, y, 120)
    assert optimizer.sensitivity == 2 and canary.claimed_mu == pytest.approx(2.0)
    estimate = canary.estimate(delta=DELTA)
    assert abs(estimate.epsilon / gdp_epsilon(2.0, DELTA) - 1) < 0.20


def test_canary_refuses_foreign_parameters():
    _, optimizer, _, _ = _one_step_optimizer("bk", 1)
    with pytest.raises(ValueError, match="other parameters"):
        GradientCanary([nn.Parameter(torch.zeros(3))], canaries=1).attach(optimizer)
    with pytest.raises(ValueError, match="canaries must be"):
        GradientCanary(optimizer.params, canaries=10_000)


# ------------------------------------------------------------------------------------------------
# Audits of whole training runs
# ------------------------------------------------------------------------------------------------
NONPRIVATE = TrainConfig(
    method="nonprivate", model="mlp", width=256, epochs=100, batch_size=32, lr=0.1, train_examples=300
)
# sigma = 2.12 spends epsilon 1 (delta 1e-5) in 2 epochs at sample rate 0.1 (found once with Opacus's
# get_noise_multiplier, whose search with the PRV accountant takes seconds; the tests check the accountant's value).
DP_EPS1 = TrainConfig(method="dp-sgd", model="mlp", width=64, epochs=2, batch_size=128, lr=1.0, noise_multiplier=2.12)


@pytest.fixture(scope="module")
def nonprivate_audit(one_thread):
    return audit_one_run(NONPRIVATE, canaries=200)


def test_one_run_audit_of_non_private_training_is_clearly_positive(nonprivate_audit, tmp_path):
    result = nonprivate_audit
    assert result.epsilon > 2.0, result.details
    assert result.accountant_epsilon == math.inf
    assert len(result.in_scores) + len(result.out_scores) == 200
    assert "one-run" in result.table() and "| audit |" in result.table(markdown=True)
    assert result.plot(tmp_path / "scores.png").stat().st_size > 1000


def test_one_run_audit_of_dp_at_epsilon_1(one_thread):
    result = audit_one_run(DP_EPS1, canaries=200)
    # The included canaries add a batch to the epoch: a lower sample rate, a little less than epsilon 1.
    assert 0.9 < result.accountant_epsilon <= 1.01
    assert result.epsilon <= result.accountant_epsilon


def test_white_box_audit_of_dp_at_epsilon_1_and_of_halved_noise(monkeypatch, one_thread):
    honest = audit_white_box(DP_EPS1, canaries=32)
    assert honest.accountant_epsilon == pytest.approx(1.0, abs=0.02)
    assert honest.epsilon_low <= honest.accountant_epsilon <= honest.epsilon_high
    step = honest.details["per_release"]
    assert step["epsilon_low"] <= honest.details["per_release_accountant_epsilon"] <= step["epsilon_high"]

    # A deliberately weakened mechanism: a test-only hook that halves the noise the optimizer adds.
    real = privfast.ops.clip_accumulate_noise

    def half_noise(*args, noise_std=0.0, **kwargs):
        return real(*args, noise_std=noise_std / 2, **kwargs)

    monkeypatch.setattr(privfast.ops, "clip_accumulate_noise", half_noise)
    weakened = audit_white_box(DP_EPS1, canaries=32)
    assert weakened.accountant_epsilon == pytest.approx(1.0, abs=0.02)  # the accountant does not notice...
    assert weakened.epsilon_low > weakened.accountant_epsilon  # ...the audit does
    assert weakened.details["per_release"]["epsilon_low"] > weakened.details["per_release_accountant_epsilon"]


def test_white_box_audit_refuses_non_private_training():
    with pytest.raises(ValueError, match="private optimizer"):
        audit_white_box(NONPRIVATE)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def test_cli_epsilon_bound_and_rmia(tmp_path, capsys, one_thread):
    from privfast.cli import main
    from privfast.trainer import Trainer

    checkpoint = tmp_path / "run" / "checkpoint.pt"
    config = TrainConfig(
        method="dp-sgd",
        model="mlp",
        width=32,
        epochs=1,
        batch_size=128,
        lr=1.0,
        noise_multiplier=1.0,
        train_examples=300,
        attacks=(),
    )
    Trainer(config, checkpoint=checkpoint, progress=False).fit()
    assert (
        main(
            [
                "audit",
                str(checkpoint),
                "--epsilon-bound",
                "white-box",
                "--canaries",
                "4",
                "--no-progress",
                "--out",
                str(tmp_path / "wb"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "white-box, whole run" in printed and "accountant eps" in printed and "95% CI" in printed
    assert (tmp_path / "wb" / "canary_scores.png").exists() and (tmp_path / "wb" / "epsilon_audit.json").exists()
    assert main(["audit", str(checkpoint), "--epsilon-bound", "one-run", "--canaries", "60", "--no-progress"]) == 0
    assert "lower bound, 95% confidence" in capsys.readouterr().out
    assert (
        main(
            [
                "audit",
                "--attack",
                "rmia",
                "--shadows",
                "4",
                "--shadow-epochs",
                "2",
                "--examples",
                "40",
                "--no-progress",
                "--out",
                str(tmp_path / "rmia"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "rmia_offline" in printed and "lira_online" in printed and "TPR@0.1%FPR" in printed
    assert (tmp_path / "rmia" / "roc.png").exists()
    assert main(["audit", "--epsilon-bound", "one-run"]) == 2  # no checkpoint: a clear error, no traceback
    assert "give one" in capsys.readouterr().err


# -- the one-run audit of a language model with token secrets --------------------------------------
# Big enough for a non-private model to memorize a secret it saw once (width 32 or 4 epochs do not).
LM_AUDIT = dict(width=64, layers=1, window=16, batch_size=64, epochs=8, lr=4.0, baseline_lr=0.01)


@pytest.fixture(scope="module")
def lm_audits():
    from privfast.secret_sharer import SecretSharerConfig

    torch.set_num_threads(1)
    config = SecretSharerConfig(**LM_AUDIT)
    return {eps: audit_one_run_language_model(config, epsilon=eps, canaries=200) for eps in (math.inf, 1.0)}


def test_language_model_one_run_audit_of_non_private_training_is_positive(lm_audits):
    result = lm_audits[math.inf]
    assert result.accountant_epsilon == math.inf
    # Each secret is in one window; a non-private model that memorizes it ranks it above the others
    # (0.33 measured: one window out of 2,600 leaves a faint trace, and m = 200 limits the bound).
    assert result.epsilon > 0.2, result.details
    assert result.in_scores.mean() > result.out_scores.mean()
    assert len(result.in_scores) + len(result.out_scores) == 200


def test_language_model_one_run_audit_of_dp_at_epsilon_1(lm_audits):
    result = lm_audits[1.0]
    assert result.accountant_epsilon == pytest.approx(1.0, rel=0.05)
    assert 0 <= result.epsilon <= 1.0, result.details
    assert result.details["test_perplexity"] > 1


def test_language_model_one_run_audit_bad_input():
    from privfast.secret_sharer import SecretSharerConfig

    with pytest.raises(ValueError, match="epsilon must be > 0"):
        audit_one_run_language_model(SecretSharerConfig(), epsilon=0.0)
    with pytest.raises(ValueError, match="at least 2 canaries"):
        audit_one_run_language_model(SecretSharerConfig(), epsilon=1.0, canaries=1)


def test_cli_audits_a_secret_sharer_run_with_token_secrets(tmp_path, capsys, one_thread):
    import json
    import re

    from privfast.cli import main
    from privfast.secret_sharer import SecretSharerConfig

    run = tmp_path / "ss"
    run.mkdir()
    config = SecretSharerConfig(epsilons=(math.inf, 4.0), width=8, layers=1, window=16, epochs=1, batch_size=256)
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    assert main(["audit", str(run), "--epsilon-bound", "one-run", "--canaries", "40", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "lstm language model (sgd)" in out and "40 canaries" in out
    # The smallest budget of the run is the one audited; its accountant's epsilon is in the table.
    assert re.search(r"one-run \(black box\), whole run\s+(3\.9\d|4\.0\d)", out), out
    written = json.loads((run / "epsilon_audit.json").read_text())
    assert written["accountant_epsilon"] == pytest.approx(4.0, rel=0.05) and written["details"]["canaries"] == 40
    assert main(["audit", str(run), "--epsilon-bound", "white-box"]) == 2
    assert "one-run (token secrets)" in capsys.readouterr().err
    assert main(["audit", str(run), "--epsilon-bound", "one-run", "--epsilon", "2"]) == 2
    assert "not one of the run's epsilons" in capsys.readouterr().err
