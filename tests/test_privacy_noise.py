"""Privacy of the noisy update end to end, through PrivacyEngine.make_private.

What reaches the weights and what the accountant records, under augmentation multiplicity
(Self-Aug, DP-Mix, a training loop that repeats each example's rows itself), microbatches and
DP-SAM: the noise std of every Gaussian release, the (noise multiplier, sample rate, steps) the
accountant was stepped with, and the clipping of each example's K rows as one unit.

The noise tests feed zero inputs to a bias-free Linear, so every per-example gradient is zero
and each release is pure noise, and read the noise std off its 10,000 weights: the RMS of n
draws of N(0, s^2) estimates s with a relative standard error of 1/sqrt(2n) = 0.7%. A tolerance
of 6 standard errors (4.2%) leaves a false alarm at about 1e-9, while noise K times too small
(K >= 2) or wrong by the microbatch factor 2 lands 70 standard errors or more away.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import create_accountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privfast.augment import DPMix, SelfAug
from privfast.optim import SAM, DPSAMOptimizer
from privfast.privacy_engine import PrivacyEngine

IMAGE = (1, 10, 10)
CLASSES = 100  # Linear(100, 100): 10,000 noise samples per release
EXAMPLES, BATCH = 32, 8  # 4 batches: sample rate 1/4, expected batch size 8
SIGMA, CLIP = 2.0, 0.5
DELTA = 1e-5


def assert_pure_noise(noise, std):
    """``noise`` looks like n independent draws of N(0, std^2): RMS and mean within 6 standard errors."""
    n = noise.numel()
    rms = float(noise.double().pow(2).mean().sqrt())  # the mean is known to be 0, so the RMS estimates the std
    assert abs(rms / std - 1) < 6 / math.sqrt(2 * n), f"noise std {rms:.5g}, expected {std:.5g}"
    assert abs(float(noise.double().mean())) < 6 * std / math.sqrt(n)


def assert_independent(a, b):
    """Two noise draws are uncorrelated (a repeated draw has correlation 1)."""
    corr = float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])
    assert abs(corr) < 6 / math.sqrt(a.numel()), f"correlation {corr:.4f} between draws that should be independent"


def _zero_images():
    return TensorDataset(torch.zeros(EXAMPLES, *IMAGE, dtype=torch.float64), torch.zeros(EXAMPLES, dtype=torch.int64))


def _private(device, *, sam=False, dataset=None, model=None, accountant="rdp", **kwargs):
    """``(engine, wrapped model, optimizer, loader, releases)``: SGD with lr 1 (the update is minus the
    gradient), a non-Poisson loader of BATCH examples, and ``releases`` filling with a copy of the
    flat gradient of every Gaussian release, taken where the accountant is stepped."""
    torch.manual_seed(0)
    if model is None:
        model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(IMAGE), CLASSES, bias=False))
    model = model.double().to(device)
    params = model.parameters()
    optimizer = SAM(params, torch.optim.SGD, rho=0.05, lr=1.0) if sam else torch.optim.SGD(params, lr=1.0)
    engine = PrivacyEngine(accountant=accountant)
    loader = DataLoader(dataset if dataset is not None else _zero_images(), batch_size=BATCH)
    args = dict(noise_multiplier=SIGMA, max_grad_norm=CLIP, poisson_sampling=False) | kwargs
    wrapped, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, **args)
    releases, account = [], optimizer.step_hook
    assert account is not None

    def record_then_account(opt):
        releases.append(torch.cat([p.grad.flatten() for p in opt.params]).detach().clone())
        account(opt)

    optimizer.attach_step_hook(record_then_account)
    return engine, wrapped, optimizer, loader, releases


def _step(model, optimizer, x, y, *, repeat=1):
    """One training step on ``(x, y)``, each row repeated ``repeat`` times (a loop doing its own
    augmentation multiplicity); DP-SAM gets the closure that reruns the batch."""
    device = next(model.parameters()).device
    x, y = x.repeat_interleave(repeat, 0).to(device), y.repeat_interleave(repeat, 0).to(device)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.zero_grad()
    closure()
    optimizer.step(closure) if isinstance(optimizer, DPSAMOptimizer) else optimizer.step()


def _flat_weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def _reference_epsilon(history, accountant="rdp"):
    """Epsilon of an Opacus accountant that never saw privfast, fed the expected history."""
    reference = create_accountant(accountant)
    reference.history = list(history)
    return reference.get_epsilon(DELTA)


def _assert_history(engine, noise_multiplier, sample_rate, steps):
    """The accountant was stepped ``steps`` times with exactly this noise multiplier and sample rate."""
    assert len(engine.accountant.history) == 1, engine.accountant.history
    recorded_sigma, recorded_rate, recorded_steps = engine.accountant.history[0]
    assert recorded_sigma == pytest.approx(noise_multiplier, rel=1e-12)
    assert recorded_rate == pytest.approx(sample_rate, rel=1e-12)
    assert recorded_steps == steps
    expected = _reference_epsilon([(noise_multiplier, sample_rate, steps)], engine.accountant.mechanism())
    assert engine.get_epsilon(DELTA) == pytest.approx(expected, rel=1e-9)


# (make_private arguments, rows the loop repeats each example into, microbatch size)
CASES = [
    pytest.param({}, 1, 1, id="k1"),
    pytest.param({"augmentation": SelfAug(4, crop_padding=2, num_classes=CLASSES)}, 1, 1, id="selfaug-k4"),
    pytest.param({"augmentation": DPMix(2, 2, crop_padding=2, num_classes=CLASSES)}, 1, 1, id="dpmix-2+2"),
    pytest.param({"augmult": 3}, 3, 1, id="loop-augmult-3"),
    pytest.param({"microbatch_size": 2}, 1, 2, id="microbatch-2"),
    pytest.param({"augmult": 2, "microbatch_size": 4}, 2, 4, id="augmult-2-microbatch-4"),
]


@pytest.mark.parametrize("kwargs, repeat, microbatch", CASES)
def test_update_noise_and_accounting(device, kwargs, repeat, microbatch):
    """Each step's update is N(0, (sigma C m / B)^2) per weight whatever K is (the sum is noised with
    sigma C, m examples per clipped unit, B the expected batch size), steps never share noise, and
    the accountant records sigma / sensitivity (sensitivity 2C with microbatches) at rate 1/4."""
    engine, model, optimizer, loader, releases = _private(device, **kwargs)
    assert optimizer.expected_batch_size == BATCH
    batches, updates = iter(loader), []
    for _ in range(2):
        before = _flat_weights(model)
        x, y = next(batches)
        _step(model, optimizer, x, y, repeat=repeat)
        updates.append(_flat_weights(model) - before)
    assert len(releases) == 2
    for update, release in zip(updates, releases):
        torch.testing.assert_close(update, -release, rtol=0, atol=1e-15)  # SGD, lr 1: the update is the release
        assert_pure_noise(update, SIGMA * CLIP * microbatch / BATCH)
    assert_independent(*updates)
    _assert_history(engine, SIGMA / (2 if microbatch > 1 else 1), 1 / 4, steps=2)


def test_poisson_batches_with_self_aug_get_the_full_noise(device):
    """The default Poisson loader with Self-Aug: the noise still scales with the expected batch size in
    examples (not rows)."""
    engine, model, optimizer, loader, releases = _private(
        device, poisson_sampling=True, augmentation=SelfAug(4, crop_padding=2, num_classes=CLASSES)
    )
    x, y = next(iter(loader))
    assert x.shape[0] % 4 == 0
    before = _flat_weights(model)
    _step(model, optimizer, x, y)
    assert_pure_noise(_flat_weights(model) - before, SIGMA * CLIP / BATCH)
    _assert_history(engine, SIGMA, 1 / 4, steps=1)


def test_dp_sam_noises_both_releases_and_accounts_two_per_step(device):
    engine, model, optimizer, loader, releases = _private(device, sam=True)
    batches, updates = iter(loader), []
    for _ in range(2):
        before = _flat_weights(model)
        x, y = next(batches)
        _step(model, optimizer, x, y)
        updates.append(_flat_weights(model) - before)
    assert len(releases) == 4  # ascent and descent gradients of two steps
    for release in releases:
        assert_pure_noise(release, SIGMA * CLIP / BATCH)
    for i in range(4):
        for j in range(i + 1, 4):
            assert_independent(releases[i], releases[j])
    for step, update in enumerate(updates):  # the descent step uses the second release of its SAM step
        torch.testing.assert_close(update, -releases[2 * step + 1], rtol=0, atol=1e-12)
    _assert_history(engine, SIGMA, 1 / 4, steps=4)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"microbatch_size": 2, "poisson_sampling": False}, id="microbatch-2"),
        pytest.param(
            {"augmentation": SelfAug(2, crop_padding=2, num_classes=CLASSES), "poisson_sampling": False},
            id="selfaug-k2",
        ),
        pytest.param({"sam": True, "poisson_sampling": False}, id="dp-sam"),
    ],
)
def test_make_private_with_epsilon_spends_the_target_after_the_planned_epochs(kwargs):
    """Training the planned epochs spends the target epsilon, as the accountant reports it (GDP: a
    noise search of milliseconds; the same code path as RDP and PRV)."""
    kwargs = dict(kwargs)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(IMAGE), CLASSES, bias=False)).double()
    params = model.parameters()
    optimizer = SAM(params, torch.optim.SGD, lr=1.0) if kwargs.pop("sam", False) else torch.optim.SGD(params, lr=1.0)
    engine = PrivacyEngine(accountant="gdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Opacus: "GDP accounting is experimental"
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(_zero_images(), batch_size=BATCH),
            target_epsilon=2.0,
            target_delta=DELTA,
            epochs=2,
            max_grad_norm=CLIP,
            epsilon_tolerance=0.01,
            **kwargs,
        )
        for _ in range(2):
            for x, y in loader:
                _step(model, optimizer, x, y)
        epsilon = engine.get_epsilon(DELTA)
    assert 2.0 - 0.01 <= epsilon <= 2.0 + 1e-9


@pytest.mark.parametrize("mode", ["materialize", "ghost"])
@pytest.mark.parametrize(
    "kwargs, repeat, microbatch",
    [
        pytest.param({"augmentation": SelfAug(3, crop_padding=2, num_classes=10)}, 1, 1, id="selfaug-k3"),
        pytest.param({"augmentation": DPMix(2, 1, crop_padding=2, num_classes=10)}, 1, 1, id="dpmix-2+1"),
        pytest.param({"augmult": 2, "microbatch_size": 2}, 2, 2, id="loop-augmult-2-microbatch-2"),
    ],
)
def test_each_example_is_clipped_once_over_its_k_rows(device, mode, kwargs, repeat, microbatch):
    """With sigma = 0 the update is ``m / B * sum_u min(1, C / (||g_u|| + 1e-6)) g_u`` over clipped units
    u of K * m consecutive rows, ``g_u`` their mean-loss gradient: so one example moves the update by
    at most C / B however many augmentations it has. The gradients are made about 1e-6 in norm, so
    that the 1e-6 in the clip factor matters (it changes the factors by tens of percent)."""
    gen = torch.Generator().manual_seed(1)
    # Per-example gradient norms are about 3x the image scale: from 3e-7 to 3e-5 around the bound 3e-6.
    scales = torch.logspace(-7, -5, 16, dtype=torch.float64)[torch.randperm(16, generator=gen)]
    images = torch.rand(16, *IMAGE, generator=gen, dtype=torch.float64) * scales[:, None, None, None]
    dataset = TensorDataset(images, torch.randint(0, 10, (16,), generator=gen))
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(IMAGE), 16, bias=False), nn.Tanh(), nn.Linear(16, 10, bias=False)
    ).double()
    reference = copy.deepcopy(net).to(device)
    clip = 3e-6
    engine, model, optimizer, loader, _ = _private(
        device, dataset=dataset, model=net, noise_multiplier=0.0, max_grad_norm=clip, grad_sample_mode=mode, **kwargs
    )
    x, y = next(iter(loader))  # the augmented batch the step below trains on
    x, y = x.repeat_interleave(repeat, 0).to(device), y.repeat_interleave(repeat, 0).to(device)
    rows = len(x) * microbatch // BATCH
    params = list(reference.parameters())
    expected, factors = [torch.zeros_like(p) for p in params], []
    for start in range(0, len(x), rows):
        grads = torch.autograd.grad(
            F.cross_entropy(reference(x[start : start + rows]), y[start : start + rows]), params
        )
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        factors.append(min(1.0, clip / (norm + 1e-6)))
        for total, g in zip(expected, grads):
            total.add_(factors[-1] * g)
    assert min(factors) < 0.9 and max(factors) == 1.0  # the bound binds for some units, not all
    before = [p.detach().clone() for p in model.parameters()]

    def closure_free_step():
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    closure_free_step()
    for p, b, e in zip(model.parameters(), before, expected):
        want = -e * microbatch / BATCH
        torch.testing.assert_close(p.detach() - b, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()))
