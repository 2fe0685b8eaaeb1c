"""The per-epoch membership audit callback."""

import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from privfast.attacks import train_classifier  # noqa: E402
from privfast.audit import MembershipAudit  # noqa: E402
from privfast.data import load_digits  # noqa: E402
from privfast.metrics import dp_perr_bound  # noqa: E402
from privfast.models import MLP  # noqa: E402

EPOCHS = 20


@pytest.fixture(scope="module")
def audited():
    train, test = load_digits()
    members = train.x[:200], train.y[:200]
    audit = MembershipAudit(members, (test.x, test.y), attacks=("yeom", "calibrated"), max_examples=400,
                            epsilon=lambda: 2.0, delta=1e-5)
    torch.manual_seed(0)
    train_classifier(MLP(64, 10, hidden=(256,)), *members, epochs=EPOCHS, lr=3e-3, batch_size=32, callbacks=[audit],
                     generator=torch.Generator().manual_seed(0))
    return audit


def test_one_record_per_epoch(audited):
    history = audited.history
    assert [r["epoch"] for r in history] == list(range(EPOCHS))
    for record in history:
        for attack in ("yeom", "calibrated"):
            metrics = record[attack]
            assert metrics["p_err"] == pytest.approx((1 - metrics["advantage"]) / 2)
            assert set(metrics["tpr_at_fpr"]) == {0.001, 0.01}
        assert record["dp_perr_bound"] == pytest.approx(dp_perr_bound(2.0, 1e-5))


def test_curve_shows_training_and_growing_leakage(audited):
    history = audited.history
    first, last = history[0], history[-1]
    assert last["train_accuracy"] > 0.99 and last["test_accuracy"] > first["test_accuracy"] + 0.2
    # Training longer overfits and leaks more (averaged over 4 epochs: one epoch's decision is noisy).
    early, late = ([r["calibrated"]["advantage"] for r in part] for part in (history[:4], history[-4:]))
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
        from privfast.attacks.mia import _result

        calls.append(len(m[1]))
        return _result(torch.zeros(len(m[1])), torch.zeros(len(n[1])))

    audit = MembershipAudit(members, nonmembers, attacks={"fake": fake})
    record = audit(MLP(64, 10), epoch=0)
    assert calls == [50] and record["fake"]["auc"] == 0.5 and not math.isnan(record["test_accuracy"])
    with pytest.raises(ValueError, match="unknown attacks"):
        MembershipAudit(members, nonmembers, attacks=("nope",))
    with pytest.raises(ValueError, match="lower n_known"):
        MembershipAudit(members, nonmembers)  # 50 examples each, 100 known by default
    small = MembershipAudit(members, nonmembers, n_known=20)
    record = small(MLP(64, 10), epoch=0)  # 20 known of 50: the other 30 each are scored
    assert record["yeom"]["p_err"] == pytest.approx((1 - record["yeom"]["advantage"]) / 2)
    assert math.isfinite(record["yeom"]["auc"])
