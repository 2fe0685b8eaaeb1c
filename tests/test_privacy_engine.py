"""PrivacyEngine: accounting against Opacus, Poisson sampling, physical batches, checkpoints, bad input,
and a real DP-Mix training run on the bundled digits."""

import inspect
import math
import os

import numpy as np
import opacus
import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.utils.batch_memory_manager import BatchMemoryManager
from scipy.stats import kstest
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privfast.augment import DPMix, SelfAug
from privfast.data import load_digits
from privfast.data_loader import SecureUniformWithReplacementSampler, secure_uniform
from privfast.grad_sample.engine import MEASURED_PLANS
from privfast.models import ConvNet
from privfast.optim import SAM
from privfast.privacy_engine import PrivacyEngine


def _dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _make(engine=None, *, batch_size=16, seed=0, device="cpu", **kwargs):
    torch.manual_seed(seed)
    model = ConvNet(width=4).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = engine or PrivacyEngine()
    args = dict(noise_multiplier=1.0, max_grad_norm=1.0) | kwargs
    loader = DataLoader(_dataset(), batch_size=batch_size)
    return (engine, *engine.make_private(module=model, optimizer=optimizer, data_loader=loader, **args))


def _train(model, optimizer, batches):
    device = next(model.parameters()).device
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        optimizer.step()


@pytest.mark.parametrize("accountant", ["rdp", "gdp", "prv"])
def test_epsilon_equals_opacus_accountant(accountant):
    engine, model, optimizer, loader = _make(PrivacyEngine(accountant=accountant), noise_multiplier=1.3)
    batches = [b for _, b in zip(range(3), loader)]
    _train(model, optimizer, batches)
    reference = create_accountant(accountant)
    reference.history = [(1.3, 16 / 64, 3)]
    assert engine.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    eps = engine.get_epsilon(1e-5)
    assert engine.membership_error_bound(1e-5) == pytest.approx((1 - 1e-5) / (1 + math.exp(eps)))


def test_poisson_sampling_and_expected_batch_size():
    _, _, optimizer, loader = _make(batch_size=16)
    assert isinstance(loader, DPDataLoader)
    assert optimizer.expected_batch_size == 16
    assert optimizer.noise_scale == pytest.approx(1 / 16)


def test_default_accountant_is_opacus_default():
    opacus_default = inspect.signature(opacus.PrivacyEngine.__init__).parameters["accountant"].default
    assert PrivacyEngine().accountant.mechanism() == opacus_default == "prv"


def test_make_private_with_epsilon_uses_opacus_noise_search():
    loader = DataLoader(_dataset(), batch_size=16)
    expected = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.25, epochs=2, accountant="prv")

    def private(optimizer_class, **kwargs):
        model = ConvNet(width=4)
        optimizer = optimizer_class(model.parameters(), lr=0.1)
        return PrivacyEngine().make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            target_epsilon=3.0,
            target_delta=1e-5,
            epochs=2,
            max_grad_norm=1.0,
            **kwargs,
        )[1]

    assert private(torch.optim.SGD).noise_multiplier == pytest.approx(expected)
    micro = private(torch.optim.SGD, microbatch_size=2, poisson_sampling=False)
    assert micro.noise_multiplier == pytest.approx(2 * expected)  # sensitivity 2C
    assert micro.accounting_noise_multiplier == pytest.approx(expected)
    dp_sam = private(lambda params, lr: SAM(params, torch.optim.SGD, lr=lr))
    assert dp_sam.noise_multiplier > expected  # two releases per step need more noise


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(noise_multiplier=-0.5), "noise_multiplier"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(augmult=3, augmentation=SelfAug(2, num_classes=10)), "augmult"),
        (dict(microbatch_size=2), "Poisson"),
    ],
)
def test_bad_arguments_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        _make(**bad)


def _opacus_style_update(engine, **kwargs):
    """One step of Opacus's tutorial loop through ``engine.make_private(**kwargs)`` (no noise, clipping
    active, float64): the parameters it leaves, and what make_private returned."""
    torch.manual_seed(0)
    model = ConvNet(width=4).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = _dataset().tensors
    loader = DataLoader(TensorDataset(x.double(), y), batch_size=16)
    returned = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=0.05,
        poisson_sampling=False,
        **kwargs,
    )
    model, optimizer, *criterion, loader = returned
    criterion = criterion[0] if criterion else nn.CrossEntropyLoss()
    x, y = next(iter(loader))
    optimizer.zero_grad()
    criterion(model(x), y).backward()
    optimizer.step()
    return [p.detach().clone() for p in model.parameters()], returned


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_code_runs_unchanged_and_steps_as_opacus(mode):
    """The arguments an Opacus user passes (its mode names, ``clipping``, ``criterion``) are taken, what
    comes back unpacks as in Opacus, and the step equals Opacus's."""
    kwargs = dict(grad_sample_mode=mode, clipping="flat", criterion=nn.CrossEntropyLoss())
    expected, opacus_returned = _opacus_style_update(opacus.PrivacyEngine(), **kwargs)
    got, returned = _opacus_style_update(PrivacyEngine(), **kwargs)
    assert len(returned) == len(opacus_returned) == (4 if mode == "ghost" else 3)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    reference, _ = _opacus_style_update(PrivacyEngine(), grad_sample_mode="auto")
    for a, b in zip(got, reference):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(clipping="per_layer"), "clipping='flat'"),
        (dict(max_grad_norm=[1.0, 1.0]), "per-layer bounds"),
        (dict(criterion=nn.CrossEntropyLoss(reduction="sum")), "loss_reduction='sum'"),
        (dict(criterion=nn.CrossEntropyLoss(), loss_reduction="sum"), "loss_reduction='mean'"),
    ],
)
def test_opacus_options_privfast_does_not_implement_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        _make(**bad)


def test_batchnorm_is_refused_with_the_fix():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))
    with pytest.raises(ValueError, match="ModuleValidator.fix"):
        PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_dataset(), batch_size=16),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_empty_poisson_batch_steps_with_noise_only():
    """As in Opacus: an empty sample still counts as a step, and the update is pure noise."""
    engine, model, optimizer, _ = _make(noise_multiplier=2.0)
    x, y = torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64)
    F.cross_entropy(model(x), y).backward()  # the mean over no rows is NaN, but no example has a gradient
    optimizer.step()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.isfinite(grads).all()
    assert float(grads.std()) == pytest.approx(2.0 * 1.0 / 16, rel=0.15)
    assert len(engine.accountant) == 1


def _batch_indices(loader):
    return [tuple(batch) for batch in loader.batch_sampler]


def test_secure_mode_draws_poisson_batches_from_the_os():
    """Secure batches ignore torch's seed (Opacus keys them from torchcsprng, privfast from
    os.urandom); the plain ones follow it. Either way each example joins with probability q."""

    def batches(secure):
        torch.manual_seed(3)
        loader = _make(PrivacyEngine(secure_mode=secure), seed=3)[3]
        return loader, [_batch_indices(loader) for _ in range(2)]

    plain, (first, second) = batches(False)
    assert first != second and [first, second] == batches(False)[1]
    secure, (first, second) = batches(True)
    assert isinstance(secure.batch_sampler, SecureUniformWithReplacementSampler)
    assert first != second and first != batches(True)[1][0]
    assert secure.batch_sampler.sample_rate == plain.batch_sampler.sample_rate == 1 / 4
    sizes = torch.tensor([len(b) for _ in range(200) for b in _batch_indices(secure)], dtype=torch.float64)
    assert len(sizes) == 200 * 4
    assert float(sizes.mean()) == pytest.approx(16, abs=4 * math.sqrt(16 * 0.75 / len(sizes)))
    assert float(sizes.var()) == pytest.approx(16 * 0.75, rel=0.2)  # binomial(64, 1/4)


def test_secure_mode_trains_through_the_batch_memory_manager_with_empty_batches():
    engine, model, optimizer, loader = _make(PrivacyEngine(secure_mode=True), batch_size=32)
    loader.batch_sampler.sample_rate = 1 / 64  # about one empty batch in three: 32 draws all miss with p < 1e-6
    sizes = []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=8, optimizer=optimizer) as physical:
        for _ in range(16):
            for x, y in physical:
                sizes.append(x.shape[0])
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
    assert 0 in sizes and max(sizes) <= 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_secure_uniform_is_uniform_on_the_unit_interval():
    u = secure_uniform(200_000)
    assert u.dtype == np.float64 and u.min() >= 0 and u.max() < 1
    assert kstest(u, "uniform").pvalue > 1e-4
    assert not np.array_equal(u[:100], secure_uniform(100))


def test_same_seed_reproduces_a_run(device):
    """On the model's device: the default noise generator lives there (a CUDA generator on CUDA),
    torch.manual_seed reproduces the run, and another seed does not."""

    def run(seed):
        engine, model, optimizer, loader = _make(seed=seed, device=device)  # seeds torch, hence the noise
        assert engine.noise_generator.device.type == device.type
        _train(model, optimizer, loader)
        return [p.detach().clone() for p in model.parameters()]

    first, second, other = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_default_noise_generator_draws_fresh_noise_every_step(device):
    """Pure-noise steps (zero images through a bias-free Linear) keyed by the default generator on the
    model's device: each step's noise is new, and N(0, (sigma C / B)^2) per weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 100, bias=False)).double().to(device)
    engine = PrivacyEngine(accountant="rdp")
    zeros = TensorDataset(torch.zeros(64, 1, 8, 8, dtype=torch.float64), torch.zeros(64, dtype=torch.int64))
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(zeros, batch_size=16),
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    assert engine.noise_generator.device.type == device.type
    updates = []
    for x, y in [next(iter(loader))] * 3:
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        _train(model, optimizer, [(x, y)])
        updates.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - before)
    for update in updates:
        assert float(update.pow(2).mean().sqrt()) == pytest.approx(2.0 / 16, rel=6 / math.sqrt(2 * 6400))
    for i in range(3):
        for j in range(i + 1, 3):
            corr = float(torch.corrcoef(torch.stack([updates[i], updates[j]]))[0, 1])
            assert abs(corr) < 6 / math.sqrt(6400)
    assert engine.accountant.history == [(2.0, 1 / 4, 3)]


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    fixed = DataLoader(_dataset(), batch_size=16)
    batches = list(fixed)

    engine, model, optimizer, _ = _make(poisson_sampling=False, seed=1)
    _train(model, optimizer, batches)
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    eps_uninterrupted = engine.get_epsilon(1e-5)

    engine, model, optimizer, _ = _make(poisson_sampling=False, seed=1)
    _train(model, optimizer, batches[:2])
    path = tmp_path / "checkpoint.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # written atomically: no temporary left behind
    eps_at_save = engine.get_epsilon(1e-5)

    resumed_engine, model, optimizer, _ = _make(poisson_sampling=False, seed=2)  # other weights, other noise seed
    plans = dict(MEASURED_PLANS)
    MEASURED_PLANS.clear()  # as in a new process: auto's timed choices come back from the checkpoint
    resumed_engine.load_checkpoint(path=path, module=model, optimizer=optimizer)
    assert MEASURED_PLANS == plans
    assert resumed_engine.get_epsilon(1e-5) == eps_at_save
    _train(model, optimizer, batches[2:])
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, model.parameters()))
    assert resumed_engine.get_epsilon(1e-5) == pytest.approx(eps_uninterrupted, rel=1e-12)


@pytest.mark.parametrize("writer", ["opacus", "privfast"])
def test_a_run_resumes_across_opacus_and_privfast_checkpoints(tmp_path, writer):
    """A run saved by one library's save_checkpoint resumes in the other's load_checkpoint: the model, the
    optimizer and the epsilon spent."""
    engines = {"opacus": opacus.PrivacyEngine, "privfast": PrivacyEngine}
    reader = "privfast" if writer == "opacus" else "opacus"

    def private(kind, seed):
        torch.manual_seed(seed)
        model = ConvNet(width=4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine = engines[kind]()
        model, optimizer, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(_dataset(), batch_size=16),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
        return engine, model, optimizer

    engine, model, optimizer = private(writer, 0)
    _train(model, optimizer, list(DataLoader(_dataset(), batch_size=16))[:3])
    path = tmp_path / "checkpoint.pt"
    engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
    resumed, resumed_model, resumed_optimizer = private(reader, 1)
    resumed.load_checkpoint(path=path, module=resumed_model, optimizer=resumed_optimizer)
    assert resumed.get_epsilon(1e-5) == engine.get_epsilon(1e-5) > 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))
    momenta = [resumed_optimizer.state[p]["momentum_buffer"] for p in resumed_model.parameters()]
    assert all(torch.equal(a, optimizer.state[p]["momentum_buffer"]) for a, p in zip(momenta, model.parameters()))


def test_a_checkpoint_without_privacy_accounting_is_refused(tmp_path):
    engine, model, optimizer, _ = _make()
    path = tmp_path / "weights.pt"
    torch.save({"module_state_dict": model.state_dict()}, path)
    with pytest.raises(ValueError, match="no privacy accounting"):
        engine.load_checkpoint(path=path, module=model, optimizer=optimizer)


def test_batch_memory_manager_splits_logical_batches():
    engine, model, optimizer, loader = _make(batch_size=32, augmentation=SelfAug(2, crop_padding=1, num_classes=10))
    logical_steps, seen = 0, []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=8, optimizer=optimizer) as physical:
        for x, y in physical:
            seen.append(x.shape[0])
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            logical_steps += optimizer.step() is not None or not optimizer._is_last_step_skipped
    assert max(seen) <= 8 * 2 and all(n % 2 == 0 for n in seen)  # examples split before augmenting
    assert logical_steps == len(loader)
    assert engine.accountant.history == [(1.0, 32 / 64, logical_steps)]  # sample rate 1 / len(data_loader)


def test_dp_mix_trains_digits_with_a_reported_epsilon():
    torch.manual_seed(0)
    train, test = load_digits()
    model = ConvNet(width=8)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
        data_loader=DataLoader(TensorDataset(train.x, train.y), batch_size=128),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        augmentation=DPMix(2, 2, crop_padding=1, num_classes=10),
    )
    for _ in range(3):
        _train(model, optimizer, loader)
    with torch.no_grad():
        accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
    assert accuracy > 0.4  # chance is 0.1
    steps = 3 * len(loader)  # Poisson batches: len(loader) steps per epoch
    assert engine.accountant.history == [(1.0, 1 / math.ceil(len(train.y) / 128), steps)]
    reference = create_accountant("prv")
    reference.history = [(1.0, 1 / math.ceil(len(train.y) / 128), steps)]
    assert engine.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
