"""Gradient inversion: per-example gradients, costs, metrics, iDLG, and the batched attack."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privfast import ops
from privfast.attacks import reconstruction as R
from privfast.data import load_digits
from privfast.models import ConvNet, LeNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    train, _ = load_digits()
    return train


def _lenet(seed=0, dtype=torch.float32):
    """LeNet with DLG's initialization, U(-0.5, 0.5): at torch's default scale the sigmoid net's
    gradient barely depends on the input, which makes any inversion ill-conditioned."""
    torch.manual_seed(seed)
    model = LeNet().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("graph", [False, True], ids=["engine", "vmap"])
def test_per_example_gradients_equal_one_backward_per_example(digits, dtype, graph):
    # Without a graph back to x the engine computes them, with one vmap (see the test below).
    model = ConvNet(width=8).to(dtype)
    x, y = digits.x[:5].to(dtype).requires_grad_(graph), digits.y[:5]
    grads = R.per_example_gradients(model, x, y, chunk_size=2)
    assert all((g.grad_fn is not None) == graph for g in grads)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-6)
    for n in range(5):
        expected = torch.autograd.grad(F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]), list(model.parameters()))
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g[n], e, rtol=rtol, atol=atol)


def test_per_example_gradients_use_the_engine_and_leave_the_model_as_it_was(digits, monkeypatch):
    model = ConvNet(width=8).eval()
    model.features[1].train()  # a submodule in another mode than the model: kept so
    modes = [m.training for m in model.modules()]
    x, y = digits.x[:6], digits.y[:6]
    expected = R.per_example_gradients(model, x.clone().requires_grad_(), y)  # vmap
    monkeypatch.setattr(R, "_vmapped", None)  # the engine path must not fall back to vmap
    chunks = R.per_example_gradient_chunks(model, x, y, chunk_size=4)
    first = next(chunks)
    for g, e in zip(first, expected):
        torch.testing.assert_close(g, e[:4].detach())
    chunks.close()  # a caller that stops early: the engine leaves the model all the same
    for grads in (R.per_example_gradients(model, x, y, chunk_size=4), R.per_example_gradients(model, x, y)):
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e.detach())
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(p._backward_hooks for p in model.parameters())


class _BiasUsedTwice(nn.Module):
    """A layer's parameter also used outside the layer, which the engine refuses in the backward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.fc.bias.tanh().sum()


class _SharedTable(nn.Module):
    """A layer applied to a parameter all examples share, which the engine refuses in the forward."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(64, 16)
        self.project = nn.Linear(12, 16)
        self.classes = nn.Parameter(torch.randn(10, 12))

    def forward(self, x):
        return self.embed(x.flatten(1)) @ self.project(self.classes).T


@pytest.mark.parametrize("make", [_BiasUsedTwice, _SharedTable], ids=["used-twice", "shared-table"])
def test_per_example_gradients_where_the_engine_refuses_the_model(digits, make):
    torch.manual_seed(0)
    model = make().double()
    x, y = digits.x[:5].double(), digits.y[:5]
    grads = R.per_example_gradients(model, x, y, chunk_size=2)
    for n in range(5):
        expected = torch.autograd.grad(F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]), list(model.parameters()))
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g[n], e)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_per_example_gradients_of_a_model_in_private_training(digits):
    # An attack on a model while a privacy engine wraps it: its hooks stay out of the way, and it trains on after.
    from privfast.grad_sample import GradSampleModule

    model = ConvNet(width=8)
    x, y = digits.x[:3], digits.y[:3]
    expected = R.per_example_gradients(model, x, y)
    wrapper = GradSampleModule(model, loss_reduction="sum")
    grads = R.per_example_gradients(model, x, y)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    F.cross_entropy(wrapper(x), y, reduction="sum").backward()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(wrapper.per_sample_gradients()[p], g)


def test_gradient_distances_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(3, 4, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 7, generator=g, dtype=torch.float64),
    ]
    targets = [
        torch.randn(3, 4, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 7, generator=g, dtype=torch.float64),
    ]
    flat_g = torch.cat([t.flatten(1) for t in grads], 1)
    flat_t = torch.cat([t.flatten(1) for t in targets], 1)
    torch.testing.assert_close(R.gradient_distance(grads, targets, "cosine"), 1 - ops.gradsim(grads, targets))
    torch.testing.assert_close(R.gradient_distance(grads, targets, "cosine"), 1 - F.cosine_similarity(flat_g, flat_t))
    torch.testing.assert_close(R.gradient_distance(grads, targets, "l2"), (flat_g - flat_t).pow(2).sum(1))
    torch.testing.assert_close(R.gradient_distance(grads, targets, "l1"), (flat_g - flat_t).abs().sum(1))
    with pytest.raises(ValueError, match="cost must be one of"):
        R.gradient_distance(grads, targets, "l3")


def test_total_variation_psnr_and_ssim():
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).view(1, 1, 2, 2)
    assert float(R.total_variation(x)) == pytest.approx(0.5 + 0.5)
    ref = torch.full((2, 1, 4, 4), 0.5)
    noisy = ref + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)
    torch.testing.assert_close(R.psnr(noisy, ref), torch.tensor([20.0, 40.0]))
    assert bool(torch.isinf(R.psnr(ref, ref)).all())
    img = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(R.ssim(img, img), torch.ones(3, dtype=torch.float64))
    noise = torch.randn(img.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    small, large = R.ssim(img + 0.05 * noise, img), R.ssim(img + 0.3 * noise, img)
    assert bool((small < 1).all() and (large < small).all())


def test_ssim_on_one_window_equals_the_weighted_statistics():
    g = torch.Generator().manual_seed(2)
    a, b = (torch.rand(1, 1, 7, 7, generator=g, dtype=torch.float64) for _ in range(2))
    coords = np.arange(7) - 3.0
    w = np.exp(-(coords**2) / (2 * 1.5**2))
    w = np.outer(w, w) / np.outer(w, w).sum()
    an, bn = a.numpy()[0, 0], b.numpy()[0, 0]
    ma, mb = (w * an).sum(), (w * bn).sum()
    va, vb = (w * an**2).sum() - ma**2, (w * bn**2).sum() - mb**2
    cov = (w * an * bn).sum() - ma * mb
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
    assert float(R.ssim(a, b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("make", [lambda: LeNet(), lambda: ConvNet(width=8)], ids=["lenet", "convnet"])
def test_idlg_recovers_the_labels(digits, make):
    torch.manual_seed(0)
    model = make()
    x, y = digits.x[:40], digits.y[:40]
    torch.testing.assert_close(R.recover_labels(model, R.per_example_gradients(model, x, y)), y)


def test_adam_cosine_reconstructs_undefended_digits(digits):
    model = _lenet()
    x, y = digits.x[:4], digits.y[:4]
    grads = R.per_example_gradients(model, x, y)
    # TV off: the digits' sharp strokes are not what the prior favours at 8x8.
    rec = R.reconstruct(
        model,
        grads,
        shape=(1, 8, 8),
        config="adam_cosine",
        iterations=100,
        tv=0.0,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    torch.testing.assert_close(rec.labels, y)  # recovered by iDLG
    assert bool((R.psnr(rec.images, x) > 30).all()), R.psnr(rec.images, x)
    assert bool((rec.cost < 1e-4).all())
    assert float(rec.images.min()) >= 0 and float(rec.images.max()) <= 1


def test_batched_attack_gives_each_target_its_own_run(digits):
    model = _lenet(dtype=torch.float64)
    x, y = digits.x[:3].double(), digits.y[:3]
    grads = R.per_example_gradients(model, x, y)
    start = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kwargs = dict(shape=(1, 8, 8), config="adam_l2", iterations=30, progress=False)
    batched = R.reconstruct(model, grads, y, start=start, **kwargs)
    for t in range(3):
        alone = R.reconstruct(model, [g[t : t + 1] for g in grads], y[t : t + 1], start=start[t : t + 1], **kwargs)
        torch.testing.assert_close(batched.images[t : t + 1], alone.images, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(batched.cost[t : t + 1], alone.cost, rtol=1e-9, atol=1e-12)


def test_restarts_keep_the_lowest_cost_start(digits):
    model = _lenet()
    x, y = digits.x[:2], digits.y[:2]
    grads = R.per_example_gradients(model, x, y)
    g = torch.Generator().manual_seed(3)
    start = torch.randn(6, 1, 8, 8, generator=g)
    rec = R.reconstruct(
        model, grads, y, shape=(1, 8, 8), config="adam_cosine", iterations=5, restarts=3, start=start, progress=False
    )
    single = [
        R.reconstruct(
            model,
            grads,
            y,
            shape=(1, 8, 8),
            config="adam_cosine",
            iterations=5,
            start=start[2 * r : 2 * r + 2],
            progress=False,
        )
        for r in range(3)
    ]
    costs = torch.stack([s.cost for s in single])
    torch.testing.assert_close(rec.cost, costs.min(0).values)


@pytest.mark.parametrize("preset", ["lbfgs_l2", "adam_cosine", "lbfgs_cosine", "adam_l1", "adam_l2", "sgd_cosine"])
def test_every_preset_lowers_the_matching_cost(digits, preset):
    model = _lenet()
    x, y = digits.x[:2], digits.y[:2]
    grads = R.per_example_gradients(model, x, y)
    start = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    config = R.PRESETS[preset]
    initial = R.gradient_distance(R.per_example_gradients(model, start, y), grads, config.cost)
    iterations = 1 if config.optimizer == "lbfgs" else 20
    rec = R.reconstruct(
        model,
        grads,
        y,
        shape=(1, 8, 8),
        config=preset,
        iterations=iterations,
        tv=0.0,
        boxed=False,
        start=start,
        progress=False,
    )
    assert rec.images.shape == (2, 1, 8, 8)
    assert float(rec.cost.sum()) < float(initial.sum())


def test_batchnorm_models_work_in_eval_mode_and_are_refused_in_train_mode(digits):
    from privfast.models import ResNet20

    torch.manual_seed(0)
    model = ResNet20(in_channels=1, norm="batch").eval()
    x, y = digits.x[:2], digits.y[:2]
    grads = R.per_example_gradients(model, x, y)
    expected = torch.autograd.grad(F.cross_entropy(model(x[1:]), y[1:]), list(model.parameters()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g[1], e, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="need eval mode"):
        R.per_example_gradients(model.train(), x, y)


def test_reconstruct_checks_its_input(digits):
    model = _lenet()
    grads = R.per_example_gradients(model, digits.x[:2], digits.y[:2])
    with pytest.raises(ValueError, match="unknown attack preset"):
        R.reconstruct(model, grads, shape=(1, 8, 8), config="adam_l3")
    with pytest.raises(ValueError, match="trainable ones"):
        R.reconstruct(model, grads[:-1], shape=(1, 8, 8))
    with pytest.raises(ValueError, match="labels must be"):
        R.reconstruct(model, grads, digits.y[:3], shape=(1, 8, 8))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        R.AttackConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="start must be"):
        R.reconstruct(model, grads, shape=(1, 8, 8), start=torch.zeros(3, 1, 8, 8))
