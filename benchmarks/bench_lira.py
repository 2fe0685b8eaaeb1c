"""LiRA's cost: training 16 shadow models together (vmap over stacked weights) vs one after another.

Each shadow trains on half of the digits training split (629 of 1,258 images) for 10 epochs,
batch 64, Adam: the same recipe in every row. Models: MLPs with 32 and 256 hidden units and the
GroupNorm ConvNet (width 16). Three timings per model and device:

- ``one``: a single model (:func:`train_classifier`), the unit of cost;
- ``sequential16``: 16 models one after another, the way LiRA is usually run;
- ``vectorized16``: 16 models in one :func:`train_shadow_models` call.

Target: ``vectorized16 / one < 4``. CPU runs use one thread (``PRIVFAST_BENCH_THREADS`` to change):
on a few shared cores, a thread per core spin-waits whenever another job holds a core, which made
two-thread timings swing tenfold from run to run.

    python -m pytest benchmarks/bench_lira.py --benchmark-only --benchmark-group-by=param:model,param:device

The vectorized rows depend on the allocator (see :func:`privfast.attacks.train_shadow_models`'s
note): prefix ``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000`` to measure
them without glibc returning each step's memory to the kernel.
"""

import os

import pytest
import torch

from privfast.attacks import train_classifier, train_shadow_models
from privfast.data import load_digits
from privfast.models import MLP, ConvNet

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N_SHADOWS = 16
RECIPE = {"epochs": 10, "lr": 1e-3, "batch_size": 64}
MODELS = {
    "mlp32": lambda: MLP(64, 10, hidden=(32,)),  # small enough that one model's step is overhead-bound
    "mlp": lambda: MLP(64, 10, hidden=(256,)),
    "convnet": lambda: ConvNet(in_channels=1, num_classes=10, width=16, image_size=8),
}


@pytest.fixture(scope="module", autouse=True)
def cpu_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PRIVFAST_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pool():
    train, _ = load_digits()
    return train.x, train.y


def _on(device, make_model):
    return lambda: make_model().to(device)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _train_sequential(make_model, x, y, n_models, device):
    """``n_models`` independent models, each on a random half of the pool (LiRA's usual loop)."""
    generator = torch.Generator().manual_seed(0)
    half = len(y) // 2
    for _ in range(n_models):
        keep = torch.randperm(len(y), generator=generator)[:half]
        train_classifier(make_model(), x[keep], y[keep], generator=generator, **RECIPE)
    _sync(device)


def _train_vectorized(make_model, x, y, device):
    train_shadow_models(
        make_model, x, y, n_shadows=N_SHADOWS, generator=torch.Generator().manual_seed(0), progress=False, **RECIPE
    )
    _sync(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", ["one", "sequential16", "vectorized16"])
def test_shadow_training(benchmark, pool, model, device, mode):
    x, y = (t.to(device) for t in pool)
    make_model = _on(device, MODELS[model])
    benchmark.extra_info.update(model=model, device=device, mode=mode)
    if mode == "vectorized16":
        run = lambda: _train_vectorized(make_model, x, y, device)  # noqa: E731
    else:
        run = lambda: _train_sequential(make_model, x, y, 1 if mode == "one" else N_SHADOWS, device)  # noqa: E731
    benchmark.pedantic(run, rounds=2 if mode == "sequential16" else 5, warmup_rounds=1, iterations=1)
