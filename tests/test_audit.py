"""The per-epoch membership audit callback."""

import json
import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from privfast.attacks import train_classifier  # noqa: E402
from privfast.attacks.common import attack_result  # noqa: E402
from privfast.audit import MembershipAudit, audit_model, canary_exposure, extrapolate_exposure  # noqa: E402
from privfast.data import Split, load_digits  # noqa: E402
from privfast.metrics import dp_perr_bound  # noqa: E402
from privfast.models import MLP  # noqa: E402

EPOCHS = 20


@pytest.fixture(scope="module")
def audited():
    train, test = load_digits()
    members = train.x[:200], train.y[:200]
    audit = MembershipAudit(
        members, (test.x, test.y), attacks=("yeom", "calibrated"), max_examples=400, epsilon=lambda: 2.0, delta=1e-5
    )
    torch.manual_seed(0)
    train_classifier(
        MLP(64, 10, hidden=(256,)),
        *members,
        epochs=EPOCHS,
        lr=3e-3,
        batch_size=32,
        callbacks=[audit],
        generator=torch.Generator().manual_seed(0),
    )
    return audit


def test_one_record_per_epoch(audited):
    history = audited.history
    assert [r["epoch"] for r in history] == list(range(EPOCHS))
    for record in history:
        for attack in ("yeom", "calibrated"):
            metrics = record[attack]
            assert metrics["p_err"] == pytest.approx((1 - metrics["decision_advantage"]) / 2)
            assert set(metrics["tpr_at_fpr"]) == {0.001, 0.01}
        assert record["dp_perr_bound"] == pytest.approx(dp_perr_bound(2.0, 1e-5))


def test_curve_shows_training_and_growing_leakage(audited):
    history = audited.history
    first, last = history[0], history[-1]
    assert last["train_accuracy"] > 0.99 and last["test_accuracy"] > first["test_accuracy"] + 0.2
    # Training longer overfits and leaks more (averaged over 4 epochs: one epoch's decision is noisy).
    early, late = ([r["calibrated"]["decision_advantage"] for r in part] for part in (history[:4], history[-4:]))
    assert sum(late) / 4 > sum(early) / 4 + 0.03


def test_attacked_sets_are_capped_and_fixed():
    train, test = load_digits()
    audit = MembershipAudit((train.x, train.y), (test.x, test.y), max_examples=300, seed=3)
    assert len(audit.members[1]) == 300 and len(audit.nonmembers[1]) == 300
    again = MembershipAudit((train.x, train.y), (test.x, test.y), max_examples=300, seed=3)
    assert torch.equal(audit.members[0], again.members[0])
    assert audit.test[0] is test.x  # the utility set defaults to the non-members, all of them


def _with_accuracies(accuracies):
    train, test = load_digits()
    audit = MembershipAudit((train.x[:10], train.y[:10]), (test.x[:10], test.y[:10]), attacks=())
    audit.history = [{"epoch": e, "test_accuracy": a} for e, a in enumerate(accuracies)]
    return audit


def test_early_stopping_epoch():
    audit = _with_accuracies([0.5, 0.7, 0.65, 0.66, 0.8, 0.6])
    assert audit.early_stopping_epoch() == 4
    assert audit.early_stopping_epoch(patience=2) == 1  # stops at epoch 3, keeps epoch 1
    assert audit.early_stopping_epoch(patience=3) == 4
    with pytest.raises(ValueError, match="patience"):
        audit.early_stopping_epoch(patience=0)
    with pytest.raises(ValueError, match="no epoch"):
        _with_accuracies([]).early_stopping_epoch()


def test_plot(audited):
    ax = audited.plot("calibrated")
    assert ax.get_xlabel().startswith("calibrated") and len(ax.lines) == 2
    with pytest.raises(ValueError, match="not recorded"):
        audited.plot("lira")


def test_custom_attack_mapping_and_unknown_names():
    train, test = load_digits()
    members, nonmembers = (train.x[:50], train.y[:50]), (test.x[:50], test.y[:50])
    calls = []

    def fake(model, m, n, *, generator):
        calls.append(len(m[1]))
        return attack_result(torch.zeros(len(m[1])), torch.zeros(len(n[1])))

    audit = MembershipAudit(members, nonmembers, attacks={"fake": fake})
    record = audit(MLP(64, 10), epoch=0)
    assert calls == [50] and record["fake"]["auc"] == 0.5 and not math.isnan(record["test_accuracy"])
    with pytest.raises(ValueError, match="unknown attacks"):
        MembershipAudit(members, nonmembers, attacks=("nope",))
    with pytest.raises(ValueError, match="lower n_known"):
        MembershipAudit(members, nonmembers)  # 50 examples each, 100 known by default
    small = MembershipAudit(members, nonmembers, n_known=20)
    record = small(MLP(64, 10), epoch=0)  # 20 known of 50: the other 30 each are scored
    assert record["yeom"]["p_err"] == pytest.approx((1 - record["yeom"]["decision_advantage"]) / 2)
    assert math.isfinite(record["yeom"]["auc"])


def test_the_audit_keeps_every_attack_result_of_its_last_call():
    train, test = load_digits()
    audit = MembershipAudit(train, test, attacks=("yeom", "calibrated"), max_examples=60, n_known=20)
    record = audit(MLP(64, 10), epoch=0)
    assert sorted(audit.results) == ["calibrated", "yeom"]
    for name, result in audit.results.items():
        assert record[name]["decision_advantage"] == result.decision_advantage
        assert record[name]["best_advantage"] == result.summary["best_advantage"]


@pytest.fixture(scope="module")
def trained_run():
    from privfast.config import TrainConfig
    from privfast.data import data_shape, load_data
    from privfast.models import build_model

    config = TrainConfig(method="nonprivate", model="mlp", width=32, train_examples=96, canary_repeats=4)
    train, test = load_data(config)
    torch.manual_seed(0)
    model = build_model(config, **data_shape(train))
    canaries = Split(train.x[:3], (train.y[:3] + 1) % 10)  # mislabelled copies, memorized by training on them
    train_classifier(
        model,
        torch.cat([train.x, canaries.x.repeat(4, 1, 1, 1)]),
        torch.cat([train.y, canaries.y.repeat(4)]),
        epochs=40,
        lr=3e-3,
        generator=torch.Generator().manual_seed(0),
    )
    references = Split(train.x[3:83], (train.y[3:83] + 1) % 10)  # drawn alike, never inserted
    return config, model, (canaries, references)


def test_audit_model_runs_the_attacks_lira_and_the_canaries(trained_run):
    config, model, canaries = trained_run
    audit = audit_model(
        model,
        config,
        [{"epoch": 40}],
        canaries=canaries,
        attacks=("yeom", "calibrated", "calibrated_per_class"),
        examples=60,
        known=20,
        shadows=4,
        shadow_epochs=1,
    )
    assert (audit.method, audit.epoch, audit.members, audit.nonmembers, audit.known) == ("nonprivate", 40, 60, 60, 20)
    assert sorted(audit.results) == ["calibrated", "calibrated_per_class", "lira_offline", "lira_online", "yeom"]
    # The threshold attacks share the -loss score: one group; LiRA's two variants score differently.
    assert audit.shared_scores() == [["yeom", "calibrated", "calibrated_per_class"]]
    assert audit.record["lira_online"]["decision_advantage"] is None and audit.record["lira_online"]["p_err"] is None
    assert audit.record["calibrated"]["decision_advantage"] == audit.results["calibrated"].decision["advantage"]
    assert audit.record["calibrated"]["best_advantage"] >= audit.record["calibrated"]["decision_advantage"] - 0.1
    assert "epsilon" not in audit.record  # non-private
    exposure = audit.canaries
    assert exposure.inserted == 3 and exposure.repeats == 4 and exposure.references == 80
    assert min(exposure.exposure) > 3  # memorized: ranked far above a never-inserted candidate's ~1 bit
    values = json.loads(json.dumps(audit.to_dict()))
    assert values["canaries"]["inserted"] == 3 and values["shadows"] == 4
    assert values["shared_scores"] == [["yeom", "calibrated", "calibrated_per_class"]]
    with pytest.raises(ValueError, match="no epoch recorded"):
        audit_model(model, config, [], shadows=0)


def test_canary_exposure_is_none_without_canaries(trained_run):
    _, model, (canaries, references) = trained_run
    assert canary_exposure(model, Split(canaries.x[:0], canaries.y[:0]), references) is None


def test_an_unreliable_or_impossible_exposure_extrapolation_is_noted():
    generator = torch.Generator().manual_seed(0)
    canaries = torch.tensor([0.5, 1.0], dtype=torch.float64)
    log_odds = torch.randn(2000, generator=generator, dtype=torch.float64)
    fitted, note = extrapolate_exposure(canaries, torch.nn.functional.softplus(2 + log_odds))
    assert note is None and all(0 < f < 20 for f in fitted)
    fitted, note = extrapolate_exposure(canaries, torch.nn.functional.softplus(2 + log_odds.abs()))
    assert "collapsed" in note and len(fitted) == 2  # a half-normal: reported, with the warning beside it
    # A float32 model can give a reference loss of exactly 0: no fit, but the audit goes on.
    fitted, note = extrapolate_exposure(canaries, torch.cat([log_odds.exp(), torch.zeros(1, dtype=torch.float64)]))
    assert note.startswith("not extrapolated") and all(f != f for f in fitted)
