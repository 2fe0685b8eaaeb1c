"""Which dimension of each layer's tensors holds the examples, and the guard that checks it.

A layer sees its input either batch-first (``[N, T, ...]``) or time-first (``[T, N, ...]``),
where ``N`` is the number of rows of the batch (``B*K``: each example's K rows contiguous). The
engine never guesses it from the data alone; each layer's example dimension comes from:

1. the layer's type where torch fixes it: convolutions and norm layers over channels always take
   ``[N, C, ...]``, an ``EmbeddingBag`` ``[N, L]`` ids (one bag per row); Opacus's ``RNNLinear``
   (the cells of ``DPLSTM``, ``DPGRU``, ``DPRNN``) is called once per time step on ``[N, D]``;
2. otherwise the nearest enclosing module (the layer itself included) that declares a layout:
   a ``batch_first`` attribute (``DPMultiheadAttention``, ``SequenceBias``, the DP RNNs, ...), or
   the attention of a ``TransformerEncoderLayer`` / ``TransformerDecoderLayer``;
3. otherwise the model's ``batch_first`` (``GradSampleModule(batch_first=...)``, default True).

For every call the guard then checks that this dimension has ``N`` entries, and refuses a call
where it cannot tell the layouts apart (both leading dimensions of size ``N``) unless the
layout was given explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from opacus.layers.dp_rnn import RNNLinear
from torch import Tensor, nn

# Layer types whose example dimension torch fixes at 0, whatever the model's layout.
_BATCH_FIRST_TYPES = (
    nn.modules.conv._ConvNd,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.batchnorm._NormBase,
    nn.LocalResponseNorm,
    nn.EmbeddingBag,
)


class LayoutError(ValueError):
    """A layer call whose example dimension is not where, or not the size, the engine expects."""


@dataclass(frozen=True)
class Layout:
    """The example dimension of one layer's tensors and where that came from (for messages)."""

    dim: int
    source: str
    explicit: bool  # declared by the layer's type, a module attribute or the user, not the default

    def describe(self) -> str:
        return f"dim {self.dim} ({self.source})"


# Layer types whose tensors end in their features (a 2-D one is [N, C] whatever the model's layout).
_FEATURES_LAST = (nn.Linear, nn.LayerNorm, nn.RMSNorm)


def _declared(module: nn.Module) -> Optional[bool]:
    """``batch_first`` as the module declares it, or None."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        value = getattr(module.self_attn, "batch_first", None)
    else:
        value = getattr(module, "batch_first", None)
    return value if isinstance(value, bool) else None


def layer_layout(root: nn.Module, name: str, module: nn.Module, *, batch_first: bool, explicit: bool) -> Layout:
    """The example dimension of layer ``name`` of ``root`` (see the module docstring).

    Args:
        root: the model.
        name: the layer's name in ``root.named_modules()``.
        module: the layer.
        batch_first: the model's layout.
        explicit: whether the user gave ``batch_first`` (else it is the default).
    """
    if isinstance(module, RNNLinear):
        return Layout(0, "a recurrent cell, called once per time step on [N, D]", True)
    if isinstance(module, _BATCH_FIRST_TYPES):
        return Layout(0, f"nn.{type(module).__name__} always takes [N, C, ...]", True)
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        prefix = ".".join(parts[:depth])
        owner = root.get_submodule(prefix) if prefix else root
        declared = _declared(owner)
        if declared is not None:
            where = f"{prefix!r}" if prefix else "the model"
            return Layout(0 if declared else 1, f"batch_first={declared} of {where}", True)
    return Layout(0 if batch_first else 1, f"the engine's batch_first={batch_first}", explicit)


def model_rows(args: tuple, kwargs: dict, *, batch_first: bool) -> Optional[int]:
    """N, the rows of the batch, from the model's first tensor (or PackedSequence) input; None if none."""
    from torch.nn.utils.rnn import PackedSequence

    for value in (*args, *kwargs.values()):
        if isinstance(value, PackedSequence):
            return int(value.batch_sizes[0]) if len(value.batch_sizes) else 0
        if isinstance(value, Tensor):
            dim = 0 if batch_first else 1
            if value.dim() <= dim:
                raise LayoutError(
                    f"the model's input has shape {list(value.shape)}, which has no dimension {dim} to hold "
                    f"the examples (batch_first={batch_first}); pass the batch as [N, ...] with batch_first=True "
                    "or [T, N, ...] with batch_first=False"
                )
            return int(value.shape[dim])
    return None


def check_call(layer_name: str, module: nn.Module, layout: Layout, rows: int, what: str, t: Tensor) -> None:
    """Raise a :class:`LayoutError` unless ``t``'s example dimension (``layout.dim``) has ``rows`` entries
    and can be told apart from the other leading dimension.

    Args:
        layer_name, module: the layer, for the message.
        layout: the layer's example dimension.
        rows: N, the rows the engine expects.
        what: "input" or "output gradient", for the message.
        t: the tensor.
    """
    dim = layout.dim
    shape = t.shape
    # A Linear's or a norm's [A, C] has its features at dim 1: a time-first layout finds no examples there (one
    # that did would be C = N by coincidence, and clip features).
    featured = dim == 1 and t.dim() == 2 and isinstance(module, _FEATURES_LAST)
    if (
        t.dim() > dim
        and shape[dim] == rows
        and not featured
        and (layout.explicit or t.dim() < 2 or shape[0] != shape[1])
    ):
        return  # the common case, checked before anything is built for a message (this runs on every call)
    shape = list(shape)
    label = f"layer {layer_name!r} ({type(module).__name__})"
    if featured:
        raise LayoutError(
            f"{label} got an {what} of shape {shape}: dimension 1 of a 2-D {type(module).__name__} tensor is its "
            f"features, but the layer's layout is time-first ([T, N, ...], examples at {layout.describe()}). A layer "
            "that sees [N, C] in a time-first model (e.g. a head after pooling over time) needs its own layout: set "
            f"`batch_first = True` on it (`model.{layer_name}.batch_first = True`) or on a module around it, before "
            "make_private / GradSampleModule."
        )
    if t.dim() <= dim or shape[dim] != rows:
        hint = ""
        other = 1 - dim
        if t.dim() > other and shape[other] == rows:
            hint = (
                f" Dimension {other} has {rows} entries: if this layer sees "
                f"{'time-first' if other == 1 else 'batch-first'} tensors, pass batch_first="
                f"{other == 0} to make_private / GradSampleModule."
            )
        elif rows not in shape:
            hint = (
                " No dimension has that size: a layer applied to something other than the batch (e.g. positions "
                "shared by all examples, or rows flattened across examples) has no per-example gradient; apply it to "
                "[N, ...] rows (e.g. positions expanded to [N, T])."
            )
        raise LayoutError(
            f"{label} got an {what} of shape {shape}; the engine expects the batch's {rows} rows at "
            f"{layout.describe()}. Clipping anything else would not bound each example's contribution.{hint}"
        )
    if not layout.explicit and t.dim() >= 2 and shape[0] == shape[1] == rows and _has_positions(t):
        raise LayoutError(
            f"{label} got an {what} of shape {shape}: both leading dimensions have the batch's {rows} rows, "
            "so the engine cannot tell which holds the examples. Pass batch_first=True ([N, T, ...]) or "
            "batch_first=False ([T, N, ...]) to make_private / GradSampleModule explicitly."
        )


def _has_positions(t: Tensor) -> bool:
    """Whether dimension 1 of ``t`` can be a position rather than a feature: for float inputs of
    layers whose last dimension is the features, from 3 dimensions on; for integer ids, from 2."""
    return t.dim() >= 2 if not t.is_floating_point() else t.dim() >= 3
