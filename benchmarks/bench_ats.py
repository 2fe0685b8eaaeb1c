"""ATS's two costs, batched vs one at a time.

- ``privacy_score``: S_pri of 100 digits x 21 interpolation points on a GroupNorm ConvNet (width
  16) and on DLG's LeNet. ``loop`` is the reference code's way: one image, one point, one
  ``torch.autograd.grad`` and one per-tensor cosine loop at a time. ``batched`` is
  :func:`privfast.search.privacy_score` (the 2,100 points and the 100 references in chunks of 512 through
  privfast's per-example engine, compared by ``ops.gradsim``). Target: loop / batched >= 20, on 2 threads
  (the issue's setting; the loop, at a batch of one, is no faster on 2 threads than on 1).
- ``reconstruction``: Adam+Cosine inversion of 32 digits' gradients on LeNet, 50 iterations:
  ``sequential`` runs :func:`privfast.attacks.reconstruction.reconstruct` once per image,
  ``batched`` once for all 32.

    OMP_NUM_THREADS=2 python -m pytest benchmarks/bench_ats.py --benchmark-only --benchmark-group-by=group
"""

import pytest
import torch
import torch.nn.functional as F

from privfast.attacks.reconstruction import per_example_gradients, reconstruct
from privfast.data import load_digits
from privfast.models import ConvNet, LeNet
from privfast.search import privacy_score

IMAGES, BINS = 100, 20
TARGETS, ITERATIONS = 32, 50
MODELS = {"convnet": lambda: ConvNet(width=16), "lenet": LeNet}


@pytest.fixture(scope="module")
def digits():
    train, _ = load_digits()
    return train


def _model(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def loop_privacy_score(model, x, y, start, bins=BINS):
    """S_pri the way the reference code computes it (model in eval mode)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(image, label):
        loss = F.cross_entropy(model(image[None]), label[None])
        return [g.flatten() for g in torch.autograd.grad(loss, params)]

    scores = []
    for n in range(x.shape[0]):
        reference = gradient(x[n], y[n])
        curve = []
        for i in range(bins + 1):
            g = gradient(i / bins * x[n] + (1 - i / bins) * start[n], y[n])
            curve.append(sum(F.cosine_similarity(a, b, dim=0) for a, b in zip(g, reference)) / len(g))
        scores.append(torch.trapezoid(torch.stack(curve), dx=1 / bins))
    return torch.stack(scores)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.benchmark(group="privacy_score")
def test_privacy_score_loop(benchmark, digits, model_name):
    model, x, y = _model(model_name), digits.x[:IMAGES], digits.y[:IMAGES]
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    expected = privacy_score(model, x, y, start=start, bins=BINS, chunk_size=IMAGES * BINS)
    result = benchmark.pedantic(loop_privacy_score, args=(model, x, y, start), rounds=3, warmup_rounds=1)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.benchmark(group="privacy_score")
def test_privacy_score_batched(benchmark, digits, model_name):
    model, x, y = _model(model_name), digits.x[:IMAGES], digits.y[:IMAGES]
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    result = benchmark.pedantic(
        privacy_score, args=(model, x, y), kwargs=dict(start=start, bins=BINS), rounds=5, warmup_rounds=1
    )
    assert result.shape == (IMAGES,)


def _targets(digits):
    model = _model("lenet")
    x, y = digits.x[:TARGETS], digits.y[:TARGETS]
    start = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return model, per_example_gradients(model, x, y), y, start


def _attack(model, grads, y, start):
    return reconstruct(
        model, grads, y, shape=(1, 8, 8), config="adam_cosine", iterations=ITERATIONS, start=start, progress=False
    )


@pytest.mark.benchmark(group="reconstruction")
def test_reconstruction_sequential(benchmark, digits):
    model, grads, y, start = _targets(digits)

    def sequential():
        return torch.cat(
            [
                _attack(model, [g[t : t + 1] for g in grads], y[t : t + 1], start[t : t + 1]).images
                for t in range(TARGETS)
            ]
        )

    images = benchmark.pedantic(sequential, rounds=3, warmup_rounds=1)
    torch.testing.assert_close(images, _attack(model, grads, y, start).images, rtol=1e-4, atol=1e-4)


@pytest.mark.benchmark(group="reconstruction")
def test_reconstruction_batched(benchmark, digits):
    model, grads, y, start = _targets(digits)
    result = benchmark.pedantic(_attack, args=(model, grads, y, start), rounds=3, warmup_rounds=1)
    assert result.images.shape == (TARGETS, 1, 8, 8)
