"""LiRA and its vectorized shadow training, on digits."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from privfast.attacks import (
    ShadowModels,
    calibrated_threshold,
    lira,
    logit_confidence,
    predict_logits,
    train_classifier,
    train_shadow_models,
)
from privfast.data import load_digits
from privfast.models import MLP

POOL = 500
N_SHADOWS = 16  # as in the LiRA reference
RECIPE = {"epochs": 60, "lr": 3e-3, "batch_size": 64}


def _mlp():
    return MLP(64, 10, hidden=(128,))


@pytest.fixture(scope="module")
def setting():
    train, _ = load_digits()
    pool_x, pool_y = train.x[:POOL], train.y[:POOL]
    generator = torch.Generator().manual_seed(0)
    is_member = torch.zeros(POOL, dtype=torch.bool)
    is_member[torch.randperm(POOL, generator=generator)[: POOL // 2]] = True
    torch.manual_seed(0)
    target = train_classifier(_mlp(), pool_x[is_member], pool_y[is_member], generator=generator, **RECIPE)
    torch.manual_seed(1)
    outside = train.x[POOL : POOL + POOL // 2], train.y[POOL : POOL + POOL // 2]
    other = train_classifier(_mlp(), *outside, generator=generator, **RECIPE)  # saw none of the pool
    shadows = train_shadow_models(
        _mlp, pool_x, pool_y, n_shadows=N_SHADOWS, generator=generator, progress=False, **RECIPE
    )
    return {"x": pool_x, "y": pool_y, "is_member": is_member, "target": target, "other": other, "shadows": shadows}


def test_logit_confidence_matches_probabilities():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    labels = torch.randint(0, 10, (50,), generator=torch.Generator().manual_seed(1))
    p = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(logit_confidence(logits, labels), (p / (1 - p)).log())
    # Stays finite and exact where p_y rounds to 1.
    extreme = torch.tensor([[200.0, 0.0, 0.0]], dtype=torch.float64)
    assert logit_confidence(extreme, torch.tensor([0])).item() == pytest.approx(200 - math.log(2))


def test_shadow_splits(setting):
    in_mask = setting["shadows"].in_mask
    assert in_mask.shape == (N_SHADOWS, POOL)
    assert (in_mask.sum(0) == N_SHADOWS // 2).all()  # every example IN for exactly half the shadows
    assert (in_mask.sum(1) == POOL // 2).all()  # every shadow trains on half the pool
    assert len({tuple(row.tolist()) for row in in_mask}) == N_SHADOWS


def test_each_shadow_learns_its_own_half(setting):
    """Vectorized training keeps the models apart: each fits its IN half, not the OUT half."""
    shadows = setting["shadows"]
    correct = shadows.logits(setting["x"]).argmax(-1) == setting["y"]  # [S, N]
    in_mask = shadows.in_mask
    in_acc = (correct & in_mask).sum(1) / in_mask.sum(1)
    out_acc = (correct & ~in_mask).sum(1) / (~in_mask).sum(1)
    assert (in_acc > 0.99).all()
    assert (out_acc < in_acc - 0.02).all()
    assert (out_acc > 0.8).all()  # and they are real digit classifiers


def test_shadow_training_is_reproducible():
    train, _ = load_digits()
    x, y = train.x[:60], train.y[:60]
    runs = [
        train_shadow_models(
            _mlp, x, y, n_shadows=2, epochs=2, generator=torch.Generator().manual_seed(5), progress=False
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].in_mask, runs[1].in_mask)
    torch.testing.assert_close(runs[0].logits(x), runs[1].logits(x), rtol=0, atol=0)


@pytest.mark.parametrize("online", [True, False])
def test_lira_finds_membership_only_when_there_is_some(setting, online):
    args = (setting["shadows"], setting["x"], setting["y"])
    found = lira(setting["target"], *args, is_member=setting["is_member"], online=online)
    assert found.summary["auc"] > (0.6 if online else 0.55)  # offline LiRA is the weaker variant
    assert found.summary["tpr_at_fpr"][0.01] > 0.03  # well above the 1% of a blind guess
    assert found.info["online"] is online
    assert found.member_scores.shape == (POOL // 2,)
    null = lira(setting["other"], *args, is_member=setting["is_member"], online=online)
    assert abs(null.summary["auc"] - 0.5) < 0.07


def test_online_lira_beats_the_loss_threshold(setting):
    is_member = setting["is_member"]
    online = lira(setting["target"], setting["shadows"], setting["x"], setting["y"], is_member=is_member)
    members = setting["x"][is_member], setting["y"][is_member]
    nonmembers = setting["x"][~is_member], setting["y"][~is_member]
    threshold = calibrated_threshold(setting["target"], members, nonmembers)
    assert online.summary["auc"] > threshold.summary["auc"]


def test_fixed_variance_lira_finds_membership(setting):
    args = (setting["target"], setting["shadows"], setting["x"], setting["y"])
    fixed = lira(*args, is_member=setting["is_member"], fix_variance=True, mirror=False)
    assert fixed.summary["auc"] > 0.6


# ----------------------------------------------------------------------------------------
# LiRA's scores against the paper's formulas, on confidences chosen by hand
# ----------------------------------------------------------------------------------------

HAND_N, HAND_S = 6, 8


def _confidence_table(phi):
    """A bias-free Linear(N, 2) whose logits on the one-hot input e_n are ``(phi[n], 0)``: its confidence
    on example n with label 0 is ``phi[n]``, and on the mirrored input (e_{N-1-n}) ``phi[N-1-n]``."""
    layer = nn.Linear(len(phi), 2, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.stack([torch.as_tensor(phi), torch.zeros(len(phi), dtype=torch.float64)]))
    return layer


@pytest.fixture(scope="module")
def hand_made():
    """Shadow and target confidences drawn per example with spreads from 0.2 to 5, so that a standard
    deviation and a variance differ by a factor of 5 either way."""
    rng = np.random.default_rng(0)
    in_mask = np.zeros((HAND_S, HAND_N), dtype=bool)
    for n in range(HAND_N):
        in_mask[rng.permutation(HAND_S)[: 3 + n % 3], n] = True  # 3 to 5 IN, 3 to 5 OUT shadows per example
    spread = np.array([0.2, 0.5, 1.0, 2.0, 3.0, 5.0])
    center_in, center_out = rng.normal(2.0, 1.0, HAND_N), rng.normal(-1.0, 1.0, HAND_N)
    shadow_phi = np.where(in_mask, center_in, center_out) + spread * rng.normal(size=(HAND_S, HAND_N))
    target_phi = rng.normal(0.5, 2.0, HAND_N)
    shadows = ShadowModels(
        base=nn.Linear(HAND_N, 2, bias=False).to("meta"),
        params={"weight": torch.stack([_confidence_table(phi).weight.detach() for phi in shadow_phi])},
        buffers={},
        in_mask=torch.as_tensor(in_mask),
    )
    return {
        "shadows": shadows,
        "shadow_phi": shadow_phi,
        "in_mask": in_mask,
        "target_phi": target_phi,
        "target": _confidence_table(target_phi),
    }


def _expected_lira(shadow_phi, in_mask, target_phi, *, online, fix_variance):
    """Carlini et al. (S&P 2022), per example n and query q, with Gaussians fitted by mean and unbiased
    std: online ``log N(t; mu_in, s_in) - log N(t; mu_out, s_out)``; offline ``log Pr[Z <= t]`` with
    Z ~ N(mu_out, s_out); the score is the mean over queries. ``fix_variance``: every (n, q) gets the
    mean of the per-(n, q) variances (privfast's pooled within-example variance; the reference
    plotting code's ``np.std`` over all IN scores would also count the spread of the per-example means).

    Args:
        shadow_phi: ``[S, N, Q]`` shadow confidences.
        in_mask: ``[S, N]`` which shadows trained on which example.
        target_phi: ``[N, Q]`` target confidences.
    """
    _, n_examples, n_queries = shadow_phi.shape

    def fit(mask):
        groups = [[shadow_phi[mask[:, n], n, q] for q in range(n_queries)] for n in range(n_examples)]
        mu = np.array([[g.mean() for g in row] for row in groups])
        var = np.array([[g.var(ddof=1) for g in row] for row in groups])
        return mu, np.sqrt(np.full_like(var, var.mean()) if fix_variance else var)

    mu_out, s_out = fit(~in_mask)
    if online:
        mu_in, s_in = fit(in_mask)
        per_query = norm.logpdf(target_phi, mu_in, s_in) - norm.logpdf(target_phi, mu_out, s_out)
    else:
        per_query = norm.logcdf(target_phi, mu_out, s_out)
    return per_query.mean(-1)


@pytest.mark.parametrize("fix_variance", [False, True], ids=["per-example", "fixed-variance"])
@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
@pytest.mark.parametrize("mirror", [False, True], ids=["plain", "mirror"])
def test_lira_scores_equal_the_gaussian_formulas(hand_made, online, fix_variance, mirror):
    shadow_phi, in_mask, target_phi = hand_made["shadow_phi"], hand_made["in_mask"], hand_made["target_phi"]
    queries = [lambda a: a, lambda a: a[..., ::-1]] if mirror else [lambda a: a]  # mirror(e_n) = e_{N-1-n}
    expected = _expected_lira(
        np.stack([q(shadow_phi) for q in queries], -1),
        in_mask,
        np.stack([q(target_phi) for q in queries], -1),
        online=online,
        fix_variance=fix_variance,
    )
    is_member = torch.tensor([True, False] * (HAND_N // 2))
    found = lira(
        hand_made["target"],
        hand_made["shadows"],
        torch.eye(HAND_N, dtype=torch.float64),
        torch.zeros(HAND_N, dtype=torch.int64),
        is_member=is_member,
        online=online,
        fix_variance=fix_variance,
        mirror=mirror,
    )
    scores = torch.empty(HAND_N, dtype=torch.float64)
    scores[is_member], scores[~is_member] = found.member_scores.double(), found.nonmember_scores.double()
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert found.info["online"] is online


def test_lira_scores_rank_members_first_on_the_hand_made_case(hand_made):
    """Direction: a target confidence near the IN fit scores above one near the OUT fit, online and
    offline (a sign slip in either would pass every AUC test on symmetric data only by luck)."""
    shadow_phi, in_mask = hand_made["shadow_phi"], hand_made["in_mask"]
    mu_in = np.array([shadow_phi[in_mask[:, n], n].mean() for n in range(HAND_N)])
    mu_out = np.array([shadow_phi[~in_mask[:, n], n].mean() for n in range(HAND_N)])
    x, y = torch.eye(HAND_N, dtype=torch.float64), torch.zeros(HAND_N, dtype=torch.int64)
    is_member = torch.tensor([True, False] * (HAND_N // 2))
    for online in (True, False):
        at_in = lira(
            _confidence_table(mu_in), hand_made["shadows"], x, y, is_member=is_member, online=online, mirror=False
        )
        at_out = lira(
            _confidence_table(mu_out), hand_made["shadows"], x, y, is_member=is_member, online=online, mirror=False
        )
        assert (at_in.member_scores > at_out.member_scores).all()
        assert (at_in.nonmember_scores > at_out.nonmember_scores).all()


def test_shadows_train_through_the_targets_augmentation():
    from privfast.augment.mechanisms import Mixup, RandomCrop

    train, _ = load_digits()
    x, y = train.x[:200], train.y[:200]

    def in_accuracy(mechanism):
        shadows = train_shadow_models(
            _mlp,
            x,
            y,
            n_shadows=2,
            epochs=30,
            lr=3e-3,
            mechanism=mechanism,
            generator=torch.Generator().manual_seed(0),
            progress=False,
        )
        correct = shadows.logits(x).argmax(-1) == y
        return (correct & shadows.in_mask).sum(1) / shadows.in_mask.sum(1)

    augmented, plain = in_accuracy(RandomCrop(1)), in_accuracy(None)
    assert (augmented > 0.7).all()  # real classifiers...
    assert augmented.mean() < plain.mean() - 0.05  # ...that fit their clean images less: the crops were used
    with pytest.raises(ValueError, match="mixes examples"):
        train_shadow_models(_mlp, x, y, n_shadows=2, epochs=1, mechanism=Mixup(1.0))


def test_bad_arguments(setting):
    with pytest.raises(ValueError, match="same pool"):
        lira(
            setting["target"],
            setting["shadows"],
            setting["x"][:10],
            setting["y"][:10],
            is_member=setting["is_member"][:10],
        )
    with pytest.raises(ValueError, match="both members and non-members"):
        lira(
            setting["target"],
            setting["shadows"],
            setting["x"],
            setting["y"],
            is_member=torch.ones(POOL, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="even"):
        train_shadow_models(_mlp, setting["x"], setting["y"], n_shadows=3, epochs=1)


def test_predict_logits_restores_train_mode(setting):
    model = setting["target"].train()
    predict_logits(model, setting["x"][:4])
    assert model.training


def test_vectorized_training_equals_training_each_model_alone():
    """One full-batch epoch of stacked training moves each model exactly as training it alone would."""
    import torch.nn.functional as F

    train, _ = load_digits()
    x, y = train.x[:40], train.y[:40]
    start = train_shadow_models(
        _mlp, x, y, n_shadows=4, epochs=0, generator=torch.Generator().manual_seed(3), progress=False
    )
    # Same generator seed, so the same halves and initializations; batch = half the pool = one step.
    trained = train_shadow_models(
        _mlp,
        x,
        y,
        n_shadows=4,
        epochs=1,
        batch_size=20,
        lr=1e-3,
        generator=torch.Generator().manual_seed(3),
        progress=False,
    )
    assert torch.equal(start.in_mask, trained.in_mask)
    for s in range(4):
        model = _mlp()
        model.load_state_dict({name: stacked[s] for name, stacked in start.params.items()})
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        keep = start.in_mask[s]
        F.cross_entropy(model(x[keep]), y[keep]).backward()
        optimizer.step()
        # Adam's first step is +-lr wherever the gradient is well above eps; lr = 1e-3 here.
        for name, param in model.named_parameters():
            torch.testing.assert_close(trained.params[name][s], param.detach(), rtol=0, atol=2e-5)
        assert not torch.equal(trained.params["net.1.weight"][s], start.params["net.1.weight"][s])
