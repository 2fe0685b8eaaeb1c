"""DPOptimizer (noise, physical batches, microbatches, any torch optimizer), SAM and DP-SAM."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from privfast.grad_sample import GradSampleModule
from privfast.optim import SAM, DPOptimizer, DPSAMOptimizer


def _data(rows, seed=0, features=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, features, generator=g, dtype=torch.float64),
        torch.randint(0, classes, (rows,), generator=g),
    )


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _private(
    model,
    *,
    optimizer=None,
    sigma=0.0,
    clip=1.0,
    batch=8,
    seed=0,
    microbatch_size=1,
    augmult=1,
    mode="auto",
    device="cpu",
):
    """The model on ``device`` made private, its noise keyed by a generator on that device (a CUDA
    generator hands out Philox offsets, a CPU one draws keys from its stream: two code paths)."""
    model.to(device)
    wrapped = GradSampleModule(model, mode=mode, microbatch_size=microbatch_size, augmult=augmult)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.1)
    cls = DPSAMOptimizer if isinstance(optimizer, SAM) else DPOptimizer
    return wrapped, cls(
        optimizer,
        module=wrapped,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch,
        generator=torch.Generator(device=device).manual_seed(seed),
    )


def _clipped_mean(model, x, y, *, group, clip, denominator):
    """Naive: the mean gradient of each group of rows, clipped, summed, divided."""
    params = list(model.parameters())
    grads = [
        torch.autograd.grad(F.cross_entropy(model(x[i : i + group]), y[i : i + group]), params)
        for i in range(0, len(x), group)
    ]
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in gs)) for gs in grads]
    return [
        sum(min(1, clip / (n + 1e-6)) * gs[i] for n, gs in zip(norms, grads)) / denominator for i in range(len(params))
    ]


def test_noise_std_is_sigma_c_over_expected_batch_size(device):
    model = nn.Linear(400, 100, bias=False).double()
    _, optimizer = _private(model, sigma=2.0, clip=0.5, batch=8, device=device)
    wrapped = optimizer.module
    wrapped(
        torch.zeros(8, 400, dtype=torch.float64, device=device)
    ).sum().backward()  # zero gradient: p.grad is the noise
    optimizer.pre_step()
    noise = model.weight.grad
    assert noise.device.type == torch.device(device).type
    assert abs(float(noise.std()) / (2.0 * 0.5 / 8) - 1) < 0.03
    assert noise.grad_fn is None
    assert abs(float(noise.mean())) < 4 * (2.0 * 0.5 / 8) / math.sqrt(noise.numel())


def test_seed_reproduces_and_steps_never_reuse_noise(device):
    x, y = (t.to(device) for t in _data(8))

    def run(seed, steps=2):
        model = _model()
        wrapped, optimizer = _private(model, sigma=1.0, seed=seed, device=device)
        grads = []
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(wrapped(x), y).backward()
            optimizer.pre_step()
            grads.append(model[0].weight.grad.clone())
        return grads

    first, again, other = run(0), run(0), run(1)
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)
    torch.testing.assert_close(first[1], again[1], rtol=0, atol=0)
    assert not torch.allclose(first[0], other[0])
    noise_0, noise_1 = first[0] - run(0, steps=1)[0], first[1] - first[0]
    assert not torch.allclose(noise_1, torch.zeros_like(noise_1))  # the second step draws fresh noise
    assert torch.equal(noise_0, torch.zeros_like(noise_0))


def test_physical_batches_add_noise_once():
    """Three physical batches of 4 give the same noisy update as one batch of 12 (same generator)."""
    x, y = _data(12)
    model = _model()
    wrapped, optimizer = _private(model, sigma=1.0, batch=12)
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.pre_step()
    expected = [p.grad.clone() for p in model.parameters()]

    model = _model()
    wrapped, optimizer = _private(model, sigma=1.0, batch=12)
    for i, rows in enumerate((slice(0, 4), slice(4, 8), slice(8, 12))):
        optimizer.signal_skip_step(i < 2)
        # A mean loss over 4 rows: the engine rescales each physical batch's gradients itself.
        F.cross_entropy(wrapped(x[rows]), y[rows]).backward()
        stepped = optimizer.pre_step()
        assert stepped == (i == 2)
        if not stepped:
            optimizer.zero_grad()  # keeps the accumulated sum after a skipped step
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


@pytest.mark.parametrize("augmult", [1, 2])
def test_microbatch_clips_the_mean_of_b_examples(augmult):
    x, y = _data(12 * augmult)
    model = _model()
    expected = _clipped_mean(model, x, y, group=3 * augmult, clip=0.3, denominator=12 / 3)
    wrapped, optimizer = _private(model, clip=0.3, batch=12, microbatch_size=3, augmult=augmult)
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.pre_step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
    assert optimizer.sensitivity == 2
    optimizer.noise_multiplier = 1.5
    assert optimizer.accounting_noise_multiplier == 0.75


@pytest.mark.parametrize(
    "make",
    [lambda ps: torch.optim.Adam(ps, lr=0.01), lambda ps: torch.optim.RMSprop(ps, lr=0.01)],
    ids=["adam", "rmsprop"],
)
def test_wraps_any_torch_optimizer(make):
    x, y = _data(8)
    model, reference = _model(), _model()
    expected = _clipped_mean(reference, x, y, group=1, clip=0.5, denominator=8)
    reference_optimizer = make(reference.parameters())
    for p, g in zip(reference.parameters(), expected):
        p.grad = g
    reference_optimizer.step()

    wrapped, optimizer = _private(model, optimizer=make(model.parameters()), clip=0.5)
    F.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_sam_step_matches_its_definition():
    x, y = _data(8)
    model, reference = _model(), _model()
    rho, lr = 0.05, 0.1
    params = list(reference.parameters())
    g = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
    norm = torch.sqrt(sum(t.pow(2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(rho * t / norm)
    g_sharp = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
    with torch.no_grad():
        for p, t, s in zip(params, g, g_sharp):
            p.sub_(rho * t / norm).sub_(lr * s)

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    closure()
    optimizer.step(closure)
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p, q)


def test_dp_sam_without_clipping_or_noise_is_sam_and_releases_twice():
    x, y = _data(8)
    model, reference = _model(), _model()

    def closure_for(net, forward):
        def closure():
            loss = F.cross_entropy(forward(x), y)
            loss.backward()
            return loss

        return closure

    sam = SAM(reference.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    closure_for(reference, reference)()
    sam.step(closure_for(reference, reference))

    wrapped, optimizer = _private(
        model, optimizer=SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1), clip=1e6, batch=8
    )
    releases = []
    optimizer.attach_step_hook(lambda opt: releases.append(opt.noise_multiplier))
    closure = closure_for(model, wrapped)
    closure()
    optimizer.step(closure)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert len(releases) == DPSAMOptimizer.releases_per_step == 2
    with pytest.raises(ValueError, match="closure"):
        optimizer.step()


@pytest.mark.parametrize(
    "bad",
    [
        dict(noise_multiplier=-1.0),
        dict(noise_multiplier=math.inf),
        dict(max_grad_norm=0.0),
        dict(max_grad_norm=-1.0),
        dict(expected_batch_size=None),
        dict(loss_reduction="max"),
    ],
)
def test_rejects_bad_arguments(bad):
    model = _model()
    args = dict(module=GradSampleModule(model), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8) | bad
    with pytest.raises(ValueError):
        DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), **args)


def test_rejects_parameters_outside_the_module():
    model, other = _model(), _model(1)
    with pytest.raises(ValueError, match="not the module's"):
        DPOptimizer(
            torch.optim.SGD(other.parameters(), lr=0.1),
            module=GradSampleModule(model),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=8,
        )


def test_warns_about_trainable_parameters_the_optimizer_leaves_out():
    """Their per-example gradients count in every example's norm (clipping harder than the stepped parameters
    need): the user is told how to leave them out, and nothing is said when the optimizer takes them all."""
    model = _model()
    wrapped = GradSampleModule(model)
    head = list(model.parameters())[-2:]

    def head_only():
        sgd = torch.optim.SGD(head, lr=0.1)
        return DPOptimizer(sgd, module=wrapped, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)

    with pytest.warns(UserWarning, match=r"leaves out 2 trainable parameter\(s\).*requires_grad_\(False\)"):
        head_only()
    for p in list(model.parameters())[:-2]:
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head_only()


def test_nan_loss_never_steps():
    x, y = _data(8)
    x[3] = float("nan")
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    wrapped, optimizer = _private(model, sigma=1.0)
    F.cross_entropy(wrapped(x), y).backward()
    with pytest.raises(ValueError, match="finite"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
