"""What a layer rule hands the engine: one layer's per-example gradient information for one batch.

Shapes: B examples (units of ``fold`` contiguous rows: the K augmentations of one example, times
the microbatch size), ``R`` rows of a contraction per example (K * positions), G groups.

A rule turns the captured layer inputs and output gradients into a :class:`LayerGrads`, which
offers the per-example squared norms and the clipped sum in up to two ways:

- ``"materialize"``: build the per-example gradients ``[B, *shape]`` and reduce them;
- ``"ghost"``: norms from Gram matrices and the clipped sum as one contraction ``A^T (c * D)``,
  never holding a per-example gradient (only rules that return a cost for it support it).
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from opacus.layers.param_rename import RenameParamsMixin
from torch import Tensor, nn

from privfast import ops

MATERIALIZE = "materialize"
GHOST = "ghost"


@dataclass(eq=False, slots=True)  # slots: built and read on every call of every layer
class Call:
    """One forward call of a layer: its positional and keyword inputs, then its output gradients.

    ``grad_fns`` are the outputs' autograd nodes: a rule may read what the layer's forward saved
    for its backward (e.g. GroupNorm's statistics) instead of recomputing it, as long as it runs
    from the output hook, before that node's backward frees them.
    """

    args: tuple
    kwargs: dict
    grads: Optional[list[Tensor]] = field(default=None)
    grad_fns: list = field(default_factory=list)
    rows: int = 0
    """N, the batch's rows (``B * fold``), along the example dimension."""
    arg_dims: tuple = ()
    """Per positional argument, the dimension holding the examples (None: shared by all examples).
    Rules registered with :func:`register_rule` get every tensor example-first (all 0); the vmap
    fallback gets the layer's tensors as the layer saw them, with these dimensions."""
    kwarg_dims: dict = field(default_factory=dict)
    out_dims: list = field(default_factory=list)
    """Per output, the dimension holding the examples (of ``grads[i]`` as the rule receives it)."""
    moved: int = 0
    """The dimension the engine moves first in the output gradients as they arrive."""
    index: Optional[Tensor] = None
    """For a recurrent cell on a PackedSequence: the batch rows its rows belong to."""
    versions: list = field(default_factory=list)
    """``(tensor, version)`` of every input when the layer ran, to detect later in-place changes."""
    superseded: bool = False
    """Dropped because the wrapped model ran another forward before this call's backward."""
    autocast: Optional[tuple] = None
    """``(device_type, dtype)`` of the autocast the call ran under, for the vmap fallback to run it so again."""

    def drop(self) -> None:
        """Release the tensors. The output hooks still reference the call while the user keeps the
        graph alive (e.g. through ``loss``), which would otherwise keep a whole batch's activations."""
        self.args, self.kwargs, self.grad_fns, self.versions, self.index = (), {}, [], [], None
        self.grads = [None] * len(self.grads)


class Workspace:
    """Memory for one layer's per-example gradients, kept from one step to the next.

    A step that materializes per-example gradients allocates megabytes per layer and frees them at
    its end; glibc hands such blocks back to the kernel, so every step pays for fresh zeroed pages
    (on the benchmark transformer as much as computing the gradients). Written into memory kept
    here, they cost only their arithmetic. Grows to the largest batch seen (Poisson batches vary).
    """

    def __init__(self):
        self._flat: Optional[Tensor] = None

    def take(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Contiguous tensors of these shapes, in memory reused by the next call (their contents are not kept)."""
        sizes = [math.prod(shape) for shape in shapes]
        need = sum(sizes)
        flat = self._flat
        if flat is None or flat.numel() < need or flat.dtype != dtype or flat.device != device:
            self._flat = flat = None  # free the old block before allocating the new one
            self._flat = flat = torch.empty(need + need // 8, dtype=dtype, device=device)  # room for larger batches
        out, start = [], 0
        for shape, size in zip(shapes, sizes):
            out.append(flat[start : start + size].view(shape))
            start += size
        return out

    def owns(self, t: Tensor) -> bool:
        """Whether ``t`` lives in this workspace's memory (and would be overwritten by the next step)."""
        return self._flat is not None and t.untyped_storage().data_ptr() == self._flat.untyped_storage().data_ptr()

    def nbytes(self) -> int:
        """Bytes held between steps."""
        return 0 if self._flat is None else self._flat.numel() * self._flat.element_size()


class SharedOperand:
    """A rule's operand that several layers build from the very same captured tensors, and what they
    compute from it (its Gram matrix, its sums over positions), computed once for all of them.

    A recurrent cell's input-to-hidden and hidden-to-hidden Linear both receive the gradient of the
    gates they are summed into (autograd hands both the one tensor): joined over the time steps and
    multiplied into a Gram matrix once, it costs half. Get one from :func:`shared_operand`.
    """

    __slots__ = ("tensor", "users", "_kept", "__weakref__")

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self.users = 0  # layers handed this operand
        self._kept: dict[str, tuple[Tensor, int]] = {}  # what -> (value, users served)

    def derived(self, what: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, a function of the operand alone named ``what`` (e.g. ``"gram"``), kept until every
        user has had it.

        The count only decides how long the result is kept: a user that asks again (auto's timing) or
        one that never asks costs a recomputation or memory until the layers release the operand, never
        a wrong value, since the value is of this operand only."""
        value, served = self._kept.pop(what, (None, 0))
        value = compute() if value is None else value
        if served + 1 < self.users:
            self._kept[what] = (value, served + 1)
        return value


# (id of each source, ...) -> (weak references to the sources, weak reference to their SharedOperand)
_OPERANDS: dict[tuple, tuple[list, weakref.ref]] = {}


def shared_operand(key: tuple, sources: Sequence[Tensor], build: Callable[[], Tensor]) -> SharedOperand:
    """The operand ``build()`` makes of ``sources``, shared with every layer that asks for ``key`` with
    the very same source objects (not equal values) while an earlier result is still held.

    Sources and results are held weakly: a hit needs each source to be the live object that was
    passed before, so an id that Python recycled never matches, and nothing is kept past its layers.

    Args:
        key: what ``build`` makes of the sources and how (e.g. a rule's name and its fold).
        sources: the captured tensors the operand is made of.
        build: makes the operand.
    """
    ids = (key, *map(id, sources))
    entry = _OPERANDS.get(ids)
    operand = None
    if entry is not None and all(ref() is s for ref, s in zip(entry[0], sources)):
        operand = entry[1]()
    if operand is None:
        operand = SharedOperand(build())
        if len(_OPERANDS) >= 256:
            for dead in [k for k, (_, ref) in _OPERANDS.items() if ref() is None]:
                del _OPERANDS[dead]
        _OPERANDS[ids] = ([weakref.ref(s) for s in sources], weakref.ref(operand))
    operand.users += 1
    return operand


class LayerGrads:
    """Per-example gradients of one layer's parameters, computed on demand.

    Subclasses implement :meth:`_compute_per_example`; those that can avoid materializing also
    override :meth:`ghost_cost`, :meth:`contract_cost`, :meth:`_ghost_norm_sq` and :meth:`contract`.
    """

    # auto takes the ghost strategy where, timed alone, it ran at most this many times as long as
    # materializing (see engine._faster_plan).
    ghost_margin = 1.0

    def __init__(self, params: Sequence[nn.Parameter], batch: int):
        self.params = list(params)
        self.batch = batch
        self._per_example: Optional[list[Tensor]] = None

    # -- costs (multiply-adds; an element copied or scaled counts as one), to pick a strategy per layer --
    def materialize_cost(self) -> float:
        """Cost of building ``[B, *shape]`` for every parameter."""
        return self.reduce_cost()

    def reduce_cost(self) -> float:
        """Cost of one pass over the materialized ``[B, *shape]`` (a norm or a weighted sum)."""
        return float(self.batch * sum(p.numel() for p in self.params))

    def ghost_cost(self) -> float:
        """Cost of the Gram-matrix norms; ``inf`` where the rule has none."""
        return math.inf

    def contract_cost(self) -> float:
        """Cost of the clipped sum as one contraction; ``inf`` where the rule has none."""
        return math.inf

    def ghost_bytes(self) -> float:
        """Bytes the Gram-matrix norms allocate at once (0 where the rule has none)."""
        return 0.0

    def plan_key(self) -> Optional[tuple]:
        """What the cost of the strategies depends on (the batch size rounded to a power of two), for
        ``auto`` to time them once per key; None where the rule has one strategy only."""
        return None

    # -- results ----------------------------------------------------------------------------
    def per_example(self) -> list[Tensor]:
        """Per-example gradients, ``[B, *p.shape]`` for each parameter (computed once)."""
        if self._per_example is None:
            self._per_example = self._compute_per_example()
        return self._per_example

    def _compute_per_example(self) -> list[Tensor]:
        raise NotImplementedError

    def scaled_per_example(self, scale: float, workspace: Optional[Workspace] = None) -> list[Tensor]:
        """Per-example gradients times ``scale`` (``[B, *p.shape]`` each). Rules that can write them into
        ``workspace`` do so: the caller must then consume them before the layer's next step."""
        per_example = self._per_example if self._per_example is not None else self._compute_per_example()
        return per_example if scale == 1.0 else [g.mul_(scale) for g in per_example]

    def norm_sq(self, how: str) -> Tensor:
        """``[B]`` squared per-example norms over this layer's parameters."""
        if how == GHOST:
            return self._ghost_norm_sq()
        # Book-keeping takes norms this way and then contracts: the per-example gradients are not kept.
        per_example = self._per_example if self._per_example is not None else self._compute_per_example()
        return ops.per_sample_norms(per_example).pow(2)

    def contract(self, weights: Tensor) -> list[Tensor]:
        """``sum_b weights[b] * G[b]`` for each parameter without forming ``G``; ``weights`` is ``[B]``."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop the captured operands once the per-example gradients are built (lowers the peak)."""

    def _ghost_norm_sq(self) -> Tensor:
        raise NotImplementedError


class MaterializedGrads(LayerGrads):
    """A layer whose per-example gradients are small or have no cheaper form (norms, fallback)."""

    def __init__(self, params: Sequence[nn.Parameter], per_example: list[Tensor]):
        super().__init__(params, per_example[0].shape[0])
        self._per_example = per_example


class ContractionGrads(LayerGrads):
    """A layer whose weight gradient is ``sum_t D_t A_t^T`` (Linear, Conv): K folds into the sum.

    The operands stay views of what the hooks captured (channels before positions, as a
    convolution's unfolded input comes): nothing of size ``B*K x params`` is formed.

    Args:
        weight, bias: the layer's parameters (``bias`` may be None or frozen).
        a: inputs ``[B, K, G, d, T]`` (unfolded for convolutions; T positions).
        d: output gradients ``[B, K, G, p, T]``, or a :class:`SharedOperand` holding them where other layers
            may share them (their Gram matrix is then computed once).
    """

    # A Linear's materialized strategy timed alone builds its per-example gradients and reads them twice
    # while they are in cache; in a step they are built during the backward and read by the clip from
    # memory, and ghost's backward computes no weight gradient at all, so the timing favours
    # materializing where the step does not, and a fresh process's first timings are noisy
    # (benchmarks/RESULTS.md, "auto's Linear margin"). Convolutions have a margin of their own (ConvGrads).
    ghost_margin = 2.0

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], a: Tensor, d: Union[Tensor, SharedOperand]):
        self._shared_d = d if isinstance(d, SharedOperand) else None
        d = d.tensor if isinstance(d, SharedOperand) else d
        self.weight = weight if weight.requires_grad else None
        self.bias = bias if bias is not None and bias.requires_grad else None
        super().__init__([p for p in (self.weight, self.bias) if p is not None], d.shape[0])
        self._a, self.d = a, d
        self._bias_sums: Optional[Tensor] = None
        self._dims_kept: Optional[tuple[int, int, int, int, int]] = None

    @property
    def a(self) -> Tensor:
        """The inputs ``[B, K, G, d, T]``."""
        return self._a

    @staticmethod
    def _rows(t: Tensor) -> Tensor:
        """``[B, K, G, c, T] -> [B, G, K*T, c]``: an example's rows (a view of a Linear's captured
        operands, whose positions come before channels; a copy of an unfolded input)."""
        b, k, g, c, positions = t.shape
        return t.permute(0, 2, 1, 4, 3).reshape(b, g, k * positions, c)

    def _bias_per_example(self) -> Tensor:
        """``[B, G*p]``, kept: the norms and the clipped sum both need it."""
        if self._bias_sums is None:

            def sums() -> Tensor:
                return self.d.sum(dim=(1, 4)).flatten(1)

            self._bias_sums = sums() if self._shared_d is None else self._shared_d.derived("bias sums", sums)
        return self._bias_sums

    def _dims(self) -> tuple[int, int, int, int, int]:
        """(B, G, R = K*T, d, p), kept: auto's plan asks for them a dozen times a step."""
        if self._dims_kept is None:
            b, k, g, p, positions = self.d.shape
            self._dims_kept = b, g, k * positions, self.weight_columns(), p
        return self._dims_kept

    def weight_columns(self) -> int:
        """d: the weight's input columns per group."""
        return self._a.shape[3]

    def materialize_cost(self) -> float:
        b, g, r, d, p = self._dims()
        return float(b * g * r * d * p)

    def ghost_cost(self) -> float:
        b, g, r, d, p = self._dims()
        return float(b * g * r * r * (d + p))

    def contract_cost(self) -> float:
        b, g, r, d, p = self._dims()
        return float(b * g * r * (d * p + min(d, p)))  # the GEMM and the pass that scales its smaller operand

    def ghost_bytes(self) -> float:
        b, g, r, _, _ = self._dims()
        return float(2 * b * g * r * r * self.d.element_size())  # the two Gram matrices

    def plan_key(self) -> Optional[tuple]:
        b, g, r, d, p = self._dims()
        return type(self).__name__, b.bit_length(), g, r, d, p, self.d.dtype, self.d.device.type

    def _weight_per_example(self) -> Tensor:
        return self._weight_gemm()

    def _weight_gemm(self, scale: float = 1.0, out: Optional[Tensor] = None) -> Tensor:
        """``[B*G, p, d]``: each example's weight gradient times ``scale``, written into ``out`` if given.
        One batched GEMM; the scale is its alpha, not a pass over the result."""
        b, g, r, d, p = self._dims()
        dt = self._rows(self.d).transpose(-1, -2).reshape(b * g, p, r)
        a = self._rows(self.a).reshape(b * g, r, d)
        out = dt.new_empty(b * g, p, d) if out is None else out
        return torch.baddbmm(out, dt, a, beta=0, alpha=scale, out=out)

    def scaled_per_example(self, scale: float, workspace: Optional[Workspace] = None) -> list[Tensor]:
        b, g, _, d, p = self._dims()
        shapes = [(b, *param.shape) for param in self.params]
        if workspace is None:
            out = [self.d.new_empty(shape) for shape in shapes]
        else:
            out = workspace.take(shapes, self.d.dtype, self.d.device)
        if self.weight is not None:
            self._weight_gemm(scale, out[0].view(b * g, p, d))
        if self.bias is not None:
            torch.mul(self._bias_per_example(), scale, out=out[-1].view(b, g * p))
        return out

    def _compute_per_example(self) -> list[Tensor]:
        out = []
        if self.weight is not None:
            out.append(self._weight_per_example().reshape(self.batch, *self.weight.shape))
        if self.bias is not None:
            out.append(self._bias_per_example())
        return out

    def _ghost_norm_sq(self) -> Tensor:
        total = self.a.new_zeros(self.batch)
        if self.weight is not None:
            a, d = self._rows(self.a), self._rows(self.d)

            def gram(x: Tensor) -> Tensor:
                return torch.matmul(x, x.transpose(-1, -2))

            gram_a = gram(a)
            gram_d = gram(d) if self._shared_d is None else self._shared_d.derived("gram", lambda: gram(d))
            total = total + (gram_a * gram_d).sum(dim=(1, 2, 3))
        if self.bias is not None:
            total = total + self._bias_per_example().pow(2).sum(1)
        return total

    def contract(self, weights: Tensor) -> list[Tensor]:
        out = []
        if self.weight is not None:
            out.append(self._weight_contract(weights).reshape(self.weight.shape))
        if self.bias is not None:
            out.append(torch.mv(self._bias_per_example().t(), weights.to(self.d.dtype)).reshape(self.bias.shape))
        return out

    def _weight_contract(self, weights: Tensor) -> Tensor:
        b, g, r, d, p = self._dims()
        # [G, p, B*R] @ [G, B*R, d]: the clipped sum is one GEMM per group. The weights scale whichever
        # operand is smaller (a LM head's inputs are a fraction of its output gradients).
        weights = weights.to(self.d.dtype).view(b, 1, 1, 1, 1)
        a, dw = (self.a * weights, self.d) if d < p else (self.a, self.d * weights)
        dw = dw.permute(2, 3, 0, 1, 4).reshape(g, p, b * r)
        a = a.permute(2, 0, 1, 4, 3).reshape(g, b * r, d)
        return torch.bmm(dw, a)

    def release(self) -> None:
        self._a = self.d = self._bias_sums = self._shared_d = None


Rule = Callable[[nn.Module, list[Call], int], LayerGrads]
"""``rule(module, calls, fold) -> LayerGrads``; ``calls[i].grads`` are already loss-scaled."""

RULES: dict[type, Rule] = {}


def saved_by_forward(call: Call, node_type: str, *names: str) -> Optional[tuple[Tensor, ...]]:
    """What the layer's forward saved for its backward (e.g. a norm's mean and reciprocal standard
    deviation), read from the autograd node of its output, so that a rule need not recompute it.

    Args:
        call: the layer's call; its ``grad_fns[0]`` is the output's node.
        node_type: the class name that node must have (e.g. ``"NativeLayerNormBackward0"``).
        names: the node's saved attributes, e.g. ``"_saved_result1"``.

    Returns:
        The saved tensors, or None where the output's node is another (a first layer's output is tapped)
        or its backward has run and freed them (a layer called more than once waits for all its calls).
    """
    node = call.grad_fns[0] if call.grad_fns else None
    if type(node).__name__ != node_type:
        return None
    try:
        return tuple(getattr(node, name) for name in names)
    except RuntimeError:  # "...saved tensors after they have already been freed"
        return None


def register_rule(*module_types: type) -> Callable[[Rule], Rule]:
    """Register ``rule`` for these module types, and for subclasses that keep what their ``forward``
    calls and reads (e.g. Opacus's ``RNNLinear``); other subclasses fall back to vmap (see :func:`rule_for`)."""

    def decorate(rule: Rule) -> Rule:
        for t in module_types:
            RULES[t] = rule
        return rule

    return decorate


# Methods of the layers with rules that their forward does not run: a subclass may redefine them.
_OUTSIDE_FORWARD = frozenset({"reset_parameters", "extra_repr", "_fill_padding_idx_with_zero", "from_pretrained"})


def _redefines_forward_path(module_type: type, base: type) -> bool:
    """Whether a class between ``module_type`` and ``base`` redefines something ``base``'s forward runs or reads:
    ``forward`` itself, a method it calls (``Conv2d._conv_forward``), a parameter or a setting (a ``weight``
    property computed from another parameter)."""
    read = {"weight", "bias"}
    for cls in base.__mro__:
        if cls is nn.Module:
            break
        read |= {n for n in vars(cls) if not n.startswith("__")} | set(inspect.get_annotations(cls))
    read -= _OUTSIDE_FORWARD
    return any(read & set(vars(cls)) for cls in module_type.__mro__[: module_type.__mro__.index(base)])


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The registered rule of ``module``'s type or of its nearest registered base, unless the module's class
    redefines what that base's forward runs or reads: the rule would then compute the gradient of another
    function (e.g. of a standardized weight, not of the parameter). None: the vmap fallback, exact for any
    forward."""
    for cls in type(module).__mro__:
        if cls in RULES:
            return None if _redefines_forward_path(type(module), cls) else RULES[cls]
    return None


def fold_rows(t: Tensor, fold: int) -> Tensor:
    """``[B*fold, *rest] -> [B, fold, *rest]``: the rows of one example are contiguous."""
    return t.reshape(t.shape[0] // fold, fold, *t.shape[1:])


def cat_positions(parts: list[Tensor]) -> Tensor:
    """Join a layer's calls along the positions dimension (the last); a single call is not copied."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's own (non-recursive) parameters that require a gradient.

    Opacus's ``RenameParamsMixin`` (its DP RNNs) registers its cells' parameters a second time
    under ``nn.LSTM``'s names; those aliases belong to the cells that use them, not to the parent.
    """
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if isinstance(module, RenameParamsMixin):
        inner = {id(p) for child in module.children() for p in child.parameters()}
        own = [(n, p) for n, p in own if id(p) not in inner]
    return own
