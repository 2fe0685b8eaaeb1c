"""The per-example gradient engine: hooks that capture each layer's inputs and output gradients,
and the clipped sum of per-example gradients computed from them, layer by layer.

Autograd never computes the unclipped ``.grad`` of a captured layer: while the layer runs, its
parameters stop requiring a gradient, so backward computes only input gradients; a hook on the
layer's output keeps the output gradient ``D``. A layer with no input that requires a gradient
(the first layer, an Embedding of integer ids) gets its output tapped by :class:`_Tap` so that it
still carries one.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import time
import weakref
from typing import Iterator, Optional

import torch
from opacus.layers.dp_rnn import DPRNNBase, RNNLinear
from opacus.validators import ModuleValidator
from torch import Tensor, nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._pytree import tree_leaves, tree_map

from privfast import _torch_ops, ops

# Importing the rule modules registers them.
from privfast.grad_sample import conv, embedding, group_norm, layer_norm, linear, sequence_bias  # noqa: F401
from privfast.grad_sample.base import (
    GHOST,
    MATERIALIZE,
    Call,
    LayerGrads,
    MaterializedGrads,
    Workspace,
    rule_for,
    trainable,
)
from privfast.grad_sample.functorch import vmap_rule
from privfast.grad_sample.layout import Layout, LayoutError, check_call, layer_layout, model_rows

MODES = ("auto", "materialize", "ghost", "bk")
# In ghost mode a layer whose Gram-matrix norms cost more than this many times building and reducing its
# per-example gradients (a conv with many positions) takes materialized norms, as book-keeping does.
GHOST_MAX_OVERCOST = 4.0
# auto times both strategies of a layer when the cost model puts them within this factor of each other
# (a close call, which counts of multiply-adds decide wrongly); outside it the model decides.
AUTO_TIMED_WITHIN = 8.0
# auto's timed choices, per layer shape, for the whole process (see GradSampleModule._plan).
MEASURED_PLANS: dict[tuple, tuple[str, str]] = {}
# The fixed cost of a step whose clipped sum is not the one fused pass (its small ops and Python; on the
# benchmark CNN as much as the whole fused pass), in the cost model's units (multiply-adds, or elements passed).
MIXED_PATH_COST = 4e6
# Bytes of Gram matrices one layer may allocate for its norms (attribute ghost_memory_limit to change it).
GHOST_MEMORY_LIMIT = 1 << 30
LOSS_REDUCTIONS = ("mean", "sum")

# Each wrapped model's GradSampleModule: wrapping it again detaches the earlier one, whose hooks would refuse
# the new wrapper's forward (they see a layer run outside their own).
_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def unwrapped(module: nn.Module) -> Iterator[bool]:
    """Inside the block the GradSampleModule wrapping ``module``, if any, captures nothing (for a computation on
    the inner model, e.g. an attack on a model in private training). Yields whether one wraps it: wrapping it
    again would detach that one."""
    ref = _WRAPPERS.get(module)
    wrapper = ref() if ref is not None else None
    if wrapper is None or wrapper._detached:
        yield False
        return
    was_enabled = wrapper._hooks_enabled
    wrapper._hooks_enabled = False
    try:
        yield True
    finally:
        wrapper._hooks_enabled = was_enabled


_FLAT_LEAVES = (Tensor, int, float, bool, str, type(None))


def _tensors(*trees) -> list[Tensor]:
    """The tensors among ``trees``' leaves. Tensors and flat tuples, lists and dicts skip pytree's
    generic walk: the hooks run this on every call of a layer (a recurrent cell: once per time step)."""
    found = []
    for tree in trees:
        if isinstance(tree, Tensor):
            found.append(tree)
            continue
        kind = type(tree)
        items = tree.values() if kind is dict else tree if kind is tuple or kind is list else None
        if items is not None and all(isinstance(x, _FLAT_LEAVES) for x in items):
            found += [x for x in items if isinstance(x, Tensor)]
        else:
            found += [x for x in tree_leaves(tree) if isinstance(x, Tensor)]
    return found


class _Tap(torch.autograd.Function):
    """Identity that puts an untracked layer's output into the graph, so that a hook on it receives
    the output gradient; backward stops there (nothing before it needs a gradient), which spares
    the input gradient that making the layer's input require one would cost (a whole convolution)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, x: Tensor, layer_input: bool = False) -> Tensor:
        """``anchor``: a scalar that requires a gradient, so that the output requires one; ``layer_input``: ``x``
        is also one of the layer's inputs."""
        if x._base is not None or layer_input:
            # Marking a view dirty would give its base a history, and marking a tensor the layer got (returned
            # as one of its outputs) would give the caller's tensor one (e.g. the user's input).
            return x.clone()
        ctx.mark_dirty(x)  # the output itself, not a view: in-place layers after it (ReLU(inplace=True)) still work
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None]:
        return None, None, None


class _Layer:
    """A module with trainable parameters of its own, the rule for it, and its calls in this batch."""

    def __init__(self, name: str, module: nn.Module, layout: Layout):
        self.name = name
        self.module = module
        self.layout = layout
        self.params = [p for _, p in trainable(module)]
        self.own = list(module.parameters(recurse=False))  # a rule may name no other tensor as its parameter
        rule = rule_for(module)
        self.fallback = rule is None
        self.rule = vmap_rule if rule is None else rule
        self.calls: list[Call] = []
        self.materialized: Optional[MaterializedGrads] = None  # per-example gradients built during backward
        self.workspace = Workspace()  # their memory, reused step after step
        self.untracked: list[nn.Parameter] = []  # parameters the forward in flight stopped tracking

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype, read at each call (``model.double()`` after wrapping changes it)."""
        return self.params[0].dtype

    def pending(self) -> list[Call]:
        """Calls whose output gradients have arrived and are not consumed yet."""
        return [c for c in self.calls if any(g is not None for g in c.grads)]


def _reparametrized(module: nn.Module) -> list[str]:
    """The names of ``module``'s tensors computed from other parameters: by torch.nn.utils.parametrize
    (``parametrizations.weight_norm`` and the like), by the older weight_norm / spectral_norm hooks, or by
    torch.nn.utils.prune's mask."""
    names = list(module.parametrizations) if nn.utils.parametrize.is_parametrized(module) else []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            names.append(hook.name)
        elif isinstance(hook, BasePruningMethod):
            names.append(hook._tensor_name)
    return names


def _used_outside(engine: "GradSampleModule", layer: _Layer, name: str, grad: Tensor) -> None:
    """Tensor hook on a captured parameter: autograd computed a gradient for it, so it was used while
    tracked, outside its own layer's calls. That use's per-example gradients are not captured. (With the
    engine's hooks disabled every use is tracked, and the gradient is the plain one asked for.)"""
    if not engine._hooks_enabled:
        return
    raise RuntimeError(
        f"parameter {name!r} of layer {layer.name!r} ({type(layer.module).__name__}) received a gradient from a use "
        "outside that layer's own forward call (e.g. a tied output layer computed as F.linear(h, embed.weight), or a "
        "penalty on the weights added to the loss). The engine captures each layer's per-example gradients in the "
        "layer's calls only, so this use would be left out of the clipped update without a word. Give that use a "
        "module of its own (untied weights), or apply a weight penalty through the optimizer (weight_decay), which "
        "acts on the released update and costs no privacy."
    )


def _faster_plan(grads: LayerGrads) -> tuple[str, str]:
    """Time the materialized and the ghost strategy of one layer (norms and a clipped sum with random
    clip factors, best of three runs each, alternating so that a drift in the machine's speed hits
    both alike) and return ghost's plan unless materializing was faster by more than the layer's
    ``ghost_margin``."""
    # Clip factors of no consequence, drawn without touching torch's random state (a draw here would
    # shift every later one: augmentations, dropout, a run's reproducibility).
    weights = torch.linspace(0.5, 1.0, grads.batch, dtype=torch.float64, device=grads.params[0].device)
    cuda = grads.params[0].device.type == "cuda"

    workspace = Workspace()  # as the step reuses its memory: the later runs time the steady state

    def materialize():
        per_example = grads.scaled_per_example(1.0, workspace)
        ops.per_sample_norms(per_example)
        for g in per_example:
            torch.tensordot(weights.to(g.dtype), g, dims=1)

    def ghost():
        grads._ghost_norm_sq()
        grads.contract(weights)

    best = {}
    for plan, run in (((MATERIALIZE, MATERIALIZE), materialize), ((GHOST, GHOST), ghost)) * 3:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        best[plan] = min(best.get(plan, math.inf), time.perf_counter() - start)
    take_ghost = best[(GHOST, GHOST)] <= grads.ghost_margin * best[(MATERIALIZE, MATERIALIZE)]
    return (GHOST, GHOST) if take_ghost else (MATERIALIZE, MATERIALIZE)


class GradSampleModule(nn.Module):
    """Wraps a model so that its per-example gradients can be clipped and summed after a backward.

    The model sees ``[B*fold, ...]`` rows per batch, each example's ``fold = augmult *
    microbatch_size`` rows contiguous; the gradient of example (or microbatch) ``b`` is the mean
    of the loss gradients over its rows, whatever the loss reduction.

    Args:
        module: the model; every parameter must belong to a module whose forward takes the
            batch first. BatchNorm and other layers that mix examples are refused.
        mode: how each layer's norms and clipped sum are computed: ``"materialize"`` (per-example
            gradients ``[B, *shape]``, then the fused op), ``"ghost"`` (Gram-matrix norms and the
            clipped sum as one contraction, nothing per-example stored), ``"bk"`` (book-keeping:
            the cheaper of the two for the norms, the contraction for the sum) or ``"auto"`` (the
            cheaper complete strategy per layer, timed where the cost model is unsure). Layers without a
            ghost form always materialize.
        augmult: K, the augmentations per example.
        microbatch_size: examples whose mean gradient is clipped together (1: per-example clipping).
        loss_reduction: ``"mean"`` or ``"sum"``, how the loss reduces over the rows.
        batch_first: where the model's input and its layers' tensors hold the examples: dimension 0
            (True, ``[N, T, ...]``) or 1 (False, ``[T, N, ...]``, torch's default for RNNs and
            attention). Layers whose type or an enclosing module declares a layout follow that
            instead (see :mod:`privfast.grad_sample.layout`). None means True, except that a call
            whose two leading dimensions both have ``N`` entries is refused rather than guessed.

    Raises:
        ValueError: on a bad argument, a model with layers that mix examples, a torch RNN (use
            Opacus's DP RNNs), or a parameter shared by two modules.
        LayoutError: (a ValueError) during the forward pass, when a layer's tensors do not hold the
            batch's rows where the engine expects them.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        mode: str = "auto",
        augmult: int = 1,
        microbatch_size: int = 1,
        loss_reduction: str = "mean",
        batch_first: Optional[bool] = None,
    ):
        super().__init__()
        if batch_first is not None and not isinstance(batch_first, bool):
            raise ValueError(f"batch_first must be True, False or None, got {batch_first!r}")
        if isinstance(module, GradSampleModule):
            raise ValueError(
                "the model is a GradSampleModule already: wrap the model inside it (its ._module), which detaches "
                "the earlier wrapper"
            )
        for name, m in module.named_modules():
            # Opacus's validator passes these when they have no trainable parameters, yet they break DP whatever
            # is trained: a BatchNorm in training normalizes each example with statistics of the others (so one
            # example changes every example's gradient), and running statistics average the examples into buffers
            # that are released with the model, with no noise.
            mixes = isinstance(m, nn.modules.batchnorm._BatchNorm)
            if mixes or (isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats):
                raise ValueError(
                    f"layer {name or 'the model'!r} ({type(m).__name__}) "
                    + (
                        "normalizes each example with the statistics of the batch"
                        if mixes
                        else "averages the examples into running statistics, released with the model without noise"
                    )
                    + ", which DP-SGD cannot bound. Fix it with `model = opacus.validators.ModuleValidator.fix(model)` "
                    "(BatchNorm becomes GroupNorm, InstanceNorm stops tracking running statistics) before make_private."
                )
            if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
                kind = type(m).__name__
                fix = (
                    f"Fix it with `model = opacus.validators.ModuleValidator.fix(model)`, which replaces it with "
                    f"Opacus's DP{kind} (the same weights and options, built from Linear cells that privfast clips "
                    "exactly), or build the model with opacus.layers.DPLSTM / DPGRU / DPRNN."
                    if isinstance(m, nn.RNNBase)
                    else f"Replace it with Opacus's opacus.layers.dp_rnn.DP{kind} (the same forward, built from Linear "
                    "layers that privfast clips exactly) and copy its weights over."
                )
                raise ValueError(
                    f"layer {name or 'the model'!r} is torch's nn.{kind}, whose fused kernel gives no per-example "
                    f"gradients. {fix}"
                )
            reparametrized = _reparametrized(m)
            if reparametrized:
                computed = ", ".join(reparametrized)
                raise ValueError(
                    f"layer {name or 'the model'!r} ({type(m).__name__}) computes {computed} from other parameters "
                    "(torch.nn.utils.parametrize, weight_norm, spectral_norm, prune) before its forward: the "
                    "per-example gradients of those parameters flow through that computation, which the engine does "
                    "not capture, so they would be left out of the clipped update. Remove it before make_private: "
                    "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') (or "
                    "torch.nn.utils.remove_weight_norm(layer), or torch.nn.utils.prune.remove(layer, 'weight'), after "
                    "which the pruned entries may train again) folds it into a plain weight."
                )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        for name, value in (("augmult", augmult), ("microbatch_size", microbatch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        errors = ModuleValidator.validate(module, strict=False)
        if errors:
            listed = "\n  - ".join(str(e).split(". ")[0] for e in errors)
            raise ValueError(
                f"the model has layers that DP-SGD cannot train:\n  - {listed}\nFix it with "
                "`model = opacus.validators.ModuleValidator.fix(model)` (BatchNorm becomes GroupNorm, InstanceNorm "
                "stops tracking running statistics, nn.MultiheadAttention becomes Opacus's DP version) before "
                "make_private, or replace those layers yourself."
            )
        earlier = _WRAPPERS.get(module)
        earlier = earlier() if earlier is not None else None
        if earlier is not None and earlier._module is module:
            earlier.remove_hooks()
        _WRAPPERS[module] = weakref.ref(self)
        self._module = module
        self._detached = False
        self.mode = mode
        self.augmult = augmult
        self.microbatch_size = microbatch_size
        self.loss_reduction = loss_reduction
        self.batch_first = True if batch_first is None else batch_first
        self._layers = [
            _Layer(
                name, m, layer_layout(module, name, m, batch_first=self.batch_first, explicit=batch_first is not None)
            )
            for name, m in module.named_modules()
            if trainable(m)
        ]
        # Parameters of modules that had nothing trainable when wrapped get no capture: unfrozen later, they
        # would be updated by noise alone (see _check_uncaptured).
        layered = {id(p) for layer in self._layers for p in layer.module.parameters(recurse=False)}
        self._uncaptured = [(n, p) for n, p in module.named_parameters() if id(p) not in layered]
        owners: dict[int, str] = {}
        for layer in self._layers:
            for p in layer.params:
                if id(p) in owners:
                    raise ValueError(
                        f"parameter of {layer.name!r} is shared with {owners[id(p)]!r}; per-example gradients of tied "
                        "weights are not supported: untie them"
                    )
                owners[id(p)] = layer.name
        self._suspended = False
        self._hooks_enabled = True  # see disable_hooks
        self._rows: Optional[int] = None  # N of the forward in flight
        self._model_buffers: set[int] = set()  # ids of the model's buffers in the forward in flight
        self._loaded: collections.deque = collections.deque(maxlen=16)  # shapes of batches the loader yielded
        self._pending_finite: Optional[tuple] = None  # (host flag, CUDA event) of a deferred finite check
        self.ghost_memory_limit = GHOST_MEMORY_LIMIT
        self._packed: list[Optional[Tensor]] = []  # per running DP RNN: its PackedSequence's sorted_indices
        self._handles = []
        for m in module.modules():
            if isinstance(m, DPRNNBase):
                self._handles.append(m.register_forward_pre_hook(self._enter_rnn))
                self._handles.append(m.register_forward_hook(self._leave_rnn, always_call=True))
        for layer in self._layers:
            for name, p in trainable(layer.module):
                # Inside its layer's calls a parameter is untracked: a gradient reaching it came from another use.
                hook = functools.partial(_used_outside, self, layer, name)
                hook.__torch_unserializable__ = True  # torch.save of the model need not warn that it is left out
                self._handles.append(p.register_hook(hook))
            self._handles.append(
                layer.module.register_forward_pre_hook(functools.partial(self._before_forward, layer), with_kwargs=True)
            )
            self._handles.append(
                # prepend: the layer's own output, before forward hooks the user registered earlier change it
                layer.module.register_forward_hook(
                    functools.partial(self._after_forward, layer), with_kwargs=True, always_call=True, prepend=True
                )
            )

    # ------------------------------------------------------------------ wrapping
    @property
    def fold(self) -> int:
        """Rows per clipped unit: ``augmult * microbatch_size``."""
        return self.augmult * self.microbatch_size

    def forward(self, *args, **kwargs):
        if self._detached:
            raise RuntimeError(
                "this GradSampleModule is detached from its model (remove_hooks(), or the model was wrapped again "
                "since): it captures nothing. Train through the newer wrapper."
            )
        for layer in self._layers:
            if layer.pending() or layer.materialized is not None:
                raise RuntimeError(
                    "the per-example gradients of the previous batch were never used: call optimizer.step() "
                    "(or optimizer.zero_grad() to drop them) before the next forward pass"
                )
        self._drop_captured(superseded=True)  # forwards that saw no backward (e.g. evaluation with grad enabled)
        self.check_finite_pending()
        self._rows = model_rows(args, kwargs, batch_first=self.batch_first)
        self._model_buffers = {id(b) for b in self._module.buffers()}
        if self._capturing():
            self._check_against_loaded(args, kwargs)
        self._packed.clear()
        try:
            return self._module(*args, **kwargs)
        finally:
            self._rows = None  # a direct call of the inner model is refused, not captured with stale rows

    def expect_batch(self, shape: tuple) -> None:
        """Note the shape ``[N, ...]`` of a batch the data loader yielded (the PrivacyEngine's loader
        calls this for every batch), to check the model's input layout against."""
        self._loaded.append(shape)

    def _check_against_loaded(self, args: tuple, kwargs: dict) -> None:
        """Refuse an input that is a loaded batch, as loaded or with its first two dimensions swapped,
        whose example dimension (by ``batch_first``) does not hold the loaded batch's N rows."""
        x = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
        if x is None or x.dim() < 2:
            return
        dim = 0 if self.batch_first else 1
        shape = tuple(x.shape)
        for loaded in self._loaded:
            swapped = (loaded[1], loaded[0], *loaded[2:])
            if shape in (loaded, swapped) and shape[dim] != loaded[0] and shape[1 - dim] == loaded[0]:
                raise LayoutError(
                    f"the model's input has shape {list(shape)}; with batch_first={self.batch_first} the engine takes "
                    f"dimension {dim} ({shape[dim]}) as the examples, but the data loader's batch {list(loaded)} has "
                    f"{loaded[0]} examples (rows), now in dimension {1 - dim}. Pass batch_first={not self.batch_first} "
                    "to make_private: clipping the other dimension would clip time steps, not examples."
                )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_module"), name)

    def disable_hooks(self) -> None:
        """Capture nothing until :meth:`enable_hooks` (Opacus's name): the model computes ``.grad`` as a plain
        module does, e.g. for a non-private step. The optimizer's ``step()`` then has nothing to clip."""
        self._hooks_enabled = False

    def enable_hooks(self) -> None:
        """Capture again after :meth:`disable_hooks`."""
        self._hooks_enabled = True

    def to_standard_module(self) -> nn.Module:
        """Detach the engine (:meth:`remove_hooks`) and return the model inside (Opacus's name)."""
        self.remove_hooks()
        return self._module

    def remove_hooks(self) -> None:
        """Detach the engine from the model (it then trains like a plain module). Wrapping the model again does
        this to the earlier wrapper."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._detached = True

    def clear(self) -> None:
        """Drop everything captured since the last step."""
        self._drop_captured(superseded=False)

    def _drop_captured(self, *, superseded: bool) -> None:
        """Drop the captured calls; ``superseded``: by a new forward, so that a backward still reaching one
        is told so (see _on_grad)."""
        for layer in self._layers:
            for call in layer.calls:
                call.drop()
                call.superseded = superseded
            layer.calls.clear()
            layer.materialized = None

    @contextlib.contextmanager
    def _suspend(self):
        self._suspended, previous = True, self._suspended
        try:
            yield
        finally:
            self._suspended = previous

    def _capturing(self) -> bool:
        return self._hooks_enabled and not self._suspended and torch.is_grad_enabled()

    _NOT_PACKED = object()

    def _enter_rnn(self, module, args) -> None:
        packed = args[0] if args and isinstance(args[0], nn.utils.rnn.PackedSequence) else None
        self._packed.append(self._NOT_PACKED if packed is None else packed.sorted_indices)

    def _leave_rnn(self, module, args, output) -> None:
        if self._packed:
            self._packed.pop()

    def _capture(self, layer: _Layer, args: tuple, kwargs: dict, inputs: list[Tensor], outputs: list[Tensor]) -> Call:
        """The call as its rule will see it, after the guard has checked where its examples are.

        Registered rules get the example dimension moved first (a view); a recurrent cell's call on
        a PackedSequence, which holds a prefix of the batch's rows in sorted order, is scattered to
        all N rows in the batch's order (zero rows add nothing to a gradient). The fallback keeps
        the tensors as the layer saw them, with their example dimensions.
        """
        rows, layout = self._rows, layer.layout
        if rows is None and torch._C._current_graph_task_id() != -1:
            raise RuntimeError(
                f"layer {layer.name!r} ran during a backward pass: activation checkpointing (torch.utils.checkpoint) "
                "recomputes a forward there, where the engine cannot tie the layer's calls to the batch it clips. "
                "Per-example gradients need each layer's forward to run in the wrapped model's forward: remove the "
                "checkpointing around layers with trainable parameters."
            )
        if rows is None:
            raise RuntimeError(
                f"layer {layer.name!r} ran outside the wrapped model's forward (the engine does not know the batch's "
                "rows): call the GradSampleModule, not the module inside it, or run under torch.no_grad()"
            )
        first = (
            args[0] if args and isinstance(args[0], Tensor) else next((a for a in args if isinstance(a, Tensor)), None)
        )
        if isinstance(first, nn.Parameter) or id(first) in self._model_buffers:
            # Its rows belong to no example: were there N of them, they would be clipped as the examples.
            raise LayoutError(
                f"layer {layer.name!r} ({type(layer.module).__name__}) was applied to a parameter or buffer of the "
                "model, which all examples share (e.g. a table of class embeddings): per-example gradients cannot "
                "tell the examples apart in it. Expand it to the batch's rows first (e.g. table.expand(N, *table.shape)"
                " and a layer over the last dimension), so that each example's gradient is its own."
            )
        call = Call(args, kwargs, [None] * len(outputs), [o.grad_fn for o in outputs], rows=rows)
        call.versions = [(a, a._version) for a in inputs]
        if isinstance(layer.module, nn.EmbeddingBag) and (
            (len(args) > 1 and args[1] is not None) or kwargs.get("offsets") is not None
        ):
            raise LayoutError(
                f"layer {layer.name!r} (EmbeddingBag) got 1-D ids with offsets, which pack the bags of all "
                "examples into one row: its per-example gradients cannot be told apart. Pass 2-D ids [N, L] (one "
                "bag per row; pad with padding_idx) instead."
            )
        if layer.fallback:
            tensors = [(i, a) for i, a in enumerate(args) if isinstance(a, Tensor)]
            if not tensors:
                raise LayoutError(
                    f"layer {layer.name!r} ({type(layer.module).__name__}) got no tensor positional input "
                    "to find the examples in"
                )
            check_call(layer.name, layer.module, layout, rows, "input", tensors[0][1])
            device_type = tensors[0][1].device.type
            if torch.is_autocast_enabled(device_type):
                call.autocast = (device_type, torch.get_autocast_dtype(device_type))

            def batched(t):
                return (
                    layout.dim
                    if isinstance(t, Tensor) and t.dim() > layout.dim and t.shape[layout.dim] == rows
                    else None
                )

            call.arg_dims = tuple(batched(a) for a in args)
            call.kwarg_dims = {k: batched(v) for k, v in kwargs.items()}
            for o in outputs:
                if o.requires_grad:
                    check_call(layer.name, layer.module, layout, rows, "output", o)
            call.out_dims = [layout.dim] * len(outputs)
            return call
        if not args or not isinstance(args[0], Tensor):
            raise LayoutError(
                f"layer {layer.name!r} ({type(layer.module).__name__}) must get its input as the first "
                "positional argument"
            )
        x = args[0]
        dtype = layer.dtype
        if x.is_floating_point() and x.dtype != dtype:
            # Autocast ran the layer in a lower precision (its output gradients are cast in _on_grad too): the rule
            # computes in the parameters' dtype, as the clipped sum is kept.
            x = x.to(dtype)
            call.args = args = (x, *args[1:])
        call.out_dims = [0] * len(outputs)
        if isinstance(layer.module, RNNLinear) and self._packed and self._packed[-1] is not self._NOT_PACKED:
            sorted_indices = self._packed[-1]
            index = (
                torch.arange(x.shape[0], device=x.device)
                if sorted_indices is None
                else sorted_indices[: x.shape[0]].to(x.device)
            )
            call.index = index
            call.args = (x.new_zeros(rows, *x.shape[1:]).index_copy_(0, index, x), *args[1:])
            return call
        check_call(layer.name, layer.module, layout, rows, "input", x)
        for o in outputs:
            if o.requires_grad:
                check_call(layer.name, layer.module, layout, rows, "output", o)
        if layout.dim != 0:
            call.args = (x.movedim(layout.dim, 0), *args[1:])
            call.moved = layout.dim
        return call

    @staticmethod
    def _check_unchanged(layer: _Layer, call: Call) -> None:
        for t, version in call.versions:
            if t._version != version:
                raise RuntimeError(
                    f"an input of layer {layer.name!r} ({type(layer.module).__name__}) was modified in place after the "
                    "layer ran (e.g. x.add_() or an inplace=True activation on a tensor the layer had read): its "
                    "per-example gradients would be computed from the modified values. Use the out-of-place op."
                )

    def _before_forward(self, layer: _Layer, module, args, kwargs):
        if not self._capturing():
            return None
        layer.untracked = [p for p in layer.params if p.requires_grad]  # the user may have frozen some since
        for p in layer.untracked:
            p.requires_grad_(False)
        return None

    def _after_forward(self, layer: _Layer, module, args, kwargs, output):
        # This runs on every call of a layer (a recurrent cell: once per time step), hence the shortcuts
        # for the common single-tensor input and output.
        untracked = layer.untracked
        if untracked:
            layer.untracked = []
            for p in untracked:
                p.requires_grad_(True)
        if not self._capturing():
            return None
        inputs = [args[0]] if not kwargs and len(args) == 1 and isinstance(args[0], Tensor) else _tensors(args, kwargs)
        if untracked and not any(a.requires_grad for a in inputs):
            # With its weights untracked the layer's output would carry no gradient to capture. An output that
            # carries one already came through layers inside this one (a model with parameters of its own, such
            # as a class token, around its layers): a tap there would cut the backward off from them.
            anchor = torch.zeros((), requires_grad=True)
            output = tree_map(
                lambda o: (
                    _Tap.apply(anchor, o, any(o is a for a in inputs))
                    if isinstance(o, Tensor) and o.is_floating_point() and not o.requires_grad
                    else o
                ),
                output,
            )
        outputs = [output] if isinstance(output, Tensor) else _tensors(output)
        call = self._capture(layer, args, kwargs, inputs, outputs)
        for i, o in enumerate(outputs):
            if o.requires_grad:
                # A hook on the output's node, not on the tensor (Tensor.register_hook costs twice as much
                # in Python): it sees the gradient of this output as it was when the layer returned,
                # also when the output is later modified in place, as a tensor hook registered here would.
                o.grad_fn.register_prehook(functools.partial(self._on_node_grads, layer, call, i, o.output_nr))
        layer.calls.append(call)
        return output

    def _on_node_grads(self, layer: _Layer, call: Call, index: int, output_nr: int, grads: tuple) -> None:
        grad = grads[output_nr]
        if grad is not None:
            self._on_grad(layer, call, index, grad)

    def _on_grad(self, layer: _Layer, call: Call, index: int, grad: Tensor) -> None:
        """Keep an output gradient; a single-output layer called once that will materialize does so
        right away, so that its inputs and output gradient can be freed during the backward pass."""
        if call.superseded:
            raise RuntimeError(
                f"layer {layer.name!r} got the gradient of an output of an earlier forward pass of the wrapped model: "
                "each forward starts a new batch and drops what the one before captured, so that forward's share of "
                "each example's gradient would be lost. Run one forward per backward: to combine several inputs "
                "of each example (e.g. two augmented views), pass them as K rows per example with augmult=K, or "
                "concatenate them into one forward."
            )
        if not call.args or call.grads[index] is not None:  # consumed (dropped), or given a gradient already
            raise RuntimeError(
                f"a second backward pass reached layer {layer.name!r} for the same forward (e.g. "
                "loss1.backward(retain_graph=True) then loss2.backward(), or a backward through an output kept from an "
                "earlier batch): the engine takes each example's gradient from one backward per forward, and would "
                "clip only part of it. Add the losses and call backward once."
            )
        if call.moved:
            grad = grad.movedim(call.moved, 0)
        if grad.dtype != layer.dtype and not layer.fallback:  # autocast: see _capture
            grad = grad.to(layer.dtype)
        if call.index is not None:
            grad = grad.new_zeros(call.rows, *grad.shape[1:]).index_copy_(0, call.index, grad)
        call.grads[index] = grad
        if len(call.grads) > 1 or len(layer.calls) > 1:
            # A layer called several times (a recurrent cell: once per time step) waits for all its calls:
            # joined along the positions they make one GEMM, where one per call would be T of them.
            return
        with self._suspend(), torch.no_grad():
            scale = self._loss_scale(call.rows)
            grads = self._apply_rule(layer, [call])
            if self._plan(grads, layer) != (MATERIALIZE, MATERIALIZE):
                return
            if layer.materialized is None:
                per_example = grads.scaled_per_example(scale, layer.workspace)
                layer.materialized = MaterializedGrads(grads.params, per_example)
            else:
                for total, g in zip(layer.materialized.per_example(), grads.scaled_per_example(scale)):
                    total.add_(g)
        layer.calls.remove(call)
        call.drop()

    # ------------------------------------------------------------------ per-example gradients
    def _layer_grads(self) -> Iterator[tuple[_Layer, LayerGrads, float]]:
        """Each captured layer's per-example gradient information and its loss scale, one at a time.

        The rules work on the output gradients as autograd gave them; the loss scale (see
        :meth:`_loss_scale`) multiplies what they produce, which is far smaller than ``D``.
        """
        found = False
        with self._suspend(), torch.no_grad():
            for layer in self._layers:
                calls = layer.pending()
                if not calls and layer.materialized is None:
                    continue
                found = True
                if not calls:
                    yield layer, layer.materialized, 1.0
                    continue
                scale = self._loss_scale(calls[0].rows)
                grads = self._apply_rule(layer, calls)
                if layer.materialized is not None:  # calls that planned otherwise join the built part
                    built = layer.materialized.per_example()
                    per_example = [a + b for a, b in zip(built, grads.scaled_per_example(scale))]
                    grads, scale = MaterializedGrads(grads.params, per_example), 1.0
                yield layer, grads, scale
        if not found:
            raise RuntimeError(
                "no per-example gradients were captured: run the forward pass through the wrapped module and "
                "loss.backward() before asking for them (e.g. before optimizer.step())"
            )

    def _apply_rule(self, layer: _Layer, calls: list[Call]) -> LayerGrads:
        """The layer's rule on its calls; the fallback's failures become errors that name the layer."""
        for call in calls:
            self._check_unchanged(layer, call)
        if not layer.fallback:
            grads = layer.rule(layer.module, calls, self.fold)
            if not all(any(p is q for q in layer.own) for p in grads.params):
                raise ValueError(
                    f"layer {layer.name!r} ({type(layer.module).__name__}) uses as its weight or bias a tensor that is "
                    "not one of its own parameters (e.g. an attribute computed from them): its per-example "
                    "gradients would be those of the computed tensor. Compute the weight in the layer's forward, "
                    "which the engine then differentiates exactly, or register it as a parameter."
                )
            return grads
        try:
            return layer.rule(layer.module, calls, self.fold)
        except Exception as error:  # vmap's errors name no layer and suggest nothing
            random = (
                "The layer draws random numbers in its forward (e.g. a Dropout inside it), which a rerun per example "
                "would draw anew, unlike the forward it differentiates: give the random op a module of its own, "
                "outside the layer with the parameters. "
                if "randomness" in str(error)
                else ""
            )
            raise ValueError(
                f"per-example gradients of layer {layer.name!r} ({type(layer.module).__name__}) failed in the generic "
                f"torch.func.vmap fallback: {type(error).__name__}: {error}\n{random}The layer's forward must "
                "work on one example's rows at a time without in-place updates of its buffers or inputs. Replace the "
                "layer, or give its type a rule with privfast.grad_sample.register_rule."
            ) from error

    def _loss_scale(self, rows: int) -> float:
        """Turns a sum of row gradients of the loss into the unit's mean-row gradient."""
        if rows % self.fold:
            raise ValueError(
                f"the batch has {rows} rows, not a multiple of augmult*microbatch_size = {self.fold}: every example "
                "must appear as its K augmentations in contiguous rows, and the batch must split into whole "
                "microbatches"
            )
        # mean: each row's gradient carries 1/rows, and a unit's gradient is the mean over its fold rows.
        return rows / self.fold if self.loss_reduction == "mean" else 1.0 / self.fold

    def _plan(self, grads: LayerGrads, layer: _Layer) -> tuple[str, str]:
        """(how the norms, how the clipped sum) of one layer are computed.

        ``auto`` times both complete strategies the first time the process sees a layer shape (the
        batch size rounded to a power of two) and keeps the faster, a layer's ghost strategy within its
        ``ghost_margin``: operation counts do not say what a batched GEMM, a Gram matrix or a pass over
        memory cost on a given machine. The choice is
        kept for the process (MEASURED_PLANS, saved in PrivacyEngine checkpoints so that a resumed
        run computes bit for bit as before). Layers without such a key, the other modes, and runs
        under torch.use_deterministic_algorithms(True) use the cost model.
        """
        ghost = grads.ghost_cost()
        if self.mode == "materialize" or math.isinf(ghost):
            return MATERIALIZE, MATERIALIZE
        if self.mode == "auto" and grads.ghost_bytes() > self.ghost_memory_limit:
            return MATERIALIZE, MATERIALIZE
        if grads.ghost_bytes() > self.ghost_memory_limit or (
            self.mode == "ghost" and ghost > GHOST_MAX_OVERCOST * (grads.materialize_cost() + grads.reduce_cost())
        ):
            # Gram matrices over K*T rows grow with (K*T)^2 (17 GB for one conv at 32x32 and K = 16): this
            # layer's norms come from its per-example gradients instead, built and dropped one layer at a
            # time, and its sum stays a contraction, so nothing per-example outlives the layer.
            return MATERIALIZE, GHOST
        if self.mode == "ghost":
            return GHOST, GHOST
        if self.mode == "bk":
            return (GHOST if ghost < grads.materialize_cost() + grads.reduce_cost() else MATERIALIZE), GHOST
        materialize = grads.materialize_cost() + 2 * grads.reduce_cost()  # build, then norm and sum passes
        if self.mode == "auto" and materialize < MIXED_PATH_COST:
            # Contracted, a layer this small (a classifier head) would take the step off the fused clip, which
            # _fuse_instead would undo after the backward, rebuilding it then: built in its hook it costs less.
            return MATERIALIZE, MATERIALIZE
        ghost_total = ghost + grads.contract_cost()
        key = grads.plan_key()
        if (
            key is not None
            and not torch.are_deterministic_algorithms_enabled()
            and max(materialize, ghost_total) < AUTO_TIMED_WITHIN * min(materialize, ghost_total)
        ):
            if key not in MEASURED_PLANS:
                MEASURED_PLANS[key] = _faster_plan(grads)
            return MEASURED_PLANS[key]
        # Materialized norms are never paired with the contraction here (bk does so where Gram matrices
        # cost more, e.g. every conv at K = 16): the norms have already built the per-example gradients,
        # from which the sum is one pass instead of a second weight-gradient computation; the pairing
        # only lowers the peak memory.
        return (MATERIALIZE, MATERIALIZE) if materialize <= ghost_total else (GHOST, GHOST)

    def _fuse_instead(self, contracted: list[LayerGrads], flat: float) -> bool:
        """Whether ``auto`` should build the per-example gradients of the layers it planned to contract.

        Each layer's plan is made alone, but one contracted layer takes the whole step off the fused
        clip: every materialized gradient is then read once for the norms and once more for the sum,
        with a dozen small ops per layer. Where the contracted layers are small (a classifier head
        over a few rows), building them and keeping the fused pass costs less than that.

        Args:
            contracted: the layers planned to contract.
            flat: elements of the materialized layers' per-example gradients.
        """
        if self.mode != "auto":
            return False
        # A sufficient condition only: the mixed path costs at least the second read and its fixed part, and
        # the plans' own comparison (timed, where the cost model is unsure) stands for larger layers.
        build = sum(grads.materialize_cost() + grads.reduce_cost() for grads in contracted)
        return build < flat + MIXED_PATH_COST

    @torch.no_grad()
    def per_sample_gradients(self, *, copy: bool = True) -> dict[nn.Parameter, Tensor]:
        """Materialized per-example gradients ``{param: [B, *param.shape]}`` of the last backward.

        Meant for analysis and attacks; training uses :meth:`clipped_sum`, which avoids them where cheaper.

        Args:
            copy: False: where a layer builds them in memory it keeps for its next step, return that memory
                itself, which the next backward overwrites (for a caller that consumes them at once).
        """
        return {
            p: g.clone() if copy and layer.workspace.owns(g) else g
            for layer, grads, scale in self._layer_grads()
            for p, g in zip(grads.params, grads.scaled_per_example(scale))
        }

    @torch.no_grad()
    def clipped_sum(self, max_grad_norm: float, *, check_finite: bool = True) -> dict[nn.Parameter, Tensor]:
        """Clip each unit's gradient to ``max_grad_norm`` and sum over the batch; clears the capture.

        Layers are processed one at a time: a materialized layer keeps only its ``[B, *shape]``
        gradients, a ghost layer its captured operands until the clip factors are known.

        Args:
            max_grad_norm: the clipping bound C > 0.
            check_finite: refuse a non-finite per-example gradient. On the CPU (and whenever
                :attr:`defer_finite_check` is False) this raises here, naming the examples. On CUDA
                (or with :attr:`defer_finite_check`) reading the result would stall the step on a host
                sync, so the check is copied to the host asynchronously and raised at the next forward
                or :meth:`check_finite_pending`: the step's update is then already non-finite.

        Returns:
            ``{param: sum_b min(1, C / (n_b + 1e-6)) G_b}`` for every parameter that took part.

        Raises:
            ValueError: on a non-finite gradient (e.g. a NaN loss), when ``check_finite``.
        """
        self._check_uncaptured()
        materialized: list[tuple[list[nn.Parameter], list[Tensor]]] = []
        contracted: list[tuple[LayerGrads, float, str, _Layer]] = []
        built = 0.0
        for layer, grads, scale in self._layer_grads():
            norm_how, sum_how = self._plan(grads, layer)
            if sum_how == MATERIALIZE:
                materialized.append((grads.params, grads.scaled_per_example(scale, layer.workspace)))
                built += grads.reduce_cost()
                grads.release()
            else:
                contracted.append((grads, scale, norm_how, layer))
        if contracted and self._fuse_instead([grads for grads, _, _, _ in contracted], built):
            for grads, scale, _, layer in contracted:
                materialized.append((grads.params, grads.scaled_per_example(scale, layer.workspace)))
                grads.release()
            contracted = []
        self.clear()
        flat = [g for _, per_example in materialized for g in per_example]
        some = flat[0] if flat else contracted[0][0].params[0]
        defer = check_finite and self._defers(some.device)
        if not contracted:
            # Every layer is per-example: norms, clipping and the sum in one fused pass.
            sums = ops.clip_accumulate_noise(flat, max_grad_norm, check_finite=check_finite and not defer)
            if defer:  # a non-finite example makes its clipped contribution, so the sum, non-finite
                self._defer_finite(torch.stack([s.isfinite().all() for s in sums]).all())
            return dict(zip([p for params, _ in materialized for p in params], sums))
        # The materialized layers' norms in one multi-tensor pass, then the contracted layers' own.
        squares = [ops.per_sample_norms(flat).pow(2)] if flat else []
        squares += [grads.norm_sq(how) * scale**2 for grads, scale, how, _ in contracted]
        norms = torch.stack(squares).sum(0).sqrt()
        if defer:
            self._defer_finite(torch.isfinite(norms).all())
        elif check_finite:
            ops.check_finite_norms(norms, name="per-example gradients")
        factors = _torch_ops.clip_factors(norms, max_grad_norm)
        out = {}
        for params, per_example in materialized:
            out.update(zip(params, (torch.tensordot(factors.to(g.dtype), g, dims=1) for g in per_example)))
        for grads, scale, _, _ in contracted:
            out.update(zip(grads.params, grads.contract(factors * scale)))
        return out

    def _check_uncaptured(self) -> None:
        """Refuse a parameter that was frozen, with its whole module, when the model was wrapped and has
        been unfrozen since: no hook captures that module, so its clipped sum would be missing."""
        for name, p in self._uncaptured:
            if p.requires_grad:
                raise ValueError(
                    f"parameter {name!r} requires a gradient, but its module had no trainable parameter when the "
                    "model was wrapped, so the engine captures none of its per-example gradients: the optimizer would "
                    "update it with noise alone. Unfreeze every parameter you will train before make_private "
                    "(freezing some afterwards is fine), or wrap the model again after unfreezing."
                )

    # ------------------------------------------------------------------ deferred finite check
    defer_finite_check: Optional[bool] = None
    """Check finiteness without a host sync (raised one step late): None means on CUDA only."""

    def _defers(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.defer_finite_check is None else self.defer_finite_check

    def _defer_finite(self, flag: Tensor) -> None:
        """Start copying the 0-d bool ``flag`` to the host without waiting; :meth:`check_finite_pending` reads it."""
        if flag.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = flag, None
        self._pending_finite = (host, event)

    def check_finite_pending(self) -> None:
        """Raise if the last deferred finite check failed (waits only for that step's own copy).

        Raises:
            ValueError: the previous step had a non-finite per-example gradient; its update was applied.
        """
        pending, self._pending_finite = self._pending_finite, None
        if pending is None:
            return
        host, event = pending
        if event is not None:
            event.synchronize()
        if not bool(host):
            raise ops.non_finite_error(
                "the previous step's per-example gradients had",
                "",
                "its clipped sum and the update it made have them too (checked without a host sync, one step late). "
                "Restore the model from a checkpoint; defer_finite_check=False stops at the step itself",
            )

    def layer_plans(self) -> dict[str, tuple[str, str]]:
        """``{layer name: (norm method, sum method)}`` for the captured batch (for inspection)."""
        plans, contracted, built = {}, [], 0.0
        for layer, grads, _ in self._layer_grads():
            plans[layer.name] = plan = self._plan(grads, layer)
            if plan[1] == MATERIALIZE:
                built += grads.reduce_cost()
            else:
                contracted.append(grads)
        if contracted and self._fuse_instead(contracted, built):
            plans = dict.fromkeys(plans, (MATERIALIZE, MATERIALIZE))
        return plans
