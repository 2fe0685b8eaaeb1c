"""Canary exposure: rank-based and extrapolated, and the image and token canary builders."""

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from privfast.attacks import (
    example_losses,
    exposure,
    exposure_extrapolated,
    image_canaries,
    insert_canaries,
    log_perplexity,
    token_canary,
    train_classifier,
)
from privfast.data import load_digits
from privfast.models import MLP


@pytest.mark.parametrize("k", [1, 4, 10])
def test_first_of_2k_candidates_is_k_bits(k):
    references = torch.rand(2**k - 1) + 1.0  # the canary (loss 0.5) beats all 2^k - 1 others
    assert exposure(torch.tensor([0.5]), references).item() == pytest.approx(k)
    # Last of the 2^k candidates: rank 2^k, exposure 0.
    assert exposure(torch.tensor([9.0]), references).item() == pytest.approx(0.0)


def test_exposure_matches_direct_rank():
    rng = np.random.default_rng(0)
    references, canaries = rng.normal(size=999), rng.normal(size=20)
    canaries[:3] = references[:3]  # ties favour the canary
    ranks = 1 + (references[None, :] < canaries[:, None]).sum(1)
    expected = math.log2(1000) - np.log2(ranks)
    np.testing.assert_allclose(exposure(torch.from_numpy(canaries), torch.from_numpy(references)).numpy(), expected)


@pytest.mark.parametrize(
    "loc, to_loss", [(2.0, lambda log_odds: np.logaddexp(0, log_odds)), (20.0, lambda log_odds: log_odds)]
)
def test_extrapolated_exposure_on_a_skew_normal(loc, to_loss):
    """Candidates whose log-odds are skew-normal, the fitted family; at log-perplexities of many
    nats (the Secret Sharer's sequences) the log-odds are the losses themselves."""
    a, scale = 4.0, 1.5
    references = to_loss(scipy.stats.skewnorm.rvs(a, loc, scale, size=20_000, random_state=1))
    quantiles = np.array([0.5, 1 / 64, 2.0**-20])
    canaries = to_loss(scipy.stats.skewnorm.ppf(quantiles, a, loc, scale))
    got = exposure_extrapolated(torch.from_numpy(canaries), torch.from_numpy(references)).numpy()
    np.testing.assert_allclose(got[:2], -np.log2(quantiles[:2]), atol=0.15)
    assert got[2] > 15  # far beyond the log2(20,001) ~ 14.3 bits that ranking can show
    rank_based = exposure(torch.from_numpy(canaries[:2]), torch.from_numpy(references)).numpy()
    np.testing.assert_allclose(got[:2], rank_based, atol=0.2)


@pytest.mark.parametrize("logit_scale", [2.0, 5.0])
def test_extrapolated_exposure_of_classifier_losses(logit_scale):
    """A classifier's candidates: random logits, random labels. Their losses pile up against 0 (the
    candidates labelled with the predicted class), which no skew-normal fits; the fit must still
    match their ranks inside the sample and go on past them."""
    generator = torch.Generator().manual_seed(0)

    def candidate_losses(n):
        logits = logit_scale * torch.randn(n, 10, generator=generator, dtype=torch.float64)
        return F.cross_entropy(logits, torch.randint(0, 10, (n,), generator=generator), reduction="none")

    references = candidate_losses(2000)
    quantiles = torch.tensor([1 / 2, 1 / 8, 1 / 32, 1 / 128], dtype=torch.float64)
    canaries = torch.quantile(candidate_losses(200_000), quantiles)  # Pr[loss(r) <= canary] = quantile
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fit that follows the tail must not warn
        got = exposure_extrapolated(canaries, references)
    torch.testing.assert_close(got, -quantiles.log2(), atol=0.5, rtol=0)
    torch.testing.assert_close(got[:3], exposure(canaries[:3], references), atol=0.5, rtol=0)


def test_extrapolated_exposure_flags_bad_fits():
    generator = torch.Generator().manual_seed(0)
    # Log-odds bounded below: the MLE of the shape diverges and the fit ends at the smallest reference.
    half_normal = F.softplus(2 + torch.randn(2000, generator=generator, dtype=torch.float64).abs())
    with pytest.warns(RuntimeWarning, match="collapsed to a half-normal"):
        exposure_extrapolated(torch.tensor([0.5]), half_normal)
    # A cluster of confident candidates 5 % strong: one skew-normal cannot follow both.
    clustered = F.softplus(
        torch.cat(
            [
                4 + torch.randn(1900, generator=generator, dtype=torch.float64),
                0.3 * torch.randn(100, generator=generator, dtype=torch.float64) - 1,
            ]
        )
    )
    with pytest.warns(RuntimeWarning, match="lower tail"):
        exposure_extrapolated(torch.tensor([0.5]), clustered)
    with pytest.raises(ValueError, match="fit of the reference losses failed"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's own note on identical data
        exposure_extrapolated(torch.tensor([0.5]), torch.full((10,), 2.0))
    with pytest.raises(ValueError, match="-log p"):
        exposure_extrapolated(torch.tensor([-0.1]), half_normal)
    with pytest.raises(ValueError, match="-log p"):
        exposure_extrapolated(torch.tensor([0.5]), torch.cat([half_normal, torch.zeros(1, dtype=torch.float64)]))


def test_token_canary_candidates():
    canary = token_canary([7, 8, 9], slots=3, alphabet=range(20, 30), generator=torch.Generator().manual_seed(0))
    assert torch.equal(canary.sequence[:3], torch.tensor([7, 8, 9]))
    assert ((canary.secret >= 20) & (canary.secret < 30)).all()
    references = canary.references()
    assert references.shape == (999, 6) and canary.space_size == 1000
    assert (references[:, :3] == torch.tensor([7, 8, 9])).all()
    assert len({tuple(row.tolist()) for row in references}) == 999
    assert not (references == canary.sequence).all(1).any()
    sampled = canary.references(limit=500, generator=torch.Generator().manual_seed(1))
    assert sampled.shape[1] == 6 and 490 <= len(sampled) <= 500  # the secret itself is dropped if drawn
    assert not (sampled == canary.sequence).all(1).any()
    with pytest.raises(ValueError, match="distinct"):
        token_canary([1], slots=2, alphabet=[3, 3])


def test_log_perplexity_and_secret_exposure():
    """A "model" that predicts the secret well gives it the lowest log-perplexity of all candidates."""
    canary = token_canary([1, 2], slots=2, alphabet=range(3, 9), generator=torch.Generator().manual_seed(2))
    sequences = torch.cat([canary.sequence[None], canary.references()])
    logits = torch.zeros(len(sequences), 4, 9)
    logits[:, torch.arange(2, 4), canary.secret] = 3.0  # memorized: the secret's tokens are favoured
    nll = log_perplexity(logits, sequences, start=2)
    direct = -torch.log_softmax(logits, -1).gather(2, sequences[..., None]).squeeze(-1)[:, 2:].sum(1)
    torch.testing.assert_close(nll, direct)
    assert exposure(nll[:1], nll[1:]).item() == pytest.approx(math.log2(36))
    with pytest.raises(ValueError, match="start"):
        log_perplexity(logits, sequences, start=4)


def test_image_canaries_inserted_are_exposed():
    train, _ = load_digits()
    generator = torch.Generator().manual_seed(0)
    canaries = image_canaries(8, shape=(1, 8, 8), num_classes=10, generator=generator)
    references = image_canaries(255, shape=(1, 8, 8), num_classes=10, generator=generator)
    assert canaries.x.shape == (8, 1, 8, 8) and ((canaries.x >= 0) & (canaries.x <= 1)).all()
    data = train.x[:300], train.y[:300]
    with_canaries = insert_canaries(type(train)(*data), canaries, repeats=4)
    assert len(with_canaries.y) == 300 + 32

    def exposures(x, y, seed):
        torch.manual_seed(seed)
        model = train_classifier(
            MLP(64, 10, hidden=(128,)), x, y, epochs=40, lr=3e-3, generator=torch.Generator().manual_seed(seed)
        )
        canary_losses, reference_losses = example_losses(model, *canaries), example_losses(model, *references)
        return exposure(canary_losses, reference_losses), exposure_extrapolated(canary_losses, reference_losses)

    inserted, inserted_extrapolated = exposures(*with_canaries, seed=1)
    not_inserted, not_inserted_extrapolated = exposures(*data, seed=1)
    assert inserted.mean() > 6.0  # near the 8-bit maximum of 256 candidates
    assert not_inserted.mean() < 3.0  # about 1 bit, as for any candidate
    # The fit extends the ranks: finite, near them on average, and not one value for every canary.
    for ranked, extrapolated in [(inserted, inserted_extrapolated), (not_inserted, not_inserted_extrapolated)]:
        assert torch.isfinite(extrapolated).all()
        assert abs(extrapolated.mean() - ranked.mean()) < 1.5
    assert inserted_extrapolated.max() - inserted_extrapolated.min() > 0.5


def test_bad_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        exposure(torch.tensor([]), torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        exposure(torch.tensor([float("nan")]), torch.ones(3))
    with pytest.raises(ValueError, match="at least 3"):
        exposure_extrapolated(torch.ones(1), torch.ones(2))
    with pytest.raises(ValueError, match="repeats"):
        train, _ = load_digits()
        insert_canaries(train, image_canaries(1, shape=(1, 8, 8), num_classes=10), repeats=0)
