"""Kaya & Dumitraş's seven augmentation mechanisms (ICML 2021): label mass, replacement rates, crop and cutout
geometry."""

import math

import numpy as np
import pytest
import torch

from privfast.augment.mechanisms import (
    Cutout,
    DisturbLabel,
    GaussianAugmentation,
    LabelSmoothing,
    Mixup,
    RandomCrop,
    SoftLabels,
    one_hot_targets,
    self_augment,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _batch(b=8, c=1, h=8, w=8, k=10, dtype=torch.float64):
    g = _gen(123)
    return torch.rand(b, c, h, w, generator=g, dtype=dtype), one_hot_targets(torch.arange(b) % k, k, dtype=dtype)


def test_label_smoothing_mass():
    # Kaya & Dumitraş's example: alpha = 0.3 over 3 classes gives 80% / 10% / 10%.
    x, targets = _batch(b=3, k=3)
    _, smooth = LabelSmoothing(0.3)(x, targets)
    np.testing.assert_allclose(smooth.numpy(), np.where(np.eye(3) == 1, 0.8, 0.1))
    x, targets = _batch(k=10)
    _, smooth = LabelSmoothing(0.6)(x, targets)
    torch.testing.assert_close(smooth.sum(1), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(smooth[targets.bool()], torch.tensor(0.4 + 0.06, dtype=torch.float64))


def test_soft_labels_temperature():
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    x, targets = _batch()
    logits = teacher(x).detach()
    _, t1 = SoftLabels(teacher, 1.0)(x, targets)
    torch.testing.assert_close(t1, logits.softmax(1))
    entropies = []
    for temperature in (1.0, 10.0, 1000.0):
        _, soft = SoftLabels(teacher, temperature)(x, targets)
        torch.testing.assert_close(soft.sum(1), torch.ones(8, dtype=torch.float64))
        entropies.append(float(-(soft * soft.log()).sum(1).mean()))
    assert entropies[0] < entropies[1] < entropies[2] <= math.log(10) + 1e-9
    assert entropies[2] == pytest.approx(math.log(10), abs=1e-3)  # T -> inf: uniform


def test_disturb_label_rate_and_wrong_classes():
    n, classes, theta = 20_000, 10, 0.3
    labels = torch.randint(0, classes, (n,), generator=_gen(1))
    x = torch.zeros(n, 1, 1, 1)
    _, out = DisturbLabel(theta)(x, one_hot_targets(labels, classes), generator=_gen(2))
    new = out.argmax(1)
    replaced = new != labels
    rate = replaced.double().mean().item()
    assert abs(rate - theta) < 4 * math.sqrt(theta * (1 - theta) / n)
    # A replaced label is uniform over the 9 other classes: shift (new - old) mod K is uniform on 1..9.
    shifts = torch.bincount((new - labels)[replaced] % classes, minlength=classes)
    assert shifts[0] == 0
    expected = replaced.sum().item() / (classes - 1)
    assert ((shifts[1:] - expected).abs() < 5 * math.sqrt(expected)).all()
    assert torch.equal(out.sum(1), torch.ones(n))
    assert torch.equal(DisturbLabel(0.0)(x, one_hot_targets(labels, classes))[1].argmax(1), labels)


def _position_coded(b, h, w):
    """Images whose pixel value (1 + flat position) says where it came from; 0 is never a pixel."""
    return (1 + torch.arange(h * w, dtype=torch.float64)).view(1, 1, h, w).expand(b, 1, h, w).clone()


@pytest.mark.parametrize("padding", [0, 2, 9])
def test_random_crop_geometry(padding):
    b, h, w = 4000, 6, 7
    out, _ = RandomCrop(padding)(_position_coded(b, h, w), torch.ones(b, 1, dtype=torch.float64), generator=_gen(3))
    value = out[:, 0]
    visible = value > 0
    # Read each crop's offset (dy, dx) off its first visible pixel, then the whole crop must be the
    # original translated by it, zero where the window leaves the image.
    first = visible.flatten(1).long().argmax(1)
    source = value.flatten(1).gather(1, first[:, None]).squeeze(1).long() - 1
    dy, dx = source // w - first // w, source % w - first % w
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    src_rows, src_cols = rows + dy[:, None, None], cols + dx[:, None, None]
    inside = (src_rows >= 0) & (src_rows < h) & (src_cols >= 0) & (src_cols < w)
    expected = torch.where(inside, 1 + src_rows * w + src_cols, 0).double()
    seen = visible.any(2).any(1)  # a window wholly inside the padding (P >= H) shows nothing
    assert torch.equal(value[seen], expected[seen])
    assert (value[~seen] == 0).all()
    assert dy[seen].abs().max() <= padding and dx[seen].abs().max() <= padding
    # Kept fraction: E[(H - |dy|)+ (W - |dx|)+] / (H W) with dy, dx uniform on [-P, P].
    offsets = np.arange(-padding, padding + 1)
    expected = np.clip(h - np.abs(offsets), 0, None).mean() * np.clip(w - np.abs(offsets), 0, None).mean() / (h * w)
    assert visible.double().mean().item() == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("size", [0, 3, 6, 20])
def test_cutout_geometry_and_area(size):
    b, h, w = 6000, 8, 10
    x = torch.ones(b, 2, h, w, dtype=torch.float64)
    out, _ = Cutout(size)(x, torch.ones(b, 1, dtype=torch.float64), generator=_gen(4))
    assert torch.equal(out[:, 0], out[:, 1])  # one mask for all channels
    hidden = out[:, 0] == 0
    # The hidden region is a rectangle: its area is (#hidden rows) * (#hidden cols).
    area = hidden.sum((1, 2))
    assert torch.equal(area, hidden.any(2).sum(1) * hidden.any(1).sum(1))
    assert (hidden.any(2).sum(1) <= size).all() and (hidden.any(1).sum(1) <= size).all()

    # Mean hidden fraction equals the average over centres of the clipped square's area.
    def mean_overlap(n):
        c = np.arange(n)
        return (np.minimum(c - size // 2 + size, n) - np.maximum(c - size // 2, 0)).clip(0).mean()

    expected = mean_overlap(h) * mean_overlap(w) / (h * w)
    assert hidden.double().mean().item() == pytest.approx(expected, abs=0.01)


def test_gaussian_augmentation_variance():
    x = torch.rand(200, 3, 8, 8, generator=_gen(5), dtype=torch.float64)
    out, _ = GaussianAugmentation(0.2)(x, torch.ones(200, 1, dtype=torch.float64), generator=_gen(6))
    noise = out - x
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert noise.var().item() == pytest.approx(0.2, rel=0.03)  # variance, not std: the paper's sigma^2


@pytest.mark.parametrize("gamma", [0.2, 4.0, 256.0])
def test_mixup_pairs_and_lambda(gamma):
    # Ten examples with distinct one-hot labels: each mixed target row holds the mixture weights,
    # so the mixed image must equal targets @ images.
    x, targets = _batch(b=10, c=2, h=4, w=4, k=10)
    lams = []
    for seed in range(150):
        mixed, mixed_targets = Mixup(gamma)(x, targets, generator=_gen(seed))
        torch.testing.assert_close(mixed.flatten(1), mixed_targets @ x.flatten(1))
        torch.testing.assert_close(mixed_targets.sum(1), torch.ones(10, dtype=torch.float64))
        assert ((mixed_targets > 0).sum(1) <= 2).all()
        lams.append(mixed_targets.diagonal())
    lam = torch.cat(lams)
    lam = lam[lam < 1 - 1e-12]  # drop the rows paired with themselves
    assert lam.mean().item() == pytest.approx(0.5, abs=0.03)
    assert lam.var().item() == pytest.approx(1 / (4 * (2 * gamma + 1)), rel=0.15)


def test_self_augment_layout_and_mixup_refused():
    x, targets = _batch(b=3)
    out_x, out_t = self_augment(LabelSmoothing(0.1), x, targets, 4, generator=_gen(7))
    assert out_x.shape == (12, 1, 8, 8) and out_t.shape == (12, 10)
    torch.testing.assert_close(out_x.view(3, 4, 1, 8, 8), x[:, None].expand(3, 4, 1, 8, 8))
    crops, _ = self_augment(RandomCrop(2), x, targets, 5, generator=_gen(8))
    assert not torch.equal(crops[0], crops[1])  # independent draws per row
    with pytest.raises(ValueError, match="mixes examples"):
        self_augment(Mixup(1.0), x, targets, 2)
    with pytest.raises(ValueError, match="k must be"):
        self_augment(RandomCrop(1), x, targets, 0)


def test_reproducible_with_generator():
    x, targets = _batch()
    for mechanism in (DisturbLabel(0.5), RandomCrop(3), Cutout(4), GaussianAugmentation(0.1), Mixup(0.5)):
        first = mechanism(x, targets, generator=_gen(9))
        second = mechanism(x, targets, generator=_gen(9))
        assert all(torch.equal(a, b) for a, b in zip(first, second)), mechanism


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LabelSmoothing(1.5), "alpha"),
        (lambda: DisturbLabel(-0.1), "theta"),
        (lambda: RandomCrop(-1), "padding"),
        (lambda: Cutout(-2), "size"),
        (lambda: GaussianAugmentation(-1.0), "variance"),
        (lambda: Mixup(0.0), "gamma"),
    ],
)
def test_bad_intensity(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_batch():
    with pytest.raises(ValueError, match="targets"):
        RandomCrop(1)(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="integer labels"):
        one_hot_targets(torch.zeros(2), 3)


def _fit_digits(mechanism=None):
    from privfast.attacks import train_classifier
    from privfast.data import load_digits
    from privfast.models import MLP

    train, _ = load_digits()
    torch.manual_seed(0)
    return train_classifier(
        MLP(64, 10, hidden=(64,)),
        train.x[:300],
        train.y[:300],
        epochs=12,
        lr=3e-3,
        mechanism=mechanism,
        generator=_gen(0),
    )


@pytest.fixture(scope="module")
def teacher():
    return _fit_digits()  # SL distils a teacher trained without augmentation, as Kaya & Dumitraş do


@pytest.mark.parametrize(
    "build",
    [
        lambda teacher: SoftLabels(teacher, 4.0),
        lambda _: LabelSmoothing(0.1),
        lambda _: DisturbLabel(0.1),
        lambda _: RandomCrop(1),
        lambda _: Cutout(3),
        lambda _: GaussianAugmentation(0.01),
        lambda _: Mixup(0.2),
    ],
    ids=["SL", "LS", "DL", "RC", "CO", "GA", "MU"],
)
def test_non_private_training_through_each_mechanism(build, teacher):
    from privfast.attacks import predict_logits
    from privfast.data import load_digits

    _, test = load_digits()
    model = _fit_digits(build(teacher))
    accuracy = (predict_logits(model, test.x).argmax(1) == test.y).double().mean().item()
    assert accuracy > 0.6, accuracy  # chance is 0.1; 12 short epochs on 300 images


def test_dp_self_augmentation_step():
    """A single-example mechanism feeds PrivacyEngine's augmentation multiplicity: K contiguous rows per example."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from privfast.models import ConvNet
    from privfast.privacy_engine import PrivacyEngine

    g = _gen(0)
    data = TensorDataset(torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g))
    torch.manual_seed(0)
    model = ConvNet(width=4)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        augmult=3,
    )
    x, y = next(iter(loader))
    x_aug, targets = self_augment(Cutout(3), x, one_hot_targets(y, 10), 3, generator=g)
    assert x_aug.shape[0] == 3 * len(y)
    optimizer.zero_grad()
    F.cross_entropy(model(x_aug), targets).backward()
    optimizer.step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
