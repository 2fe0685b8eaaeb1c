"""The image classifiers of a training run (build_model); the language models: shapes, causality,
incremental steps, and their private step against a naive loop."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from privfast.config import TrainConfig
from privfast.models import MODELS as IMAGE_MODELS
from privfast.models import LSTMLanguageModel, TransformerLanguageModel, build_model
from privfast.privacy_engine import PrivacyEngine

V = 13


def _lstm():
    return LSTMLanguageModel(V, embed_dim=6, hidden_size=5, num_layers=2)


def _transformer():
    return TransformerLanguageModel(V, dim=8, heads=2, layers=2, context=12)


MODELS = {"lstm": _lstm, "transformer": _transformer}


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_build_model_makes_each_image_classifier(name, one_thread):
    model = build_model(TrainConfig(model=name, width=4), in_channels=3, image_size=32, num_classes=7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_build_model_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="--model must be one of convnet, mlp, wrn16-4, resnet20; got 'vgg'"):
        build_model(SimpleNamespace(model="vgg", width=4), in_channels=1, image_size=8, num_classes=10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_and_causality(name, one_thread):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids = torch.randint(0, V, (3, 9))
    logits = model(ids)
    assert logits.shape == (3, 9, V)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % V
    other = model(changed)
    assert torch.allclose(other[:, :5], logits[:, :5], atol=1e-6)  # the past does not see the future
    assert not torch.allclose(other[:, 5:], logits[:, 5:], atol=1e-6)


def test_lstm_steps_continue_the_sequence(one_thread):
    torch.manual_seed(0)
    model = _lstm().eval()
    ids = torch.randint(0, V, (4, 7))
    whole = model(ids)
    first, state = model.step(ids[:, :3])
    rest, _ = model.step(ids[:, 3:], state)
    assert torch.allclose(torch.cat([first, rest], 1), whole, atol=1e-6)
    assert state[0].shape == (2, 4, 5)  # [layers, N, H]: rows in dimension 1


def test_transformer_refuses_inputs_longer_than_its_context():
    with pytest.raises(ValueError, match="embeds 12 positions"):
        _transformer()(torch.zeros(2, 13, dtype=torch.int64))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="divisible by heads"):
        TransformerLanguageModel(V, dim=10, heads=3)
    with pytest.raises(ValueError):
        LSTMLanguageModel(0)


@pytest.mark.parametrize("mode", ["auto", "ghost"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_private_step_equals_naive_per_sequence_loop(name, mode, one_thread):
    """sigma = 0: the engine's update is the mean of per-window clipped gradients (windows = examples)."""
    torch.manual_seed(0)
    model = MODELS[name]().double()
    reference = copy.deepcopy(model)
    windows = torch.randint(0, V, (6, 9), generator=torch.Generator().manual_seed(1))
    x, y = windows[:, :-1], windows[:, 1:]

    def loss(m, xs, ys):
        logits = m(xs)
        return F.cross_entropy(logits.reshape(-1, V), ys.reshape(-1))

    params = list(reference.parameters())
    grads = [torch.autograd.grad(loss(reference, x[i : i + 1], y[i : i + 1]), params) for i in range(len(x))]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in grads])
    clip = float(norms.median())  # some windows clipped, some not
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = [p - 0.5 * sum(f * gs[j] for f, gs in zip(factors, grads)) / len(x) for j, p in enumerate(params)]

    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    private, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
        batch_first=True,
        grad_sample_mode=mode,
    )
    for xs, ys in loader:
        optimizer.zero_grad()
        loss(private, xs, ys).backward()
        optimizer.step()
    for got, want in zip(model.parameters(), expected):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), float((got - want).abs().max())
