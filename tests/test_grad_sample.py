"""The per-example gradient engine against a naive loop over examples and against Opacus."""

import copy
import math
import warnings
import weakref

import opacus
import pytest
import torch
import torch.nn.functional as F
from opacus.layers.dp_rnn import DPLSTMCell
from torch import nn

from privfast.grad_sample import MODES, GradSampleModule
from privfast.models import ConvNet
from privfast.optim import DPOptimizer


class Reuse(nn.Module):
    """One Linear applied twice in a forward (its per-example gradient sums both uses)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class ConvReuse(nn.Module):
    """A narrow and a wide convolution, each applied twice in a forward."""

    def __init__(self):
        super().__init__()
        self.narrow = nn.Conv2d(2, 2, 3, padding=1)
        self.wide = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        x = torch.tanh(self.narrow(torch.tanh(self.narrow(x))))
        x = torch.tanh(self.wide(torch.tanh(self.wide(x.repeat(1, 4, 1, 1)))))
        return self.head(x.flatten(1))


class NormReuse(nn.Module):
    """A GroupNorm and a LayerNorm, each applied twice in a forward: their rules run once both calls'
    gradients are in, after the backward has freed the statistics their forward saved."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.group = nn.GroupNorm(2, 4)
        self.layer = nn.LayerNorm(9)
        self.head = nn.Linear(36, 3)

    def forward(self, x):
        h = self.group(torch.tanh(self.group(self.conv(x)))).flatten(2)  # [N, 4, 9]
        return self.head(self.layer(torch.tanh(self.layer(h))).flatten(1))


class ClassToken(nn.Module):
    """Parameters of the model's own around its layers, as a ViT's class token and position embedding: the
    model is itself a layer (through the vmap fallback) on an input that needs no gradient, and its output
    already carries one from the layers inside it. Tapping that output again cut the backward off from them,
    and they were updated by noise alone."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(1, 4, 4))
        self.embed = nn.Linear(6, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # [N, 3, 6]
        tokens = torch.cat([self.cls.expand(x.shape[0], 1, 4), self.embed(x)], 1) + self.pos
        return self.head(self.norm(torch.tanh(tokens))[:, 0])


class StandardizedConv(nn.Conv2d):
    """Weight standardization in ``_conv_forward`` (as in NF-ResNets): Conv2d's forward, but the gradient of
    another function of the parameter than Conv2d's, which the conv rule would compute."""

    def _conv_forward(self, x, weight, bias):
        centered = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
        return super()._conv_forward(x, centered / (centered.pow(2).mean(dim=(1, 2, 3), keepdim=True) + 1).sqrt(), bias)


class ComputedWeight(nn.Linear):
    """Linear's forward, with ``weight`` a property computed from another parameter."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        raw = self.weight.detach().clone()
        del self.weight
        self.raw = nn.Parameter(raw)

    @property
    def weight(self):
        return 2 * torch.tanh(self.raw)


def _hooked():
    """A forward hook that changes a layer's output, registered before the model is wrapped."""
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].register_forward_hook(lambda module, args, output: 2 * output + 1)
    return model


class CellLoop(nn.Module):
    """Opacus's DPLSTMCell stepped over time by the model (``[N, T, C]`` inputs), as a user replacing
    ``nn.LSTMCell`` writes it."""

    def __init__(self):
        super().__init__()
        self.cell = DPLSTMCell(3, 4, bias=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0])


class TokenModel(nn.Module):
    """Embedding (with a padding id), LayerNorm, mean pooling and a Linear head."""

    def __init__(self, padding_idx=0):
        super().__init__()
        self.embed = nn.Embedding(11, 5, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)).mean(1))


def _images(channels, size):
    return lambda n, g: torch.randn(n, channels, size, size, generator=g, dtype=torch.float64)


# name -> (model factory, input factory(rows, generator), number of classes)
MODELS = {
    "linear": (
        lambda: nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)),
        lambda n, g: torch.randn(n, 7, generator=g, dtype=torch.float64),
        3,
    ),
    "linear_seq": (
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3)),
        lambda n, g: torch.randn(n, 3, 4, generator=g, dtype=torch.float64),
        3,
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
            nn.Tanh(),
            nn.Conv1d(6, 3, 2, padding=1, padding_mode="reflect"),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        lambda n, g: torch.randn(n, 4, 9, generator=g, dtype=torch.float64),
        3,
    ),
    "conv2d": (
        lambda: nn.Sequential(
            nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1, dilation=(1, 2), groups=2),
            nn.Tanh(),
            nn.Conv2d(6, 4, 2, padding="same", padding_mode="circular", bias=False),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        _images(4, 6),
        3,
    ),
    "conv2d_zeros": (
        lambda: nn.Sequential(
            nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
            nn.Tanh(),
            nn.Conv2d(6, 4, 2, padding="same"),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        _images(4, 6),
        3,
    ),
    "conv1d_zeros": (
        lambda: nn.Sequential(
            nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
            nn.Tanh(),
            nn.Conv1d(6, 3, 2, padding=1, bias=False),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        lambda n, g: torch.randn(n, 4, 9, generator=g, dtype=torch.float64),
        3,
    ),
    # >= 16 input channels per group: materialized through the grouped weight-gradient kernel
    "conv_wide": (
        lambda: nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=(2, 1), padding=1, dilation=(1, 2)),
            nn.Tanh(),
            nn.Conv2d(32, 4, 2, padding="same", padding_mode="reflect", groups=2),
            nn.Tanh(),
            nn.Flatten(2),
            nn.Conv1d(4, 3, 3),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        _images(16, 5),
        3,
    ),
    "conv1d_wide": (
        lambda: nn.Sequential(
            nn.Conv1d(32, 6, 3, stride=2, padding=2, dilation=2, groups=2), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)
        ),
        lambda n, g: torch.randn(n, 32, 9, generator=g, dtype=torch.float64),
        3,
    ),
    "groupnorm": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(3)),
        _images(2, 5),
        3,
    ),
    # A norm layer first has no autograd node holding its statistics: its rule recomputes them.
    "groupnorm_first": (
        lambda: nn.Sequential(nn.GroupNorm(2, 4), nn.Tanh(), nn.Conv2d(4, 3, 3), nn.Flatten(), nn.LazyLinear(3)),
        _images(4, 5),
        3,
    ),
    # An untracked first layer's output is tapped for its gradient; an in-place op right after must still work.
    "conv_first_inplace": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(3)),
        _images(3, 5),
        3,
    ),
    "layernorm": (
        lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)),
        lambda n, g: torch.randn(n, 3, 4, generator=g, dtype=torch.float64),
        3,
    ),
    "embedding": (TokenModel, lambda n, g: torch.randint(0, 11, (n, 7), generator=g), 3),
    "embedding_nopad": (
        lambda: TokenModel(padding_idx=None),
        lambda n, g: torch.randint(0, 11, (n, 7), generator=g),
        3,
    ),
    # EmbeddingBag over [N, L] ids (one bag per row) through the vmap fallback.
    "embedding_bag": (
        lambda: nn.Sequential(nn.EmbeddingBag(11, 5, mode="mean"), nn.Tanh(), nn.Linear(5, 3)),
        lambda n, g: torch.randint(0, 11, (n, 7), generator=g),
        3,
    ),
    # Layers without a rule of their own, through the vmap fallback (always [N, C, ...]).
    "fallback_convs": (
        lambda: nn.Sequential(
            nn.ConvTranspose2d(2, 3, 2, stride=2),
            nn.InstanceNorm2d(3, affine=True),
            nn.Tanh(),
            nn.Unflatten(1, (1, 3)),
            nn.Conv3d(1, 2, 2),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        _images(2, 3),
        3,
    ),
    "fallback": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.PReLU(6), nn.Linear(6, 3)),
        lambda n, g: torch.randn(n, 5, generator=g, dtype=torch.float64),
        3,
    ),
    "reuse": (Reuse, lambda n, g: torch.randn(n, 6, generator=g, dtype=torch.float64), 3),
    "norm_reuse": (NormReuse, _images(2, 5), 3),
    "class_token": (ClassToken, lambda n, g: torch.randn(n, 3, 6, generator=g, dtype=torch.float64), 3),
    "conv_reuse": (ConvReuse, _images(2, 5), 3),
    # Subclasses that change what a rule's layer computes: through the vmap fallback.
    "standardized_conv": (
        lambda: nn.Sequential(StandardizedConv(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)),
        _images(2, 5),
        3,
    ),
    "computed_weight": (
        lambda: nn.Sequential(ComputedWeight(5, 6), nn.Tanh(), nn.Linear(6, 3)),
        lambda n, g: torch.randn(n, 5, generator=g, dtype=torch.float64),
        3,
    ),
    "hooked": (_hooked, lambda n, g: torch.randn(n, 5, generator=g, dtype=torch.float64), 3),
    "cell_loop": (CellLoop, lambda n, g: torch.randn(n, 4, 3, generator=g, dtype=torch.float64), 3),
    "cnn": (lambda: ConvNet(in_channels=1, num_classes=4, width=8, image_size=8, groups=4), _images(1, 8), 4),
}


@pytest.fixture(params=["kernel", "unfold"])
def conv_path(request, monkeypatch):
    """A convolution's per-example gradients from its weight-gradient kernel or from GEMMs over the
    unfolded input: privfast picks by the output positions and the input channels, and every test model
    is small enough for either, so both are checked."""
    from privfast.grad_sample import conv

    monkeypatch.setattr(conv, "UNFOLD_MAX_POSITIONS", 0 if request.param == "kernel" else 1 << 30)
    monkeypatch.setattr(conv, "UNFOLD_NARROW", request.param == "unfold")
    return request.param


def _setup(name, rows, seed=0):
    make_model, make_input, classes = MODELS[name]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = make_model().double()
    x = make_input(rows, g)
    model(x)  # materialize lazy layers
    y = torch.randint(0, classes, (rows,), generator=g)
    return model, x, y


def _naive_clipped_sum(model, x, y, k, max_grad_norm):
    """Average each example's K row gradients, clip, sum: one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_example = []
    for b in range(x.shape[0] // k):
        rows = slice(b * k, (b + 1) * k)
        per_example.append(torch.autograd.grad(F.cross_entropy(model(x[rows]), y[rows]), params))
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in per_example])
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return params, [sum(f * grads[i] for f, grads in zip(factors, per_example)) for i in range(len(params))], norms


@pytest.mark.parametrize("k", [2, 4, 16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_clipped_sum_matches_naive_loop(name, mode, k, conv_path):
    model, x, y = _setup(name, 3 * k)
    params, expected, norms = _naive_clipped_sum(model, x, y, k, 1.0)
    max_grad_norm = float(norms.median())  # some examples clipped, some not
    params, expected, _ = _naive_clipped_sum(model, x, y, k, max_grad_norm)
    wrapped = GradSampleModule(model, mode=mode, augmult=k)
    F.cross_entropy(wrapped(x), y).backward()
    got = wrapped.clipped_sum(max_grad_norm)
    assert set(got) == set(params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(got[p], e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_sample_gradients_match_naive_loop(name, conv_path):
    k = 2
    model, x, y = _setup(name, 3 * k)
    params = [p for p in model.parameters()]
    expected = [
        torch.autograd.grad(F.cross_entropy(model(x[b * k : (b + 1) * k]), y[b * k : (b + 1) * k]), params)
        for b in range(3)
    ]
    wrapped = GradSampleModule(model, augmult=k, loss_reduction="sum")
    F.cross_entropy(wrapped(x), y, reduction="sum").backward()
    got = wrapped.per_sample_gradients()
    for b in range(3):
        for p, e in zip(params, expected[b]):
            torch.testing.assert_close(got[p][b], e, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("layout", ["strided", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["materialize", "bk"])
@pytest.mark.parametrize("name", ["cnn", "conv_wide", "conv_reuse", "groupnorm_first"])
def test_clipped_sum_in_each_dtype_and_layout(name, mode, dtype, layout, conv_path):
    """The convolution and GroupNorm rules given rows with a stride, or channels-last images, in
    float32 as in float64, against the naive loop in float64 on the same values."""
    k = 4
    model, x, y = _setup(name, 6 * k)
    model, x = model.to(dtype), x.to(dtype)
    if layout == "strided":
        x, y = x[::2], y[::2]
    else:
        x, y = x[: 3 * k].contiguous(memory_format=torch.channels_last), y[: 3 * k]
    reference = copy.deepcopy(model).double()
    # The loop runs on contiguous rows: torch 2.13's CPU GroupNorm backward segfaults computing only
    # a weight gradient (the input needs none) from a channels-last input; the values are the same.
    x_reference = x.double().contiguous()
    _, _, norms = _naive_clipped_sum(reference, x_reference, y, k, 1.0)
    max_grad_norm = float(norms.median())
    _, expected, _ = _naive_clipped_sum(reference, x_reference, y, k, max_grad_norm)
    wrapped = GradSampleModule(model, mode=mode, augmult=k)
    F.cross_entropy(wrapped(x), y).backward()
    got = wrapped.clipped_sum(max_grad_norm)
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-12}
    for p, e in zip(model.parameters(), expected):
        assert got[p].dtype == dtype
        torch.testing.assert_close(got[p].double(), e, **tolerance)


# Opacus 1.6 ignores a convolution's padding_mode (reflect, circular) and an Embedding's padding_idx
# in its per-sample gradients (both checked against the naive loop), so "conv1d", "conv2d",
# "conv_wide" and "embedding" are compared with the naive loop only; so is "conv_first_inplace", since
# Opacus's full backward hooks refuse an in-place op on a hooked module's output; Opacus's EmbeddingBag
# sampler takes only 1-D ids with offsets (privfast refuses those: they pack examples into one row). For
# "class_token" Opacus's update of the model's own parameters differs from the naive loop, which privfast's matches;
# for "hooked" Opacus captures the output as the user's hook changed it, not the layer's own.
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name",
    sorted(
        set(MODELS)
        - {
            "reuse",
            "conv1d",
            "conv2d",
            "conv_wide",
            "embedding",
            "conv_first_inplace",
            "embedding_bag",
            "class_token",
            "hooked",
        }
    ),
)
def test_update_matches_opacus(name, mode, conv_path):
    """K = 1, sigma = 0: the privatized gradient equals Opacus's GradSampleModule + DPOptimizer."""
    model, x, y = _setup(name, 8)
    reference = copy.deepcopy(model)
    max_grad_norm = 0.5

    ours = GradSampleModule(model, mode=mode)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        module=ours,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=8,
    )
    F.cross_entropy(ours(x), y).backward()
    optimizer.pre_step()

    theirs = opacus.GradSampleModule(reference)
    their_optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(reference.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=8,
    )
    F.cross_entropy(theirs(x), y).backward()
    their_optimizer.pre_step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["cnn", "embedding", "embedding_bag"])
def test_autograd_skips_the_unclipped_gradient(name):
    """Not even an Embedding of integer ids (whose output is tapped) gets its dense unclipped gradient."""
    model, x, y = _setup(name, 8)
    wrapped = GradSampleModule(model, augmult=2)
    F.cross_entropy(wrapped(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # tracking restored after the forward


def test_auto_picks_the_cheaper_strategy_per_layer(monkeypatch):
    # The cost model alone (no close call timed): a wide Linear on few rows: Gram matrices (R x R) are far
    # cheaper than [B, 64, 64] gradients. A conv on many positions: the reverse.
    from privfast.grad_sample import engine

    monkeypatch.setattr(engine, "AUTO_TIMED_WITHIN", 1.0)
    monkeypatch.setattr(engine, "MIXED_PATH_COST", 0.0)  # the per-layer plans, not the step's (next test)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 14 * 14, 64), nn.Tanh(), nn.Linear(64, 64))
    wrapped = GradSampleModule(model, mode="auto", augmult=2)
    wrapped(torch.randn(8, 1, 16, 16)).sum().backward()
    plans = wrapped.layer_plans()
    assert plans["0"] == ("materialize", "materialize")
    assert plans["2"] == ("ghost", "ghost") and plans["4"] == ("ghost", "ghost")
    wrapped.clear()
    wrapped.mode = "bk"
    wrapped(torch.randn(8, 1, 16, 16)).sum().backward()
    assert all(how_sum == "ghost" for _, how_sum in wrapped.layer_plans().values())


@pytest.mark.parametrize(
    "width, mixed_path_cost, fused",
    [
        (16, None, True),  # both layers small: each built in its hook, never planned to contract
        (1024, 10e6, True),  # the wide layer planned to contract, then built: cheaper than the mixed path
        (1024, None, False),  # ... or kept contracted where building it costs more
    ],
)
def test_auto_builds_small_contracted_layers_to_keep_the_fused_clip(monkeypatch, width, mixed_path_cost, fused):
    """One contracted layer takes the whole step off the fused clip: auto plans a layer whose per-example
    gradients cost less to build than the mixed path's fixed part as materialized, builds those of larger
    layers it planned to contract when that still costs less than the mixed path, and keeps the others
    contracted."""
    from privfast.grad_sample import engine

    monkeypatch.setattr(engine, "AUTO_TIMED_WITHIN", 1.0)  # the cost model: ghost for both, on one row each
    if mixed_path_cost is not None:
        monkeypatch.setattr(engine, "MIXED_PATH_COST", mixed_path_cost)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width)).double()
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, width, dtype=torch.float64)
    params = list(model.parameters())
    per_example = [torch.autograd.grad(((model(x[b : b + 1]) - y[b : b + 1]) ** 2).sum(), params) for b in range(4)]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in per_example])
    bound = float(norms.median())
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * grads[i] for f, grads in zip(factors, per_example)) for i in range(len(params))]

    wrapped = GradSampleModule(model, mode="auto")
    calls = []
    real = engine.ops.clip_accumulate_noise
    monkeypatch.setattr(engine.ops, "clip_accumulate_noise", lambda *a, **k: calls.append(1) or real(*a, **k))
    ((wrapped(x) - y) ** 2).sum(1).mean().backward()
    alone = {layer.name: wrapped._plan(grads, layer)[0] for layer, grads, _ in wrapped._layer_grads()}
    assert alone == ({"0": "materialize", "2": "materialize"} if width == 16 else {"0": "materialize", "2": "ghost"})
    step = wrapped.layer_plans()
    assert step["2"] == (("materialize",) * 2 if fused else ("ghost",) * 2)
    got = wrapped.clipped_sum(bound)
    assert calls == ([1] if fused else [])
    for p, e in zip(params, expected):
        torch.testing.assert_close(got[p], e, rtol=1e-9, atol=1e-12)


def test_refuses_batchnorm_with_a_fix():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="ModuleValidator.fix"):
        GradSampleModule(model)


@pytest.mark.parametrize(
    "norm, message",
    [
        (nn.BatchNorm2d(4, affine=False), "statistics of the batch"),
        (nn.BatchNorm2d(4, affine=False, track_running_stats=False), "statistics of the batch"),
        (nn.InstanceNorm2d(4, track_running_stats=True), "running statistics"),
    ],
    ids=["batchnorm", "batchnorm_no_stats", "instancenorm_stats"],
)
def test_refuses_norms_that_mix_examples_even_without_parameters(norm, message):
    """Opacus's validator lets these through (nothing of theirs is trained), but a BatchNorm in training mixes the
    examples in every later layer's gradient, and running statistics release an unnoised average of them."""
    with pytest.raises(ValueError, match=f"layer '1' .*{message}.*ModuleValidator.fix"):
        GradSampleModule(nn.Sequential(nn.Conv2d(1, 4, 3), norm))


def test_refuses_tied_weights():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    with pytest.raises(ValueError, match="tied"):
        GradSampleModule(nn.Sequential(a, b))


@pytest.mark.parametrize("bad", [{"mode": "fast"}, {"augmult": 0}, {"microbatch_size": 1.5}, {"loss_reduction": "max"}])
def test_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        GradSampleModule(nn.Linear(2, 2), **bad)


def test_rows_not_a_multiple_of_k():
    model, x, y = _setup("linear", 6)
    wrapped = GradSampleModule(model, augmult=4)
    with pytest.raises(ValueError, match="multiple of augmult"):
        F.cross_entropy(wrapped(x), y).backward()
        wrapped.clipped_sum(1.0)


@pytest.mark.parametrize("mode", MODES)
def test_nan_loss_is_refused(mode):
    model, x, y = _setup("cnn", 4)
    x[1] = float("nan")
    wrapped = GradSampleModule(model, mode=mode)
    F.cross_entropy(wrapped(x), y).backward()
    with pytest.raises(ValueError, match="finite"):
        wrapped.clipped_sum(1.0)


def test_unused_batch_is_not_silently_mixed_into_the_next():
    model, x, y = _setup("linear", 4)
    wrapped = GradSampleModule(model)
    F.cross_entropy(wrapped(x), y).backward()
    with pytest.raises(RuntimeError, match="optimizer.step"):
        wrapped(x)
    wrapped.clear()
    with torch.no_grad():
        wrapped(x)  # evaluation records nothing
    F.cross_entropy(wrapped(x), y).backward()
    assert len(wrapped.clipped_sum(1.0)) == 4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"fallback_convs"}))  # torch's instance_norm fails on 0 rows
def test_empty_batch_gives_a_zero_sum(name, mode, conv_path):
    model, x, y = _setup(name, 4)
    wrapped = GradSampleModule(model, mode=mode, augmult=2)
    F.cross_entropy(wrapped(x[:0]), y[:0], reduction="sum").backward()
    sums = wrapped.clipped_sum(1.0)
    assert set(sums) == set(model.parameters())
    assert all(s.shape == p.shape and not s.any() for p, s in sums.items())


@pytest.mark.parametrize("name", ["linear_seq", "reuse", "cnn"])
def test_per_example_memory_is_reused_across_steps_of_any_batch_size(name, conv_path):
    """The per-example gradients live in memory kept from step to step: the sums stay exact as the
    (Poisson) batch size changes, and what per_sample_gradients handed out survives later steps."""
    model, x, y = _setup(name, 12)
    reference = copy.deepcopy(model)
    wrapped = GradSampleModule(model, mode="materialize", batch_first=True)
    F.cross_entropy(wrapped(x[:6]), y[:6]).backward()
    handed_out = wrapped.per_sample_gradients()
    kept = {p: g.clone() for p, g in handed_out.items()}
    in_place = wrapped.per_sample_gradients(copy=False)  # the engine's own memory, for a caller that reads it at once
    assert all(torch.equal(in_place[p], g) for p, g in handed_out.items())
    owned = [layer.workspace.owns(in_place[p]) for layer in wrapped._layers for p in layer.params]
    assert name == "cnn" or any(owned)
    wrapped.clear()
    for rows in (slice(0, 6), slice(6, 9), slice(2, 12), slice(5, 9)):
        _, expected, _ = _naive_clipped_sum(reference, x[rows], y[rows], 1, 0.1)
        F.cross_entropy(wrapped(x[rows]), y[rows]).backward()
        got = wrapped.clipped_sum(0.1)
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(got[p], e, rtol=1e-9, atol=1e-12)
    for p, g in handed_out.items():
        assert torch.equal(g, kept[p])
    if name != "cnn":  # a Linear's per-example gradients are written into its workspace, which keeps its memory
        linear = [layer for layer in wrapped._layers if isinstance(layer.module, nn.Linear)][-1]  # called once
        before = linear.workspace.nbytes()
        F.cross_entropy(wrapped(x[:3]), y[:3]).backward()
        per_example = wrapped._layer_grads()
        layer, grads, _ = next(item for item in per_example if item[0] is linear)
        assert before > 0 and linear.workspace.owns(grads.per_example()[0])
        per_example.close()
        wrapped.clear()


def test_parameters_frozen_after_wrapping_stay_frozen():
    model, x, y = _setup("linear", 4)
    wrapped = GradSampleModule(model)
    model[0].weight.requires_grad_(False)
    F.cross_entropy(wrapped(x), y).backward()
    assert not model[0].weight.requires_grad
    assert model[0].weight not in wrapped.clipped_sum(1.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["cnn", "conv_wide", "groupnorm_first", "embedding", "fallback", "reuse"])
def test_clipped_sum_on_each_device(name, mode, device):
    """The engine on the device (CUDA where present) against the naive loop on the CPU in float64."""
    k = 4
    model, x, y = _setup(name, 3 * k)
    _, _, norms = _naive_clipped_sum(model, x, y, k, 1.0)
    max_grad_norm = float(norms.median())
    params, expected, _ = _naive_clipped_sum(model, x, y, k, max_grad_norm)
    moved = copy.deepcopy(model).to(device)
    wrapped = GradSampleModule(moved, mode=mode, augmult=k)
    F.cross_entropy(wrapped(x.to(device)), y.to(device)).backward()
    got = wrapped.clipped_sum(max_grad_norm)
    for p, e in zip(moved.parameters(), expected):
        assert got[p].device.type == device.type
        # cuDNN/cuBLAS may reorder float64 sums: 1e-9 relative still separates a wrong clip factor.
        torch.testing.assert_close(got[p].cpu(), e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["materialize", "ghost"])
def test_deferred_finite_check_raises_at_the_next_forward(mode):
    """The CUDA way (no host sync in the step), forced on the CPU: the step goes through, the next
    forward raises; a finite step leaves nothing pending."""
    model, x, y = _setup("cnn", 4)
    wrapped = GradSampleModule(model, mode=mode)
    wrapped.defer_finite_check = True
    F.cross_entropy(wrapped(x), y).backward()
    wrapped.clipped_sum(1.0)
    wrapped(x)  # the finite step left no error
    wrapped.clear()
    bad = x.clone()
    bad[1] = float("nan")
    F.cross_entropy(wrapped(bad), y).backward()
    sums = wrapped.clipped_sum(1.0)  # no sync here: the update is already non-finite
    assert not all(bool(s.isfinite().all()) for s in sums.values())
    with pytest.raises(ValueError, match="previous step.s per-example gradients had non-finite"):
        wrapped(x)
    wrapped.check_finite_pending()  # raised once


def test_conv_falls_back_to_a_dense_placeholder_weight(monkeypatch):
    """Off the CPU: a backend refusing the stride-0 placeholder weight (as cuDNN might) gets a dense one,
    same result."""
    from privfast.grad_sample import conv

    monkeypatch.setattr(conv, "UNFOLD_MAX_POSITIONS", 0)  # the kernel's path, whatever the positions
    monkeypatch.setattr(conv, "UNFOLD_NARROW", False)  # ... and the channels
    model, x, y = _setup("conv_wide", 8)
    reference = GradSampleModule(copy.deepcopy(model), mode="materialize", augmult=2)
    F.cross_entropy(reference(x), y).backward()
    expected = list(reference.clipped_sum(0.5).values())

    real = torch.ops.aten.convolution_backward
    refused = []

    def strict(grad, inp, weight, *args):
        if 0 in weight.stride():
            refused.append(weight.shape)
            raise RuntimeError("dense weight required")
        return real(grad, inp, weight, *args)

    monkeypatch.setattr(conv.torch.ops.aten, "convolution_backward", strict)
    monkeypatch.setattr(conv, "_EXPANDED_WEIGHT_OK", {})
    monkeypatch.setattr(conv, "_DENSE_PLACEHOLDER_DEVICES", set())  # the stride-0 path other devices take
    wrapped = GradSampleModule(model, mode="materialize", augmult=2)
    F.cross_entropy(wrapped(x), y).backward()
    got = list(wrapped.clipped_sum(0.5).values())
    assert len(refused) == 1 and conv._EXPANDED_WEIGHT_OK == {"cpu": False}  # tried once, then dense
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_conv_weight_gradients_take_one_kept_dense_placeholder_weight(monkeypatch):
    """The weight-gradient kernel reads only its weight's shape, but the backends copy a stride-0 view into
    a dense one on every call: every run gets a dense view of one kept buffer instead. Same result."""
    from privfast.grad_sample import conv

    monkeypatch.setattr(conv, "UNFOLD_MAX_POSITIONS", 0)  # the kernel's path, whatever the positions
    monkeypatch.setattr(conv, "UNFOLD_NARROW", False)  # ... and the channels
    model, x, y = _setup("conv_wide", 8)
    _, expected, _ = _naive_clipped_sum(copy.deepcopy(model), x, y, 2, 0.5)
    real = torch.ops.aten.convolution_backward
    weights = []

    def recording(grad, inp, weight, *args):
        weights.append((weight.stride(), weight.untyped_storage().data_ptr()))
        return real(grad, inp, weight, *args)

    monkeypatch.setattr(conv.torch.ops.aten, "convolution_backward", recording)
    monkeypatch.setattr(conv, "_PLACEHOLDERS", {})
    wrapped = GradSampleModule(model, mode="materialize", augmult=2)
    steps = []
    for _ in range(2):
        weights.clear()
        F.cross_entropy(wrapped(x), y).backward()
        got = list(wrapped.clipped_sum(0.5).values())
        steps.append(list(weights))
    assert all(0 not in stride for step in steps for stride, _ in step)
    # The buffer grows to the largest placeholder in the first step; the second allocates none.
    assert len({pointer for _, pointer in steps[1]}) == 1 and steps[1][0][1] == steps[0][-1][1]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(6, 4, 3, padding=1),
        lambda: nn.Conv2d(6, 4, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 0)),
        lambda: nn.Conv2d(6, 4, 3, groups=2, padding="same", padding_mode="reflect"),
        lambda: nn.Conv2d(6, 6, 5, stride=3, groups=6, padding_mode="circular", padding=2),
        lambda: nn.Conv1d(6, 4, 4, stride=2, dilation=2, padding=3),
    ],
)
@pytest.mark.parametrize("rows", [0, 3])
def test_conv_unfold_is_torchs(make, rows):
    """The strided-view unfolding gives F.unfold's columns for every stride, dilation, padding mode and
    group count, also from a channels-last input and an empty batch."""
    from privfast.grad_sample import conv

    module = make().double()
    spatial = (11,) if isinstance(module, nn.Conv1d) else (11, 9)
    x = torch.randn(rows, 6, *spatial, dtype=torch.float64)
    inputs = [x] if x.dim() == 3 else [x, x.contiguous(memory_format=torch.channels_last)]
    for x in inputs:
        padded, kernel, dilation, stride = conv._as_2d(module, conv._padded(module, x))
        want = F.unfold(padded, kernel, dilation=dilation, stride=stride)
        want = want.reshape(rows, module.groups, want.shape[1] // module.groups, want.shape[2])
        torch.testing.assert_close(conv._unfold(module, x), want, rtol=0, atol=0)


def test_ghost_mode_takes_materialized_norms_where_gram_matrices_do_not_pay():
    """Gram matrices grow with (K*T)^2: past the memory limit, or far costlier than materializing (a
    conv over many positions), a layer's norms come from its per-example gradients; the sum stays a
    contraction. A Linear on few rows keeps its Gram-matrix norms."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 64), nn.Tanh(), nn.Linear(64, 3))
    wrapped = GradSampleModule(model, mode="ghost", augmult=4)
    wrapped(torch.randn(8, 3, 16, 16)).sum().backward()
    plans = wrapped.layer_plans()
    assert plans["0"] == ("materialize", "ghost") and plans["2"] == ("ghost", "ghost")
    wrapped.clear()
    wrapped.ghost_memory_limit = 100  # bytes: every Gram matrix here is larger (the Linears: 256)
    wrapped(torch.randn(8, 3, 16, 16)).sum().backward()
    assert set(wrapped.layer_plans().values()) == {("materialize", "ghost")}


def test_auto_times_close_calls_once_per_layer_and_shape(monkeypatch):
    """auto asks the timer (once per layer and batch-size bucket) where the cost model calls it close,
    and follows its answer; other steps reuse the decision."""
    from privfast.grad_sample import engine

    asked = []

    def fake(grads):
        asked.append(grads.batch)
        return ("ghost", "ghost")

    monkeypatch.setattr(engine, "_faster_plan", fake)
    monkeypatch.setattr(engine, "MEASURED_PLANS", {})
    monkeypatch.setattr(engine, "AUTO_TIMED_WITHIN", math.inf)  # every layer a close call
    monkeypatch.setattr(engine, "MIXED_PATH_COST", 0.0)  # the per-layer plans stand
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    wrapped = GradSampleModule(model, mode="auto")
    for rows in (8, 8, 12, 16):  # 8 and 12 share a bucket (8 to 15); 16 does not
        wrapped(torch.randn(rows, 6)).sum().backward()
        assert set(wrapped.layer_plans().values()) == {("ghost", "ghost")}
        wrapped.clear()
    assert asked == [8, 8, 16, 16]  # two layer shapes, measured at the first batch of each bucket
    torch.use_deterministic_algorithms(True)
    try:  # deterministic runs: the cost model alone, no timing
        wrapped(torch.randn(40, 6)).sum().backward()
        wrapped.layer_plans()
        assert asked == [8, 8, 16, 16]
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(
    "layer, ghost_over_materialize, plan",
    [
        ("linear", 1.8, "ghost"),  # a Linear's allowance: ghost up to 2x its timed materialized strategy
        ("linear", 2.2, "materialize"),
        ("conv", 1.4, "ghost"),  # a convolution's: up to 1.5x
        ("conv", 1.6, "materialize"),
    ],
)
def test_timed_plan_allows_ghost_its_margin(monkeypatch, layer, ghost_over_materialize, plan):
    """auto's timing (a fake clock that each strategy moves by its own cost) takes ghost within the
    layer's ghost_margin of materializing."""
    from privfast.grad_sample import engine

    clock = [0.0]
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock[0])
    module = nn.Linear(6, 5) if layer == "linear" else nn.Conv2d(2, 3, 3)
    x = torch.randn(4, 7, 6) if layer == "linear" else torch.randn(4, 2, 6, 6)
    wrapped = GradSampleModule(module, mode="bk", batch_first=True)  # bk keeps the operands for the timing
    wrapped(x).sum().backward()
    ((_, grads, _),) = list(wrapped._layer_grads())
    build, norms = grads.scaled_per_example, grads._ghost_norm_sq

    def timed_build(*args):
        clock[0] += 1.0
        return build(*args)

    def timed_norms():
        clock[0] += ghost_over_materialize
        return norms()

    monkeypatch.setattr(grads, "scaled_per_example", timed_build)
    monkeypatch.setattr(grads, "_ghost_norm_sq", timed_norms)
    assert engine._faster_plan(grads) == (plan, plan)


@pytest.mark.parametrize("wide", [True, False])
def test_timed_plan_picks_the_faster_strategy_on_clear_cases(wide):
    """A wide Linear on few rows: ghost norms (R x R Gram matrices) are far cheaper than [B, p, d]
    gradients; a narrow one over many positions: the reverse."""
    from privfast.grad_sample import engine

    layer = nn.Linear(512, 512) if wide else nn.Linear(4, 4)
    x = torch.randn(32, 1, 512) if wide else torch.randn(32, 2048, 4)
    wrapped = GradSampleModule(layer, mode="bk", batch_first=True)  # bk keeps the operands for the timing
    wrapped(x).sum().backward()
    ((layer_info, grads, _),) = list(wrapped._layer_grads())
    assert engine._faster_plan(grads) == (("ghost", "ghost") if wide else ("materialize", "materialize"))


def test_timing_the_plans_leaves_the_random_state_alone(monkeypatch):
    """auto's timing runs inside training: a random draw there would change every later draw."""
    from privfast.grad_sample import engine

    monkeypatch.setattr(engine, "MEASURED_PLANS", {})
    monkeypatch.setattr(engine, "AUTO_TIMED_WITHIN", math.inf)
    monkeypatch.setattr(engine, "MIXED_PATH_COST", 0.0)  # layers this small would be built without timing
    wrapped = GradSampleModule(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), mode="auto")
    x = torch.randn(8, 6)
    torch.manual_seed(5)
    wrapped(x).sum().backward()
    wrapped.clipped_sum(1.0)  # times both plans of both layers
    assert engine.MEASURED_PLANS
    after = torch.rand(3)
    torch.manual_seed(5)
    torch.testing.assert_close(after, torch.rand(3), rtol=0, atol=0)


def test_shared_operand_needs_the_very_same_live_sources():
    """Layers share an operand only when handed the very same live tensors; equal values, another key, a
    recycled id or a released operand each build anew, and the Gram matrix is computed once for all users."""
    from privfast.grad_sample import base

    built = []

    def build(t):
        def make():
            built.append(t)
            return t * 2

        return make

    x = torch.randn(3)
    first = base.shared_operand(("test", 1), [x], build(x))
    second = base.shared_operand(("test", 1), [x], build(x))
    assert second is first and first.users == 2 and len(built) == 1
    assert base.shared_operand(("test", 1), [x.clone()], build(x)) is not first  # equal values: not the same tensor
    assert base.shared_operand(("test", 2), [x], build(x)) is not first
    assert len(built) == 3

    # An entry whose source is another object under the same id (Python recycles ids of dead objects).
    y = torch.randn(3)
    other = torch.randn(3)
    held = base.SharedOperand(other)
    base._OPERANDS[(("test", 3), id(y))] = ([weakref.ref(other)], weakref.ref(held))
    assert base.shared_operand(("test", 3), [y], build(y)).tensor.equal(y * 2)

    # Held weakly: once its layers let go, the next request builds again.
    del first, second
    assert base.shared_operand(("test", 1), [x], build(x)).users == 1

    computed = []
    operand = base.SharedOperand(x)
    operand.users = 2
    grams = [operand.derived("gram", lambda: computed.append(1) or torch.outer(x, x)) for _ in range(3)]
    assert grams[0] is grams[1] and len(computed) == 2  # the third request (past the users) recomputes
    sums = [operand.derived("sums", lambda: computed.append(2) or x.sum()) for _ in range(2)]
    assert sums[0] is sums[1] and computed.count(2) == 1  # kept by name: the Gram matrix did not stand in


def test_recurrent_cell_linears_share_their_gradient_and_its_gram_matrix(monkeypatch):
    """A DPLSTM cell's ih and hh Linear get the same gate gradients: ghost norms join them over the time
    steps, multiply them out and sum them for the biases once per cell, and the clipped sum still matches
    the naive loop."""
    from opacus.layers import DPLSTM

    from privfast.grad_sample import base

    computed, handed = [], []
    derived = base.SharedOperand.derived

    def counting(self, what, compute):
        return derived(self, what, lambda: computed.append((what, self)) or compute())

    def recording(key, sources, make):
        operand = base.shared_operand(key, sources, make)
        if len(sources) > 1:  # a cell's time steps (held here; the head's single call would then be shared too)
            handed.append(operand)
        return operand

    monkeypatch.setattr(base.SharedOperand, "derived", counting)
    monkeypatch.setattr("privfast.grad_sample.linear.shared_operand", recording)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = DPLSTM(4, 5, num_layers=2, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0]).sum(1)

    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(6, 7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    params = [p for p in model.parameters() if p.requires_grad]
    per_example = [torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params) for i in range(6)]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in per_example])
    bound = float(norms.median())
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * grads[i] for f, grads in zip(factors, per_example)) for i in range(len(params))]

    wrapped = GradSampleModule(model, mode="ghost")
    F.cross_entropy(wrapped(x), y).backward()
    got = wrapped.clipped_sum(bound)
    for p, e in zip(params, expected):
        assert torch.allclose(got[p], e, rtol=1e-9, atol=1e-12)
    cells = list(dict.fromkeys(handed))
    assert len(handed) == 4 and len(cells) == 2  # ih and hh of each layer of the LSTM share one
    for what in ("gram", "bias sums"):  # each computed once per cell
        assert sum(op in cells for name, op in computed if name == what) == 2, what


class FunctionalTie(nn.Module):
    """A language model whose output layer reuses the embedding table through F.linear."""

    def __init__(self, tied=True):
        super().__init__()
        self.embed, self.mix = nn.Embedding(10, 4), nn.Linear(4, 4)
        self.head = None if tied else nn.Linear(4, 10, bias=False)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.embed(ids)))
        return F.linear(h, self.embed.weight) if self.head is None else self.head(h)


@pytest.mark.parametrize("use", ["tied_output", "penalty_in_loss"])
def test_a_parameter_used_outside_its_layer_is_refused(use):
    """Such a use's per-example gradients are never captured: refused by name, not left out of the update."""
    torch.manual_seed(0)
    model = FunctionalTie(tied=use == "tied_output")
    wrapped = GradSampleModule(model)
    ids = torch.randint(0, 10, (3, 5))
    loss = F.cross_entropy(wrapped(ids).reshape(-1, 10), ids.reshape(-1))
    if use == "penalty_in_loss":
        loss = loss + 1e-3 * model.mix.weight.pow(2).sum()
    layer = "embed" if use == "tied_output" else "mix"
    with pytest.raises(RuntimeError, match=f"parameter 'weight' of layer '{layer}'.*outside that layer's own forward"):
        loss.backward()
    # Untied, without the penalty: the same model trains, and no hook is left once detached.
    untied = GradSampleModule(FunctionalTie(tied=False))
    F.cross_entropy(untied(ids).reshape(-1, 10), ids.reshape(-1)).backward()
    assert set(untied.clipped_sum(1.0)) == {p for p in untied.parameters()}
    wrapped.remove_hooks()
    F.cross_entropy(model(ids).reshape(-1, 10), ids.reshape(-1)).backward()
    assert model.embed.weight.grad is not None


@pytest.mark.parametrize(
    "reparametrize",
    [
        torch.nn.utils.parametrizations.weight_norm,
        torch.nn.utils.parametrizations.spectral_norm,
        torch.nn.utils.weight_norm,  # the older, hook-based forms
        torch.nn.utils.spectral_norm,
        lambda layer: torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.5),
    ],
    ids=["weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm", "prune"],
)
def test_reparametrized_weights_are_refused_with_the_fix(reparametrize):
    """A weight computed from other parameters before the forward (weight_norm and the like) hides their
    per-example gradients from the engine: refused when wrapping, naming the layer and the way out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old forms are deprecated
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), reparametrize(nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"layer '2' .*computes weight from other parameters.*remove_parametrizations"):
        GradSampleModule(model)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_refused_by_name(reentrant):
    """torch.utils.checkpoint recomputes a layer's forward inside the backward: refused, saying so."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(checkpoint(lambda t: torch.tanh(self.inner(t)), x, use_reentrant=reentrant))

    wrapped = GradSampleModule(Checkpointed())
    x = torch.randn(3, 4, requires_grad=reentrant)  # the reentrant form needs an input that requires a gradient
    with pytest.raises(RuntimeError, match="layer 'inner' ran during a backward pass: activation checkpointing"):
        wrapped(x).sum().backward()


def test_a_module_unfrozen_after_wrapping_is_refused_not_left_to_noise():
    """A module with nothing trainable when wrapped gets no hooks: unfrozen later (gradual unfreezing), its
    update would be noise alone. Refused at the clipped sum; freezing after wrapping stays fine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    wrapped = GradSampleModule(model)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    F.cross_entropy(wrapped(x), y).backward()
    assert set(wrapped.clipped_sum(1.0)) == set(model[2].parameters())  # still frozen: nothing to refuse
    wrapped.clear()
    model[0].weight.requires_grad_(True)
    F.cross_entropy(wrapped(x), y).backward()
    with pytest.raises(ValueError, match="parameter '0.weight' requires a gradient, but its module had no trainable"):
        wrapped.clipped_sum(1.0)


class Mixed(nn.Module):
    """A layer of each rule and one through the vmap fallback (PReLU, on a Linear's bfloat16 output), for
    autocast."""

    def __init__(self):
        super().__init__()
        self.conv, self.group = nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4)
        self.linear, self.norm, self.embed = nn.Linear(36, 8), nn.LayerNorm(8), nn.Embedding(5, 8)
        self.act, self.head = nn.PReLU(8), nn.Linear(8, 3)

    def forward(self, x):
        ids = (x[:, 0, 0, :3].abs() * 3).long().clamp(max=4)
        h = self.norm(self.act(self.linear(torch.tanh(self.group(self.conv(x))).flatten(1)))) + self.embed(ids).mean(1)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("mode", MODES)
def test_autocast_clips_as_the_naive_loop_under_autocast(mode, device):
    """Under autocast (bfloat16) the layers get lower-precision inputs and output gradients than their
    float32 parameters: the rules compute in float32, the fallback runs the layer under autocast again. The
    naive loop's own gradients are bfloat16 products, hence the tolerance; a wrong clip factor or a missing
    augmentation is off by far more."""
    torch.manual_seed(0)
    model = Mixed().to(device)
    x, y = torch.randn(6, 2, 5, 5, device=device), torch.randint(0, 3, (6,), device=device)

    def forward(module, rows):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return module(rows).float()

    params = list(model.parameters())
    per_example = [
        torch.autograd.grad(F.cross_entropy(forward(model, x[b : b + 1]), y[b : b + 1]), params) for b in range(6)
    ]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in per_example])
    bound = float(norms.median())
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * grads[i] for f, grads in zip(factors, per_example)) for i in range(len(params))]
    wrapped = GradSampleModule(model, mode=mode)
    F.cross_entropy(forward(wrapped, x), y).backward()
    got = wrapped.clipped_sum(bound)
    for p, e in zip(params, expected):
        assert got[p].dtype == torch.float32
        torch.testing.assert_close(got[p], e, rtol=0, atol=0.03 * float(e.abs().max()))


def test_wrapping_again_detaches_the_earlier_wrapper():
    """The refusal above says to wrap the model again after unfreezing: the new wrapper trains (every layer
    captured, as the naive loop), the earlier one refuses to run instead of capturing nothing, and a wrapper
    is not wrapped."""
    model, x, y = _setup("linear", 4)
    _, _, norms = _naive_clipped_sum(model, x, y, 1, 1.0)
    params, expected, _ = _naive_clipped_sum(model, x, y, 1, float(norms.median()))
    model[0].requires_grad_(False)
    first = GradSampleModule(model)
    model[0].requires_grad_(True)
    second = GradSampleModule(model)
    F.cross_entropy(second(x), y).backward()
    got = second.clipped_sum(float(norms.median()))
    assert set(got) == set(params)
    for p, e in zip(params, expected):
        torch.testing.assert_close(got[p], e, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match="detached from its model"):
        first(x)
    with pytest.raises(ValueError, match="a GradSampleModule already"):
        GradSampleModule(second)


def test_disabled_hooks_give_the_plain_gradient_and_enabled_ones_capture_again():
    """Opacus's disable_hooks / enable_hooks / to_standard_module: a step with the hooks off is a plain
    backward (no refusal of the now tracked parameters), and one with them on again is clipped as before."""
    model, x, y = _setup("reuse", 4)
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    _, _, norms = _naive_clipped_sum(model, x, y, 1, 1.0)
    params, clipped, _ = _naive_clipped_sum(model, x, y, 1, float(norms.median()))
    wrapped = GradSampleModule(model)
    wrapped.disable_hooks()
    F.cross_entropy(wrapped(x), y).backward()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
        p.grad = None
    wrapped.enable_hooks()
    F.cross_entropy(wrapped(x), y).backward()
    assert all(p.grad is None for p in model.parameters())
    got = wrapped.clipped_sum(float(norms.median()))
    for p, e in zip(params, clipped):
        torch.testing.assert_close(got[p], e, rtol=1e-9, atol=1e-12)
    assert wrapped.to_standard_module() is model
    with pytest.raises(RuntimeError, match="detached"):
        wrapped(x)


def test_a_fallback_layer_drawing_random_numbers_is_refused_by_cause():
    """A layer without a rule reruns per example under vmap: a Dropout inside it would draw other masks than the
    forward did, so vmap's refusal comes with its cause and the fix."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(5))
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x) * self.gamma

    wrapped = GradSampleModule(nn.Sequential(nn.Linear(5, 5), Scaled(), nn.Linear(5, 3)))
    with pytest.raises(ValueError, match="(?s)layer '1' .*draws random numbers in its forward"):
        F.cross_entropy(wrapped(torch.randn(4, 5)), torch.randint(0, 3, (4,))).backward()
        wrapped.clipped_sum(1.0)


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_torch_rnn_cells_are_refused_with_the_fix(cell):
    model = nn.Sequential(cell(3, 4))
    with pytest.raises(ValueError, match=f"opacus.layers.dp_rnn.DP{cell.__name__}"):
        GradSampleModule(model)


def test_a_layer_returning_its_input_leaves_the_callers_tensor_alone():
    """A first layer without a rule that returns its (untracked) input among its outputs: the tap that puts
    its outputs into the graph must not give the caller's tensor a history, which made the next step on the
    same batch fail."""

    class PassThrough(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))

        def forward(self, x):
            return x, x * self.scale

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.head = PassThrough(), nn.Linear(5, 3).double()

        def forward(self, x):
            raw, scaled = self.first(x)
            return self.head(torch.tanh(scaled) + raw)

    torch.manual_seed(0)
    model = Model()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    _, _, norms = _naive_clipped_sum(model, x, y, 1, 1.0)
    params, expected, _ = _naive_clipped_sum(model, x, y, 1, float(norms.median()))
    wrapped = GradSampleModule(model)
    for _ in range(2):  # full-batch training: the same tensor every step (the parameters do not change here)
        F.cross_entropy(wrapped(x), y).backward()
        assert x.grad_fn is None and not x.requires_grad
        got = wrapped.clipped_sum(float(norms.median()))
        for p, e in zip(params, expected):
            torch.testing.assert_close(got[p], e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shared", ["buffer", "parameter"])
def test_a_layer_on_a_table_all_examples_share_is_refused(shared):
    """A Linear over a table of class embeddings ``[P, D]`` (a CLIP-style head): its rows are no examples, and
    when P equals the batch's N the row count alone cannot tell."""

    class Prototypes(nn.Module):
        def __init__(self):
            super().__init__()
            table = torch.randn(6, 5)
            if shared == "buffer":
                self.register_buffer("table", table)
            else:
                self.table = nn.Parameter(table, requires_grad=False)
            self.project, self.embed = nn.Linear(5, 4), nn.Linear(7, 4)

        def forward(self, x):
            return torch.tanh(self.embed(x)) @ self.project(self.table).T

    wrapped = GradSampleModule(Prototypes())
    with pytest.raises(ValueError, match="layer 'project' .* was applied to a parameter or buffer"):
        F.cross_entropy(wrapped(torch.randn(6, 7)), torch.randint(0, 6, (6,))).backward()


def test_a_rule_given_a_tensor_that_is_no_parameter_of_its_layer_is_refused():
    """A weight assigned to the layer as a tensor computed from a parameter: the rule would clip the gradient of
    that tensor, which no optimizer steps."""
    model = nn.Sequential(nn.Linear(5, 3))
    weight = model[0].weight
    del model[0].weight
    model[0].weight = weight * 1.0
    wrapped = GradSampleModule(model)
    with pytest.raises(ValueError, match="layer '0' .* not one of its own parameters"):
        F.cross_entropy(wrapped(torch.randn(4, 5)), torch.randint(0, 3, (4,))).backward()  # the rule runs in its hook
        wrapped.clipped_sum(1.0)


@pytest.mark.parametrize("mode", ["materialize", "ghost"])
def test_a_second_backward_through_one_forward_is_refused(mode):
    """Each example's gradient comes from one backward per forward: a second one (two losses, retain_graph)
    would leave part of it out of the clipped sum, so it is refused by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    wrapped = GradSampleModule(model, mode=mode)
    out = wrapped(torch.randn(5, 4))
    out.pow(2).mean().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second backward pass reached layer '2' for the same forward"):
        out.sum().backward()


@pytest.mark.parametrize("mode", ["materialize", "ghost"])
def test_a_backward_through_two_forwards_is_refused(mode):
    """Two forwards, then one backward of both losses (e.g. two views of each example): each forward starts a
    new batch, so the first one's share of every example's gradient is gone; refused, saying how to do it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    wrapped = GradSampleModule(model, mode=mode)
    x = torch.randn(5, 4)
    loss = wrapped(x).pow(2).mean() + wrapped(x.flip(1)).pow(2).mean()
    with pytest.raises(RuntimeError, match="earlier forward pass of the wrapped model.*augmult=K"):
        loss.backward()


@pytest.mark.parametrize("mode", ["materialize", "auto"])
def test_per_example_memory_does_not_grow_with_k(mode):
    """The per-example gradients kept from one step to the next are [B, *shape] whatever K: an example's K
    rows fold into one gradient, never [B*K, *shape]."""
    kept = {}
    for k in (1, 4, 16):
        torch.manual_seed(0)
        model = ConvNet(in_channels=3, num_classes=10, width=8, image_size=16, groups=4)
        wrapped = GradSampleModule(model, mode=mode, augmult=k)
        x, y = torch.randn(4 * k, 3, 16, 16), torch.randint(0, 10, (4 * k,))
        F.cross_entropy(wrapped(x), y).backward()
        wrapped.clipped_sum(1.0)
        kept[k] = sum(layer.workspace.nbytes() for layer in wrapped._layers)
    built = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    per_example = 4 * sum(p.numel() for m in built for p in m.parameters()) * 4  # B = 4 float32 gradients
    assert kept[1] == kept[4] == kept[16]
    assert per_example <= kept[1] <= per_example * 9 / 8 + 4 * len(built)  # Workspace keeps 1/8 of room to grow
