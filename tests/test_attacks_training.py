"""train_classifier's gradient hook: the optimizer steps on the transformed gradients, not the raw ones."""

import pytest
import torch

from privfast.attacks import train_classifier
from privfast.federated import prune
from privfast.models import MLP


def _setting(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=generator)
    y = torch.randint(0, 3, (64,), generator=generator)
    torch.manual_seed(seed)
    return MLP(8, 3, hidden=(16,)), x, y


def _train(model, x, y, **kwargs):
    return train_classifier(model, x, y, epochs=2, batch_size=16, generator=torch.Generator().manual_seed(1), **kwargs)


def _prune_all(grads):
    # prune() takes one row per sender: the whole model gradient is one sender's.
    return [g[0] for g in prune([g[None] for g in grads], ratio=1.0)]


def test_fully_pruned_gradients_leave_the_weights_unchanged():
    model, x, y = _setting()
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, x, y, grad_transform=_prune_all)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # Without the hook the same recipe moves every tensor, so the equality above is the hook's doing.
    plain, _, _ = _setting()
    _train(plain, x, y)
    assert all(not torch.equal(b, p) for b, p in zip(before, plain.parameters()))


def test_transform_sees_the_raw_gradients_in_parameter_order():
    model, x, y = _setting()
    seen = []

    def identity(grads):
        seen.append([tuple(g.shape) for g in grads])
        return [g.clone() for g in grads]

    _train(model, x, y, grad_transform=identity)
    plain, _, _ = _setting()
    _train(plain, x, y)
    assert len(seen) == 2 * 64 // 16
    assert seen[0] == [tuple(p.shape) for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))


def test_transform_must_keep_the_number_and_shapes():
    model, x, y = _setting()
    with pytest.raises(ValueError, match="grad_transform"):
        _train(model, x, y, grad_transform=lambda grads: grads[:-1])
    with pytest.raises(ValueError, match="grad_transform"):
        _train(model, x, y, grad_transform=lambda grads: [g.flatten() for g in grads])
