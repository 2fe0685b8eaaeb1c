"""Threshold, Salem and augmentation-aware attacks on deliberately overfitted digits models.

Each attack must find membership in a model trained on the members and must not in a model
trained on other data (for which the "members" are just more non-members).
"""

import numpy as np
import pytest
import torch

from privfast.attacks import (
    augmentation_aware,
    calibrated_threshold,
    example_losses,
    salem_nn,
    train_classifier,
    yeom,
)
from privfast.attacks.common import attack_result, labelled
from privfast.augment.mechanisms import RandomCrop
from privfast.data import Split, load_digits
from privfast.metrics import loss_rank_correlation, outliers

N_MEMBERS = 200


def _fit(x, y, seed, mechanism=None, epochs=75):
    from privfast.models import MLP

    torch.manual_seed(seed)
    model = MLP(64, 10, hidden=(256,))
    # Many epochs on few examples without weight decay: ~100% train accuracy, a clear loss gap.
    return train_classifier(
        model, x, y, epochs=epochs, lr=3e-3, mechanism=mechanism, generator=torch.Generator().manual_seed(seed)
    )


@pytest.fixture(scope="module")
def digits():
    train, test = load_digits()
    return {
        "members": (train.x[:N_MEMBERS], train.y[:N_MEMBERS]),
        "other": (train.x[N_MEMBERS : 2 * N_MEMBERS], train.y[N_MEMBERS : 2 * N_MEMBERS]),
        "shadow_members": (train.x[400:600], train.y[400:600]),
        "shadow_nonmembers": (train.x[600:], train.y[600:]),
        "nonmembers": (test.x, test.y),
    }


@pytest.fixture(scope="module")
def models(digits):
    return {
        "target": _fit(*digits["members"], seed=0),
        "other": _fit(*digits["other"], seed=1),  # never saw the members
        "shadow": _fit(*digits["shadow_members"], seed=2),
    }


def _attack(attack, model, digits, seed=0, **kwargs):
    return attack(
        model, digits["members"], digits["nonmembers"], generator=torch.Generator().manual_seed(seed), **kwargs
    )


@pytest.mark.parametrize(
    "attack, kwargs",
    [
        (yeom, {}),
        (calibrated_threshold, {}),
        (calibrated_threshold, {"per_class": True}),
    ],
)
def test_threshold_attacks_find_membership_only_when_there_is_some(models, digits, attack, kwargs):
    found = _attack(attack, models["target"], digits, **kwargs)
    assert found.decision_advantage > 0.1
    assert found.summary["auc"] > 0.58
    null = _attack(attack, models["other"], digits, **kwargs)
    assert abs(null.decision_advantage) < 0.1
    assert abs(null.summary["auc"] - 0.5) < 0.06


def test_calibrated_at_least_as_strong_as_yeom(models, digits):
    """Kaya & Dumitraş's trend (ICML 2021): the "powerful" attack's advantage is at least Yeom's (mean over draws)."""
    yeom_adv = np.mean([_attack(yeom, models["target"], digits, seed=s).decision_advantage for s in range(8)])
    calibrated_adv = np.mean(
        [_attack(calibrated_threshold, models["target"], digits, seed=s).decision_advantage for s in range(8)]
    )
    assert calibrated_adv >= yeom_adv


def test_scores_are_negative_losses_in_input_order(models, digits):
    result = _attack(yeom, models["target"], digits)
    losses = example_losses(models["target"], *digits["members"])
    torch.testing.assert_close(result.member_scores, -losses)
    assert result.member_pred.shape == (N_MEMBERS,)
    # Yeom's threshold is the mean loss of 100 known members; the decision is loss <= threshold.
    assert torch.equal(result.member_pred, losses <= result.info["threshold"])
    assert result.info["threshold"] > losses.min()


def test_per_class_thresholds(models, digits):
    result = _attack(calibrated_threshold, models["target"], digits, per_class=True)
    thresholds = result.info["class_thresholds"]
    assert thresholds.shape == (10,)
    labels = digits["members"][1]
    assert torch.equal(result.member_pred, result.member_scores >= thresholds[labels].float())


def test_salem_nn(models, digits):
    shadow = {
        "shadow_model": models["shadow"],
        "shadow_members": digits["shadow_members"],
        "shadow_nonmembers": digits["shadow_nonmembers"],
    }
    found = salem_nn(models["target"], digits["members"], digits["nonmembers"], **shadow)
    assert found.decision_advantage > 0.1 and found.summary["auc"] > 0.55  # its scores saturate: many ties
    assert ((found.member_scores >= 0) & (found.member_scores <= 1)).all()
    null = salem_nn(models["other"], digits["members"], digits["nonmembers"], **shadow)
    assert abs(null.decision_advantage) < 0.1 and abs(null.summary["auc"] - 0.5) < 0.06


def test_augmentation_aware(digits):
    crop = RandomCrop(1)
    # Augmented training overfits more slowly; the decision is averaged over attacker draws since
    # only 100 members remain unknown to the attacker.
    target = _fit(*digits["members"], seed=0, mechanism=crop, epochs=250)
    other = _fit(*digits["other"], seed=1, mechanism=crop, epochs=250)
    found = [_attack(augmentation_aware, target, digits, seed=s, augment=crop) for s in range(3)]
    for result in found:
        assert result.info["reduction"] in ("mean", "median", "min", "max", "std")
        assert result.info["known_advantage"][result.info["reduction"]] == max(result.info["known_advantage"].values())
    assert np.mean([r.decision_advantage for r in found]) > 0.1
    assert min(r.summary["auc"] for r in found) > 0.58
    null = [_attack(augmentation_aware, other, digits, seed=s, augment=crop) for s in range(3)]
    assert abs(np.mean([r.decision_advantage for r in null])) < 0.1
    assert max(abs(r.summary["auc"] - 0.5) for r in null) < 0.06
    # The default augmentation (reflect-padded crop + flip through privfast.ops) runs too.
    assert _attack(augmentation_aware, target, digits, draws=4).member_scores.shape == (N_MEMBERS,)


def test_lrc_and_outliers_across_runs(models, digits):
    target_losses = example_losses(models["target"], *digits["members"])
    assert loss_rank_correlation(target_losses, target_losses) == pytest.approx(1.0)
    assert loss_rank_correlation(target_losses, example_losses(models["other"], *digits["members"])) < 0.9
    runs = [_attack(calibrated_threshold, models["target"], digits, seed=s) for s in range(3)]
    out = outliers(torch.stack([r.member_pred for r in runs]), torch.stack([~r.nonmember_pred for r in runs]))
    always = torch.stack([r.member_pred for r in runs]).all(0)
    assert np.array_equal(out["members"], always.nonzero().flatten().numpy())


def test_bad_arguments(models, digits):
    with pytest.raises(ValueError, match="n_known"):
        _attack(yeom, models["target"], digits, n_known=N_MEMBERS)
    with pytest.raises(ValueError, match="pair"):
        yeom(models["target"], digits["members"][0], digits["nonmembers"])
    with pytest.raises(ValueError, match="int64"):
        yeom(models["target"], (digits["members"][0], digits["members"][1].float()), digits["nonmembers"])


def test_decision_and_best_advantages_are_named_apart(models, digits):
    """The decision's advantage is scored on unknown examples only; the best threshold is chosen
    after seeing every score and label, so it is at least as large on the same scores."""
    result = _attack(calibrated_threshold, models["target"], digits)
    assert result.decision_advantage == result.decision["advantage"]
    assert result.best_advantage == result.summary["best_advantage"] and "advantage" not in result.summary
    assert result.best_advantage >= result.decision_advantage - 0.05
    # Without a decision (LiRA-like scores), there is no decision advantage to report.
    bare = attack_result(result.member_scores, result.nonmember_scores)
    assert bare.decision_advantage is None and bare.best_advantage == result.best_advantage


@pytest.mark.parametrize("attack", [yeom, calibrated_threshold])
def test_attack_data_is_checked_and_accepts_any_pair(models, digits, attack):
    members = Split(*digits["members"])
    assert isinstance(labelled(tuple(members), "members"), Split)
    with pytest.raises(ValueError, match="members must be a pair"):
        attack(models["target"], [members.x, members.y], digits["nonmembers"])
    with pytest.raises(ValueError, match="nonmembers: y must be int64"):
        attack(models["target"], members, (digits["nonmembers"][0], digits["nonmembers"][1].float()))
