"""Sequence models through the per-example engine: both batch layouts, recurrent and attention layers.

Every configuration is compared with a naive loop over examples (float64, sigma = 0, clipping
active for some examples) and, at K = 1 where Opacus supports the layers, with Opacus.
"""

import copy
import random

import opacus
import pytest
import torch
import torch.nn.functional as F
from opacus.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from privfast.grad_sample import MODES, GradSampleModule
from privfast.grad_sample.layout import LayoutError
from privfast.optim import DPOptimizer

D, H, C, T = 4, 6, 3, 5  # features, hidden width, classes, time steps


class TokenHead(nn.Module):
    """A layer stack over ``[N, T, D]`` or ``[T, N, D]`` ending in per-token logits."""

    def __init__(self, body, width=D):
        super().__init__()
        self.body = body
        self.head = nn.Linear(width, C)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


class Scale(nn.Module):
    """A layer with no rule: the vmap fallback (any layout)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, D))

    def forward(self, x):
        return x * self.w + x.pow(2) * 0.1


class Recurrent(nn.Module):
    """A DP RNN (Opacus) and a Linear head on its outputs; optional initial states and packing."""

    def __init__(self, rnn, *, cell_state, initial, packed):
        super().__init__()
        self.rnn, self.cell_state, self.initial, self.packed = rnn, cell_state, initial, packed
        self.head = nn.Linear(H * (2 if rnn.bidirectional else 1), C)

    def forward(self, x, h0=None, c0=None, lengths=None):
        state = None
        if self.initial:
            state = (h0, c0) if self.cell_state else h0
        if self.packed:
            packed = pack_padded_sequence(x, lengths, batch_first=self.rnn.batch_first, enforce_sorted=False)
            out, _ = self.rnn(packed, state)
            out, _ = pad_packed_sequence(out, batch_first=self.rnn.batch_first, total_length=T)
        else:
            out, _ = self.rnn(x, state)
        return self.head(torch.tanh(out))


class Attention(nn.Module):
    """Opacus's DPMultiheadAttention (self-attention) and a Linear head."""

    def __init__(self, batch_first, **options):
        super().__init__()
        self.attn = DPMultiheadAttention(D, 2, batch_first=batch_first, **options)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        out, _ = self.attn(x, x, x)
        return self.head(torch.tanh(out))


class Decoder(nn.Module):
    """A fixed TransformerDecoderLayer whose memory is a Linear map of the input."""

    def __init__(self, batch_first):
        super().__init__()
        self.memory = nn.Linear(D, D)
        self.layer = ModuleValidator.fix(nn.TransformerDecoderLayer(D, 2, 8, dropout=0.0, batch_first=batch_first))
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.layer(x, torch.tanh(self.memory(x))))


class LanguageModel(nn.Module):
    """Embedding, DPLSTM, Linear over the vocabulary (token ids ``[N, T]`` or ``[T, N]``)."""

    def __init__(self, batch_first):
        super().__init__()
        self.embed = nn.Embedding(C + 4, D)
        self.rnn = DPLSTM(D, H, batch_first=batch_first)
        self.head = nn.Linear(H, C)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


def _encoder(batch_first):
    layer = ModuleValidator.fix(nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0, batch_first=batch_first))
    return TokenHead(layer)


def _rnn(kind, **options):
    def make(batch_first):
        cls = {"lstm": DPLSTM, "gru": DPGRU, "rnn": DPRNN}[kind]
        layers = options.get("num_layers", 1)
        rnn = cls(D, H, num_layers=layers, bidirectional=options.get("bidirectional", False), batch_first=batch_first)
        return Recurrent(
            rnn, cell_state=kind == "lstm", initial=options.get("initial", False), packed=options.get("packed", False)
        )

    return make


BOTH = (True, False)
# name -> (model factory(batch_first), the layouts (batch_first values) in which Opacus computes it right
# at K = 1). Opacus 1.6 fails on add_bias_kv in batch-first attention (its SequenceBias sampler takes the
# model's layout, but the attention calls it on time-first tensors) and is not compared on packed input.
MODELS = {
    "linear": (lambda bf: TokenHead(nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D))), BOTH),
    "rmsnorm": (lambda bf: TokenHead(nn.Sequential(nn.Linear(D, D), nn.RMSNorm(D))), BOTH),
    "fallback": (lambda bf: TokenHead(nn.Sequential(nn.Linear(D, D), Scale())), ()),
    "lstm": (_rnn("lstm"), BOTH),
    "lstm_2layer_bidir_init": (_rnn("lstm", num_layers=2, bidirectional=True, initial=True), BOTH),
    "gru_init": (_rnn("gru", initial=True), BOTH),
    "rnn_2layer_bidir": (_rnn("rnn", num_layers=2, bidirectional=True), BOTH),
    "lstm_packed": (_rnn("lstm", packed=True), ()),
    "gru_packed_bidir": (_rnn("gru", packed=True, bidirectional=True), ()),
    "mha": (lambda bf: Attention(bf), BOTH),
    "mha_bias_kv": (lambda bf: Attention(bf, add_bias_kv=True), (False,)),
    "mha_bias_kv_zero_attn": (lambda bf: Attention(bf, add_bias_kv=True, add_zero_attn=True), (False,)),
    "encoder": (_encoder, BOTH),
    "decoder": (Decoder, BOTH),
    "lm": (LanguageModel, BOTH),
}


def _inputs(name, model, rows, batch_first, g):
    """(positional inputs with the dimension holding their examples, targets in the output's layout)."""
    ex = 0 if batch_first else 1
    shape = (rows, T) if batch_first else (T, rows)
    if name == "lm":
        x = torch.randint(0, C + 4, shape, generator=g)
    else:
        x = torch.randn(*shape, D, generator=g, dtype=torch.float64)
    inputs = [(x, ex)]
    if isinstance(model, Recurrent):
        rnn = model.rnn
        state_shape = (rnn.num_layers * (2 if rnn.bidirectional else 1), rows, H)
        h0 = torch.randn(*state_shape, generator=g, dtype=torch.float64) if model.initial else None
        c0 = torch.randn(*state_shape, generator=g, dtype=torch.float64) if model.initial and model.cell_state else None
        lengths = torch.randint(1, T + 1, (rows,), generator=g) if model.packed else None
        inputs += [(h0, 1), (c0, 1), (lengths, 0)]
    return inputs, torch.randint(0, C, shape, generator=g)


def _loss(output, y, lengths=None, batch_first=True):
    if lengths is None:
        return F.cross_entropy(output.reshape(-1, C), y.reshape(-1))
    # Padded positions of packed sequences carry no loss: each sequence's mean over its real tokens,
    # then the mean over sequences (a mean over all real tokens would weigh examples by their length,
    # which no per-example gradient of a mean loss can reproduce).
    if not batch_first:
        output, y = output.transpose(0, 1), y.transpose(0, 1)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(output.dtype)
    per_token = F.cross_entropy(output.reshape(-1, C), y.reshape(-1), reduction="none").view_as(mask)
    return ((per_token * mask).sum(1) / lengths).mean()


def _run(model, inputs, y, batch_first, rows=None):
    tensors = [t if rows is None or t is None else t.narrow(d, rows.start, rows.stop - rows.start) for t, d in inputs]
    target = y if rows is None else y.narrow(0 if batch_first else 1, rows.start, rows.stop - rows.start)
    lengths = tensors[3] if len(tensors) > 3 else None
    return _loss(model(*tensors), target, lengths, batch_first)


def _naive(model, inputs, y, batch_first, k, max_grad_norm):
    params = [p for p in model.parameters() if p.requires_grad]
    examples = inputs[0][0].shape[inputs[0][1]] // k
    per_example = [
        torch.autograd.grad(_run(model, inputs, y, batch_first, slice(b * k, (b + 1) * k)), params)
        for b in range(examples)
    ]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in per_example])
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return params, [sum(f * grads[i] for f, grads in zip(factors, per_example)) for i in range(len(params))], norms


def _setup(name, batch_first, k, seed=0, examples=3):
    torch.manual_seed(seed)
    model = MODELS[name][0](batch_first).double()
    inputs, y = _inputs(name, model, examples * k, batch_first, torch.Generator().manual_seed(seed))
    return model, inputs, y


def _assert_close(got, expected):
    for g, e in zip(got, expected):
        assert (g - e).norm() <= 1e-9 * e.norm() + 1e-12, float((g - e).norm() / e.norm())


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_first"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_clipped_sum_matches_naive_loop(name, batch_first, mode, k, one_thread):
    model, inputs, y = _setup(name, batch_first, k)
    _, _, norms = _naive(model, inputs, y, batch_first, k, 1.0)
    max_grad_norm = float(norms.median())  # some examples clipped, some not
    params, expected, _ = _naive(model, inputs, y, batch_first, k, max_grad_norm)
    wrapped = GradSampleModule(model, mode=mode, augmult=k, batch_first=batch_first)
    _run(wrapped, inputs, y, batch_first).backward()
    got = wrapped.clipped_sum(max_grad_norm)
    assert set(got) == set(params)
    _assert_close([got[p] for p in params], expected)


@pytest.mark.parametrize("name,batch_first", [(n, bf) for n, (_, layouts) in sorted(MODELS.items()) for bf in layouts])
def test_update_matches_opacus(name, batch_first, one_thread):
    """K = 1, sigma = 0: the privatized gradient equals Opacus's (hooks mode) on the same model."""
    model, inputs, y = _setup(name, batch_first, 1, examples=6)
    reference = copy.deepcopy(model)
    max_grad_norm = 0.3
    ours = GradSampleModule(model, batch_first=batch_first)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        module=ours,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=6,
    )
    _run(ours, inputs, y, batch_first).backward()
    optimizer.pre_step()
    theirs = opacus.GradSampleModule(reference, batch_first=batch_first)
    their_optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(reference.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=6,
    )
    _run(theirs, inputs, y, batch_first).backward()
    their_optimizer.pre_step()
    _assert_close([p.grad for p in model.parameters()], [q.grad for q in reference.parameters()])


def test_aliased_rnn_parameters_are_one_parameter():
    """DPLSTM exposes its cells' parameters under nn.LSTM's names too: not tied weights."""
    model = ModuleValidator.fix(nn.LSTM(D, H, num_layers=2))
    wrapped = GradSampleModule(model, batch_first=False)
    assert {id(p) for p in model.parameters()} == {id(p) for layer in wrapped._layers for p in layer.params}


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU, nn.RNN])
def test_torch_rnns_are_refused_with_the_fix(rnn):
    with pytest.raises(ValueError, match=rf"nn\.{rnn.__name__}.*ModuleValidator\.fix.*DP{rnn.__name__}"):
        GradSampleModule(nn.Sequential(rnn(D, H)))


def test_time_first_input_under_batch_first_is_refused():
    """The bug this guards: a time-first model clipped per time step. The loader says how many rows
    the batch has; the model's input holds another number where batch_first says the examples are."""
    from torch.utils.data import DataLoader, TensorDataset

    from privfast import PrivacyEngine

    model = TokenHead(nn.Linear(D, D)).double()
    data = TensorDataset(torch.randn(32, T, D, dtype=torch.float64), torch.randint(0, C, (32, T)))
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    x, y = next(iter(loader))
    with pytest.raises(LayoutError, match=r"shape \[5, 8, 4\].*8 examples.*batch_first=False"):
        private(x.transpose(0, 1))  # a time-first loop, the engine left at batch_first=True
    private(x)  # the batch as loaded: accepted


def test_time_first_layer_in_a_batch_first_model_is_refused():
    """A Linear on [T, N, D] that no enclosing module declares, inside a batch-first model."""

    class Transposing(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = nn.Linear(D, D), nn.Linear(D, C)

        def forward(self, x):
            return self.head(self.inner(x.transpose(0, 1)).transpose(0, 1))

    with pytest.raises(LayoutError, match=r"layer 'inner' \(Linear\).*\[5, 4, 4\].*batch_first=False"):
        GradSampleModule(Transposing(), batch_first=True)(torch.randn(4, T, D))


def test_a_time_first_attention_inside_a_batch_first_model_follows_its_own_layout():
    """The attention declares batch_first=False; the model's other layers are batch-first."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(D, D)
            self.attn = DPMultiheadAttention(D, 2, batch_first=False)
            self.head = nn.Linear(D, C)

        def forward(self, x):
            h = torch.tanh(self.inp(x)).transpose(0, 1)
            out, _ = self.attn(h, h, h)
            return self.head(out.transpose(0, 1))

    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(6, T, D, dtype=torch.float64)
    y = torch.randint(0, C, (6, T))
    inputs = [(x, 0)]
    params, expected, _ = _naive(model, inputs, y, True, 2, 0.2)
    wrapped = GradSampleModule(model, augmult=2, batch_first=True)
    _run(wrapped, inputs, y, True).backward()
    got = wrapped.clipped_sum(0.2)
    _assert_close([got[p] for p in params], expected)


def test_ambiguous_layout_is_refused_unless_given():
    model = TokenHead(nn.Linear(D, D)).double()
    x = torch.randn(T, T, D, dtype=torch.float64)  # N == T
    wrapped = GradSampleModule(model)
    with pytest.raises(LayoutError, match="cannot tell"):
        wrapped(x)
    wrapped.remove_hooks()
    GradSampleModule(model, batch_first=False)(x)  # explicit: accepted


def test_pooled_head_of_a_time_first_model_needs_its_own_layout():
    """A time-first model pools over time and ends in a Linear on [N, C]. With C == N (a square head as
    wide as the batch) dimension 1 has N entries too: taken for the examples, the engine would clip
    features. It refuses, naming the fix, and with the head's layout declared it clips examples."""

    class Pooled(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.inner, self.head = nn.Linear(D, width), nn.Linear(width, width)

        def forward(self, x):  # [T, N, D]
            return self.head(torch.tanh(self.inner(x)).mean(0))

    torch.manual_seed(0)
    n = 6
    model = Pooled(n).double()
    x = torch.randn(T, n, D, dtype=torch.float64)
    y = torch.randint(0, n, (n,))
    refused = GradSampleModule(model, batch_first=False)
    with pytest.raises(LayoutError, match=r"layer 'head' \(Linear\).*\[6, 6\].*model\.head\.batch_first = True"):
        refused(x)
    refused.remove_hooks()
    model.head.batch_first = True
    params = list(model.parameters())
    per_example = [torch.autograd.grad(F.cross_entropy(model(x[:, b : b + 1]), y[b : b + 1]), params) for b in range(n)]
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads)) for grads in per_example])
    bound = float(norms.median())
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * grads[i] for f, grads in zip(factors, per_example)) for i in range(len(params))]
    for mode in MODES:
        wrapped = GradSampleModule(model, mode=mode, batch_first=False)
        F.cross_entropy(wrapped(x), y).backward()
        got = wrapped.clipped_sum(bound)
        _assert_close([got[p] for p in params], expected)
        wrapped.remove_hooks()


def test_positions_shared_by_all_examples_are_refused():
    class Positional(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(7, D), nn.Embedding(T, D), nn.Linear(D, C)

        def forward(self, ids):
            return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))

    with pytest.raises(LayoutError, match=r"layer 'pos'.*No dimension has that size.*expanded"):
        GradSampleModule(Positional(), batch_first=True)(torch.randint(0, 7, (4, T)))


def test_rows_flattened_across_examples_are_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, C)

        def forward(self, x):
            return self.lin(x.reshape(-1, D))

    with pytest.raises(LayoutError, match=r"layer 'lin'.*\[12, 4\]"):
        GradSampleModule(Flat(), batch_first=True)(torch.randn(4, 3, D))


def test_embedding_bag_with_offsets_is_refused():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.head = nn.EmbeddingBag(10, D), nn.Linear(D, C)

        def forward(self, ids, offsets):
            return self.head(self.bag(ids, offsets))

    ids, offsets = torch.randint(0, 10, (7,)), torch.tensor([0, 2, 5])
    with pytest.raises(LayoutError, match=r"layer 'bag' \(EmbeddingBag\).*offsets.*2-D ids"):
        GradSampleModule(Bag(), batch_first=True)(ids, offsets)


def test_input_modified_in_place_after_the_layer_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(D, C)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            out = self.b(h)
            h.mul_(2)  # b's captured input changes after b ran
            return out

    wrapped = GradSampleModule(InPlace())
    with pytest.raises(RuntimeError, match=r"layer 'b'.*modified in place"):
        wrapped(torch.randn(4, D)).sum().backward()
        wrapped.clipped_sum(1.0)


def test_fallback_failure_names_the_layer():
    class Running(nn.Module):
        """Updates a buffer in place in forward: vmap cannot run it per example."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(D))
            self.register_buffer("seen", torch.zeros(D))

        def forward(self, x):
            self.seen.add_(x.detach().sum(0))
            return x * self.w

    model = nn.Sequential(nn.Linear(D, D), Running(), nn.Linear(D, C))
    wrapped = GradSampleModule(model, mode="materialize")
    with pytest.raises(ValueError, match=r"layer '1' \(Running\).*vmap fallback"):
        wrapped(torch.randn(4, D)).sum().backward()
        wrapped.clipped_sum(1.0)


def test_unused_rnn_output_gets_a_gradient_not_an_error():
    """The vmap fallback skips outputs that received no gradient (h_n unused)."""

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.linspace(0.5, 1.5, D))

        def forward(self, x):
            return x * self.w, (x * self.w).sum(-1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.two, self.head = nn.Linear(D, D), TwoOutputs(), nn.Linear(D, C)

        def forward(self, x):
            out, _ = self.two(torch.tanh(self.inp(x)))
            return self.head(out)

    torch.manual_seed(0)
    model = Model().double()
    x, y = torch.randn(T, 4, D, dtype=torch.float64), torch.randint(0, C, (T, 4))
    params, expected, _ = _naive(model, [(x, 1)], y, False, 1, 0.1)
    wrapped = GradSampleModule(model, batch_first=False)
    _run(wrapped, [(x, 1)], y, False).backward()
    got = wrapped.clipped_sum(0.1)
    _assert_close([got[p] for p in params], expected)


# ------------------------------------------------------------------------------ random models
_BLOCKS = ["linear", "layernorm", "rmsnorm", "scale", "mha", "lstm", "gru"]


class Random(nn.Module):
    """A random stack of sequence layers of width D (a grammar: token features in, logits out)."""

    def __init__(self, blocks, batch_first, inner_layouts):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.kinds, self.layouts = blocks, inner_layouts
        for kind, inner in zip(blocks, inner_layouts):
            self.blocks.append(
                {
                    "linear": lambda: nn.Linear(D, D),
                    "layernorm": lambda: nn.LayerNorm(D),
                    "rmsnorm": lambda: nn.RMSNorm(D),
                    "scale": Scale,
                    "mha": lambda: DPMultiheadAttention(D, 2, batch_first=inner, add_bias_kv=True),
                    "lstm": lambda: DPLSTM(D, D, batch_first=inner),
                    "gru": lambda: DPGRU(D, D, batch_first=inner),
                }[kind]()
            )
        self.outer = batch_first
        self.head = nn.Linear(D, C)

    def forward(self, x):
        for kind, inner, block in zip(self.kinds, self.layouts, self.blocks):
            h = x if inner == self.outer else x.transpose(0, 1)
            if kind == "mha":
                h = block(h, h, h)[0]
            elif kind in ("lstm", "gru"):
                h = block(h)[0]
            else:
                h = block(h)
            x = torch.tanh(h if inner == self.outer else h.transpose(0, 1))
        return self.head(x)


@pytest.mark.parametrize("seed", range(12))
def test_random_models_match_naive_loop(seed, one_thread):
    rng = random.Random(seed)
    blocks = [rng.choice(_BLOCKS) for _ in range(rng.randint(1, 4))]
    batch_first = rng.random() < 0.5
    # Linear-like blocks follow the model's layout; layered blocks may declare the other one.
    inner = [rng.random() < 0.5 if b in ("mha", "lstm", "gru") else batch_first for b in blocks]
    k, mode = rng.choice([1, 3]), rng.choice(MODES)
    torch.manual_seed(seed)
    model = Random(blocks, batch_first, inner).double()
    g = torch.Generator().manual_seed(seed)
    rows = 3 * k
    shape = (rows, T) if batch_first else (T, rows)
    inputs, y = (
        [(torch.randn(*shape, D, generator=g, dtype=torch.float64), 0 if batch_first else 1)],
        torch.randint(0, C, shape, generator=g),
    )
    _, _, norms = _naive(model, inputs, y, batch_first, k, 1.0)
    max_grad_norm = float(norms.median())
    params, expected, _ = _naive(model, inputs, y, batch_first, k, max_grad_norm)
    wrapped = GradSampleModule(model, mode=mode, augmult=k, batch_first=batch_first)
    _run(wrapped, inputs, y, batch_first).backward()
    got = wrapped.clipped_sum(max_grad_norm)
    _assert_close([got[p] for p in params], expected)
