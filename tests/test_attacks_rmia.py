"""RMIA (Zarifzadeh et al., ICML 2024): its score against a direct computation of the paper's formula on
probabilities chosen by hand, and the attack on the overfitted digits model with vectorized shadows."""

import numpy as np
import pytest
import torch
from torch import nn

from privfast.attacks import (
    ShadowModels,
    lira,
    rmia,
    rmia_scores,
    train_classifier,
    train_shadow_models,
    tune_offline_a,
)
from privfast.attacks.rmia import A_GRID
from privfast.data import load_digits
from privfast.models import MLP

# ------------------------------------------------------------------------------------------------
# The paper's formula, computed directly on a small case
# ------------------------------------------------------------------------------------------------
N, Z, S = 7, 5, 6


def _table(p):
    """A bias-free Linear(D, 2) whose probability of class 0 on the one-hot input e_d is ``p[d]``."""
    layer = nn.Linear(len(p), 2, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(
            torch.stack(
                [torch.logit(torch.as_tensor(p, dtype=torch.float64)), torch.zeros(len(p), dtype=torch.float64)]
            )
        )
    return layer


@pytest.fixture(scope="module")
def hand_made():
    """Pool examples e_0..e_{N-1} and population points e_N..e_{N+Z-1}, all of label 0."""
    rng = np.random.default_rng(0)
    in_mask = np.zeros((S, N), dtype=bool)
    for n in range(N):
        in_mask[rng.permutation(S)[: 2 + n % 3], n] = True  # 2 to 4 IN references per example
    shadow_p = rng.uniform(0.05, 0.95, (S, N + Z))
    shadow_p[:, :N] = np.where(in_mask, np.minimum(shadow_p[:, :N] + 0.3, 0.99), shadow_p[:, :N])
    target_p = rng.uniform(0.05, 0.99, N + Z)
    shadows = ShadowModels(
        base=nn.Linear(N + Z, 2, bias=False).to("meta"),
        params={"weight": torch.stack([_table(p).weight.detach() for p in shadow_p])},
        buffers={},
        in_mask=torch.as_tensor(in_mask),
    )
    eye = torch.eye(N + Z, dtype=torch.float64)
    return {
        "shadows": shadows,
        "shadow_p": shadow_p,
        "in_mask": in_mask,
        "target_p": target_p,
        "target": _table(target_p),
        "x": eye[:N],
        "z": eye[N:],
        "y": torch.zeros(N, dtype=torch.int64),
        "is_member": torch.tensor([True, False] * (N // 2) + [True]),
    }


def _direct(d, *, online, a, gamma, external):
    """score(x) = (1/|Z|) sum_z 1[ (p(x|theta)/p(x)) / (p(z|theta)/p(z)) >= gamma ], term by term."""

    def p_ref(column, in_mask):
        values = d["shadow_p"][:, column]
        ins = values[in_mask] if in_mask is not None else values[:0]
        outs = values[~in_mask] if in_mask is not None else values
        if online and len(ins):
            return (ins.mean() + outs.mean()) / 2
        return ((1 + a) * outs.mean() + (1 - a)) / 2

    population = range(N, N + Z) if external else range(N)
    scores = []
    for x in range(N):
        ratio_x = d["target_p"][x] / p_ref(x, d["in_mask"][:, x])
        hits = 0
        for z in population:
            ratio_z = d["target_p"][z] / p_ref(z, None if external else d["in_mask"][:, z])
            hits += ratio_x / ratio_z >= gamma
        scores.append(hits / len(population))
    return np.array(scores)


@pytest.mark.parametrize("online", [True, False])
@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 1.7])
def test_rmia_score_is_the_papers_formula(hand_made, online, external, gamma):
    d = hand_made
    population = (d["z"], torch.zeros(Z, dtype=torch.int64)) if external else None
    result = rmia(
        d["target"],
        d["shadows"],
        d["x"],
        d["y"],
        is_member=d["is_member"],
        online=online,
        offline_a=0.3,
        population=population,
        gamma=gamma,
        mirror=False,
    )
    scores = torch.empty(N, dtype=torch.float64)
    scores[d["is_member"]], scores[~d["is_member"]] = result.member_scores, result.nonmember_scores
    expected = _direct(d, online=online, a=0.3, gamma=gamma, external=external)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=1e-12)
    assert len(set(expected.tolist())) >= 2  # the case discriminates: the scores are not all alike
    assert result.info["offline_a"] == (None if online and not external else 0.3)


def test_rmia_scores_validate_their_inputs():
    ones = torch.full((3, 1), 0.5, dtype=torch.float64)
    refs = torch.full((2, 3, 1), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="gamma"):
        rmia_scores(ones, refs, None, ones, refs, None, online=False, offline_a=0.5, gamma=0.0)
    with pytest.raises(ValueError, match="offline_a"):
        rmia_scores(ones, refs, None, ones, refs, None, online=False, offline_a=None)
    with pytest.raises(ValueError, match="shapes"):
        rmia_scores(ones, refs[:, :2], None, ones, refs, None, online=False, offline_a=0.5)
    with pytest.raises(ValueError, match="OUT reference"):
        rmia_scores(ones, refs, torch.ones(2, 3, dtype=torch.bool), ones, refs, None, online=True, offline_a=0.5)


# ------------------------------------------------------------------------------------------------
# The attack on an overfitted digits model, on the shadows LiRA uses
# ------------------------------------------------------------------------------------------------
POOL, SHADOWS = 400, 8
RECIPE = {"epochs": 40, "lr": 3e-3, "batch_size": 64}


def _mlp():
    return MLP(64, 10, hidden=(128,))


@pytest.fixture(scope="module")
def digits(one_thread):
    train, _ = load_digits()
    x, y = train.x[:POOL], train.y[:POOL]
    generator = torch.Generator().manual_seed(0)
    is_member = torch.zeros(POOL, dtype=torch.bool)
    is_member[torch.randperm(POOL, generator=generator)[: POOL // 2]] = True
    torch.manual_seed(0)
    target = train_classifier(_mlp(), x[is_member], y[is_member], generator=generator, **RECIPE)
    torch.manual_seed(1)
    other = train_classifier(
        _mlp(), train.x[POOL : POOL + POOL // 2], train.y[POOL : POOL + POOL // 2], generator=generator, **RECIPE
    )  # trained elsewhere: saw none of the pool
    shadows = train_shadow_models(_mlp, x, y, n_shadows=SHADOWS, generator=generator, progress=False, **RECIPE)
    return {
        "x": x,
        "y": y,
        "is_member": is_member,
        "target": target,
        "other": other,
        "shadows": shadows,
        "population": (train.x[POOL + POOL // 2 : POOL + POOL], train.y[POOL + POOL // 2 : POOL + POOL]),
    }


@pytest.mark.parametrize("online", [True, False])
def test_rmia_finds_membership_only_when_there_is_some(digits, online, one_thread):
    args = (digits["shadows"], digits["x"], digits["y"])
    found = rmia(digits["target"], *args, is_member=digits["is_member"], online=online)
    assert found.summary["auc"] > (0.6 if online else 0.55)
    assert found.summary["tpr_at_fpr"][0.01] > 0.03  # well above the 1% of a blind guess
    assert found.member_scores.shape == (POOL // 2,)
    null = rmia(digits["other"], *args, is_member=digits["is_member"], online=online)
    assert abs(null.summary["auc"] - 0.5) < 0.08
    # LiRA on the same shadow models, for comparison (RESULTS.md has the numbers).
    reference = lira(digits["target"], *args, is_member=digits["is_member"], online=online, fix_variance=True)
    assert found.summary["auc"] > reference.summary["auc"] - 0.05


def test_offline_a_is_tuned_on_a_reference_model(digits, one_thread):
    args = (digits["shadows"], digits["x"], digits["y"])
    best, aucs = tune_offline_a(*args)
    assert best in A_GRID and set(aucs) == set(A_GRID) and aucs[best] == max(aucs.values())
    assert aucs[best] > 0.55  # shadow 0 is overfitted too: the tuning attack finds its members
    tuned = rmia(digits["target"], *args, is_member=digits["is_member"], online=False)
    given = rmia(digits["target"], *args, is_member=digits["is_member"], online=False, offline_a=best)
    assert tuned.info["offline_a"] == best and tuned.info["a_auc"] == aucs
    torch.testing.assert_close(tuned.member_scores, given.member_scores)
    # An external population (never in any shadow's pool) works as well.
    external = rmia(
        digits["target"],
        *args,
        is_member=digits["is_member"],
        online=False,
        offline_a=best,
        population=digits["population"],
    )
    assert external.summary["auc"] > 0.55


def test_rmia_refuses_another_pool(digits):
    with pytest.raises(ValueError, match="same pool"):
        rmia(
            digits["target"], digits["shadows"], digits["x"][:10], digits["y"][:10], is_member=digits["is_member"][:10]
        )
