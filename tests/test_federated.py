"""Collaborative learning: shares, defenses, FedSGD/FedAvg against centralized steps, the server's attack."""

import copy

import pytest
import torch
import torch.nn.functional as F

from privfast.data import Split, load_digits
from privfast.federated import (
    INVERSION_NOTE,
    Defense,
    Federation,
    add_noise,
    ats_experiment,
    evaluate_defenses,
    format_report,
    invert_gradients,
    prune,
    split_participants,
)
from privfast.models import ConvNet, LeNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def _dlg_lenet(seed=0):
    """LeNet with DLG's U(-0.5, 0.5) initialization, under which inversion is well conditioned."""
    torch.manual_seed(seed)
    model = LeNet()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    return model


def test_split_gives_equal_disjoint_shares():
    shares = split_participants(103, 10, generator=torch.Generator().manual_seed(0))
    assert shares.shape == (10, 10)
    assert shares.unique().numel() == 100 and int(shares.min()) >= 0 and int(shares.max()) < 103
    with pytest.raises(ValueError, match="participants must be in"):
        split_participants(5, 6)


def test_prune_zeroes_the_smallest_entries_of_each_layer_and_row():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 10, 10, generator=g), torch.randn(3, 20, generator=g)]
    pruned = prune(grads, ratio=0.7)
    for original, kept in zip(grads, pruned):
        for row, kept_row in zip(original.flatten(1), kept.flatten(1)):
            top = row.abs().topk(round(0.3 * row.numel())).indices
            mask = torch.zeros_like(row, dtype=torch.bool)
            mask[top] = True
            torch.testing.assert_close(kept_row, torch.where(mask, row, 0))
    assert prune(grads, ratio=0.0)[0] is grads[0]
    assert float(prune(grads, ratio=1.0)[1].abs().max()) == 0
    with pytest.raises(ValueError, match="prune ratio"):
        prune(grads, ratio=1.5)


@pytest.mark.parametrize("kind", ["gaussian", "laplacian"])
def test_noise_has_the_stated_scale(kind):
    base = torch.linspace(-1, 1, 200_000, dtype=torch.float64)
    (noisy,) = add_noise([base], kind=kind, scale=0.01, generator=torch.Generator().manual_seed(0))
    noise = noisy - base
    assert float(noise.mean()) == pytest.approx(0, abs=2e-4)
    if kind == "gaussian":
        assert float(noise.std()) == pytest.approx(0.01, rel=0.01)
    else:  # Laplace(0, b): E|z| = b and Var z = 2 b^2
        assert float(noise.abs().mean()) == pytest.approx(0.01, rel=0.01)
        assert float(noise.var()) == pytest.approx(2e-4, rel=0.02)
    with pytest.raises(ValueError, match="noise kind"):
        add_noise([base], kind="uniform", scale=0.1)


def test_defense_prunes_then_adds_noise_and_validates():
    grads = [torch.randn(2, 50, generator=torch.Generator().manual_seed(1))]
    defense = Defense("both", noise="gaussian", noise_scale=1e-3, prune_ratio=0.9)
    protected = defense.protect(grads, generator=torch.Generator().manual_seed(2))
    assert float((protected[0] == 0).float().mean()) == 0  # noise fills the pruned entries
    torch.testing.assert_close(protected[0], prune(grads, ratio=0.9)[0], rtol=0, atol=6e-3)
    assert Defense().protect(grads)[0] is grads[0]
    with pytest.raises(ValueError, match="noise must be"):
        Defense(noise="poisson")
    with pytest.raises(ValueError, match="cannot parse"):
        Defense(policy="1-x")


def test_federation_refuses_batchnorm(digits):
    with pytest.raises(ValueError, match="GroupNorm"):
        Federation(ConvNet(width=8, norm="batch"), digits[0])


def test_fedsgd_round_is_a_centralized_sgd_step_on_all_shares(digits):
    train, _ = digits
    torch.manual_seed(0)
    model = ConvNet(width=8)
    reference = copy.deepcopy(model)
    fed = Federation(model, train, participants=4, batch_size=len(train.y) // 4, lr=0.05)
    fed.model.train()
    fed.round()
    # Full-batch shares of equal size: the mean of the participants' mean gradients is the mean over all.
    x, y = train.x[fed.shares.flatten()], train.y[fed.shares.flatten()]
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    F.cross_entropy(reference(x), y).backward()
    optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_fedavg_averages_the_local_models(digits):
    train, _ = digits
    torch.manual_seed(0)
    model = ConvNet(width=8)
    reference = copy.deepcopy(model)
    fed = Federation(
        model, train, participants=3, algorithm="fedavg", batch_size=len(train.y) // 3, local_steps=2, lr=0.1
    )
    fed.model.train()
    fed.round()
    locals_ = []
    for share in fed.shares:  # each participant alone: two full-batch SGD steps from the global model
        local = copy.deepcopy(reference)
        sgd = torch.optim.SGD(local.parameters(), lr=0.1)
        for _ in range(2):
            sgd.zero_grad()
            F.cross_entropy(local(train.x[share]), train.y[share]).backward()
            sgd.step()
        locals_.append(list(local.parameters()))
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(p, torch.stack([loc[i] for loc in locals_]).mean(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_collaborative_training_learns_digits(digits, algorithm):
    train, test = digits
    torch.manual_seed(0)
    fed = Federation(
        ConvNet(width=8), train, algorithm=algorithm, batch_size=16, lr=0.1 if algorithm == "fedsgd" else 0.3
    )
    before = fed.accuracy(*test)
    fed.train(40, progress=False)
    assert fed.accuracy(*test) > max(0.8, before + 0.5)


def test_server_attack_recovers_undefended_data_and_defenses_stop_it(digits):
    train, _ = digits
    psnr = {}
    for defense in [
        Defense(),
        Defense("gaussian", noise="gaussian", noise_scale=0.1),
        Defense("laplacian", noise="laplacian", noise_scale=0.1),
        Defense("prune 99%", prune_ratio=0.99),
    ]:
        fed = Federation(_dlg_lenet(), train, defense=defense)
        result = fed.attack(0, images=3, iterations=100, tv=0.0, progress=False)
        assert result.reconstructed.shape == result.transformed.shape == (3, 1, 8, 8)
        torch.testing.assert_close(result.original, train.x[fed.shares[0, :3]])
        psnr[defense.name] = result.psnr
    assert bool((psnr["none"] > 30).all()), psnr["none"]
    for name in ("gaussian", "laplacian", "prune 99%"):
        assert float(psnr[name].max()) < float(psnr["none"].min()) - 15, (name, psnr[name])


def test_attack_compares_with_the_transformed_images_and_can_recover_labels(digits):
    train, _ = digits
    fed = Federation(_dlg_lenet(), train, defense=Defense("invert", policy="0"))
    result = fed.attack(1, images=2, iterations=100, tv=0.0, known_labels=False, progress=False)
    torch.testing.assert_close(result.transformed, 1 - result.original)
    assert bool((result.psnr > 30).all())  # inversion alone hides nothing: the image is recovered inverted
    with pytest.raises(ValueError, match="participant must be in"):
        fed.attack(10)


def test_evaluate_defenses_reports_each_defense_from_the_same_start(digits):
    train, test = digits
    reports = evaluate_defenses(
        lambda: ConvNet(width=8),
        train,
        test,
        [Defense("a"), Defense("b"), Defense("noisy", noise="gaussian", noise_scale=1.0)],
        rounds=5,
        attack_images=2,
        iterations=5,
        progress=False,
        federation_kwargs=dict(participants=5, batch_size=8),
    )
    assert [r.defense for r in reports] == ["a", "b", "noisy"]
    assert reports[0] == reports[1]._replace(defense="a")  # same seed, same defense: same numbers
    assert reports[2].accuracy != reports[0].accuracy
    table = format_report(reports)
    assert "PSNR" in table and "noisy" in table and f"{reports[0].psnr:.2f}" in table


def test_ats_experiment_runs_the_whole_pipeline(digits):
    train, test = digits
    baseline = Defense("prune 70%", prune_ratio=0.7)
    found, reports = ats_experiment(
        lambda: ConvNet(width=4),
        train,
        test,
        candidates=4,
        images=2,
        semi_epochs=1,
        baselines=[baseline],
        rounds=3,
        attack_images=2,
        iterations=3,
        progress=False,
        federation_kwargs=dict(participants=5, batch_size=8),
    )
    assert len(found.table) == 4
    names = [r.defense for r in reports]
    assert names == ["none", f"hybrid {found.hybrid}", *[str(p) for p in found.selected], "prune 70%"]
    assert all(0 <= r.accuracy <= 1 for r in reports)


def test_invert_gradients_scores_against_the_shared_and_the_clean_images(digits):
    _, test = digits
    images = Split(test.x[:2], test.y[:2])
    # Policy 0 inverts the colours: the digit stays readable, so the attack rebuilds the shared
    # (inverted) image well while the comparison with the clean one would call it a defense.
    result = invert_gradients(_dlg_lenet(), images, policy="0", iterations=100, tv=0.0)
    assert set(result.cases) == {"no defense", "policy 0"} and result.shared.shape == (4, 1, 8, 8)
    torch.testing.assert_close(result.shared[2:], 1 - images.x)
    defended = result.cases["policy 0"]
    assert bool((result.psnr_vs_shared[defended] > 30).all()) and bool((result.ssim_vs_shared[defended] > 0.9).all())
    assert bool((result.psnr_vs_clean[defended] < 10).all()) and bool((result.ssim_vs_clean[defended] < 0.2).all())
    undefended = result.cases["no defense"]
    assert torch.equal(result.psnr_vs_shared[undefended], result.psnr_vs_clean[undefended])
    values = result.to_dict()
    assert values["measures_the_defense"] == "vs_shared" and len(values["policy 0"]["ssim_vs_clean"]) == 2
    text = result.format_table()
    assert "SSIM vs shared" in text and "SSIM vs clean" in text and len(text.splitlines()) == 1 + 2 * 3
    assert "measures the defense" in INVERSION_NOTE
    rows, titles = result.grid()
    assert list(rows) == ["clean", "reconstructed", "transformed", "reconstructed (policy)"]
    assert titles["reconstructed (policy)"][0].endswith(f"{result.ssim_vs_shared[2]:.2f}")
    assert list(invert_gradients(_dlg_lenet(), images, iterations=1).cases) == ["no defense"]
