"""Gradient-inversion (reconstruction) attacks, batched over target images.

An honest-but-curious party that sees an example's gradient ``g*`` searches for the image whose
gradient matches it (Zhu et al.'s DLG; Geiping et al.'s inverting gradients). Here every target
gradient gets its own dummy image and all of them (times the restarts) are optimized together:
the model gradient of each dummy image comes from ``torch.func.vmap`` over ``torch.func.grad``,
and autograd differentiates the matching cost once more, with respect to the images.

Adam and SGD act elementwise, so a batched run gives each target the trajectory it would have
alone. L-BFGS does not: its curvature memory and step length are shared by the whole batch, so
batched L-BFGS solves the joint problem (whose minimizer is the same) along a different path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from privfast.grad_sample.engine import GradSampleModule, unwrapped
from privfast.grad_sample.layout import LayoutError

__all__ = [
    "PRESETS",
    "AttackConfig",
    "Reconstruction",
    "channel_stats",
    "gradient_distance",
    "normalize",
    "per_example_gradient_chunks",
    "per_example_gradients",
    "psnr",
    "reconstruct",
    "recover_labels",
    "ssim",
    "total_variation",
]


# ----------------------------------------------------------------------------------------
# Per-example gradients
# ----------------------------------------------------------------------------------------


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def per_example_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    chunk_size: Optional[int] = None,
) -> list[Tensor]:
    """Gradient of each example's cross-entropy loss with respect to the trainable parameters.

    The model runs in its current mode (put BatchNorm models in eval mode: a vmapped example is a
    batch of one). The result stays differentiable with respect to ``x`` when ``x`` requires grad,
    which is what the reconstruction objective needs: ``torch.func.vmap`` computes it then. Otherwise
    privfast's per-example engine does, several times faster on the CPU, falling back to vmap for a
    model it refuses.

    Args:
        model: the network; its parameters are read, not changed.
        x: inputs ``[N, *in_shape]``, as the model takes them (normalized).
        y: int64 labels ``[N]``.
        chunk_size: examples per batched pass (bounds memory); default all at once.

    Returns:
        ``[g_i]``, ``g_i`` of shape ``[N, *shape_i]``, one per trainable parameter in
        ``model.named_parameters()`` order.
    """
    chunks = list(per_example_gradient_chunks(model, x, y, chunk_size=chunk_size, copy=True))
    return chunks[0] if len(chunks) == 1 else [torch.cat(parts) for parts in zip(*chunks)]


def per_example_gradient_chunks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    chunk_size: Optional[int],
    copy: bool = False,
) -> Iterator[list[Tensor]]:
    """:func:`per_example_gradients` of ``x[lo:lo + chunk_size]``, for each ``lo`` in turn.

    For callers that reduce each chunk at once (memory bounded by ``chunk_size`` examples; None: one
    chunk). Where no graph back to ``x`` is wanted, privfast's per-example engine computes them: one plain
    batched forward and backward, and per layer a batched GEMM (as Opacus's hooks do). vmap's per-example
    kernels (a convolution's weight gradient as a grouped convolution over the examples) cost several
    times that on the CPU. Models the engine refuses (BatchNorm, torch's RNNs, a weight also used outside
    its layer), and a model a privacy engine wraps at the moment (wrapping it here would detach that
    wrapper; its hooks are off meanwhile), take vmap.

    Args:
        copy: False: a chunk's tensors may live in memory the next chunk overwrites.

    Yields:
        ``[g_i]``, ``g_i`` of shape ``[n, *shape_i]`` (``n`` the chunk's rows), as :func:`per_example_gradients`.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(
            "per-example gradients of a BatchNorm model need eval mode (each vmapped example is a batch "
            "of one): call model.eval(), or build the model with GroupNorm"
        )
    params = _trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    step = chunk_size or max(x.shape[0], 1)
    spans = [(lo, min(lo + step, x.shape[0])) for lo in range(0, max(x.shape[0], 1), step)]
    with unwrapped(model) as wrapped:
        graph = x.requires_grad and torch.is_grad_enabled()
        engine = None if wrapped or graph or x.shape[0] == 0 else _engine(model)
        done = 0
        if engine is not None:
            tensors = [p for p in model.parameters() if p.requires_grad]
            try:
                for lo, hi in spans:
                    try:
                        with torch.enable_grad():
                            F.cross_entropy(engine(x[lo:hi]), y[lo:hi], reduction="sum").backward()
                    except (LayoutError, RuntimeError):
                        # The engine refuses what it cannot tie to one example's rows (a layer applied to a table all
                        # examples share, a weight also used outside its layer); vmap, one example at a time, can.
                        break
                    grads = engine.per_sample_gradients(copy=copy)
                    engine.clear()
                    done += 1
                    yield [grads[p] for p in tensors]
            finally:
                engine.remove_hooks()
        if done < len(spans):
            per_example = _vmapped(model, params)
            for lo, hi in spans[done:]:
                yield list(per_example(params, x[lo:hi], y[lo:hi]).values())


def _vmapped(model: nn.Module, params: dict[str, Tensor]):
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))


def _engine(model: nn.Module) -> Optional[GradSampleModule]:
    """privfast's engine on ``model`` in materialize mode, or None where it refuses the model."""
    if isinstance(model, GradSampleModule):
        return None
    modes = [(m, m.training) for m in model.modules()]
    model.train()  # the engine's validator asks for training mode, which this wrapper does not need
    try:
        return GradSampleModule(model, mode="materialize", loss_reduction="sum", batch_first=True)
    except ValueError:  # a layer the engine refuses: vmap computes it
        return None
    finally:
        for m, training in modes:
            m.training = training


def recover_labels(model: nn.Module, grads: Sequence[Tensor]) -> Tensor:
    """iDLG label recovery: ``argmin_c sum_j dW_last[c, j]`` of each example's gradient.

    With cross-entropy and non-negative inputs to the last linear layer, only the true class's
    row of that layer's weight gradient is negative.

    Args:
        model: the network the gradients are of; its last ``nn.Linear`` is the classifier.
        grads: per-example gradients as :func:`per_example_gradients` returns them, ``[T, *shape_i]``.

    Returns:
        int64 labels ``[T]``.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("iDLG needs a model whose last layer is an nn.Linear classifier")
    trainable = [p for p in model.parameters() if p.requires_grad]
    weight = linears[-1].weight
    position = next((i for i, p in enumerate(trainable) if p is weight), None)
    if position is None or len(grads) != len(trainable):
        raise ValueError("grads do not match the model's trainable parameters (or its classifier is frozen)")
    return grads[position].sum(-1).argmin(-1)


# ----------------------------------------------------------------------------------------
# Costs and image metrics
# ----------------------------------------------------------------------------------------

_COSTS = ("cosine", "l2", "l1")


def gradient_distance(grads: Sequence[Tensor], targets: Sequence[Tensor], cost: str) -> Tensor:
    """Differentiable distance between each row's gradient and its target gradient.

    Args:
        grads: ``[T, *shape_i]`` per tensor, e.g. the dummy images' gradients.
        targets: ``[T, *shape_i]`` per tensor, the observed gradients.
        cost: ``"cosine"`` (``1 - cos`` over the concatenation of all tensors, inverting
            gradients), ``"l2"`` (``sum_i ||g_i - g*_i||^2``, DLG) or ``"l1"`` (``sum_i |g_i - g*_i|_1``).

    Returns:
        ``[T]``.
    """
    if cost not in _COSTS:
        raise ValueError(f"cost must be one of {_COSTS}, got {cost!r}")
    if len(grads) != len(targets):
        raise ValueError(f"grads has {len(grads)} tensors but targets has {len(targets)}")
    flat = [(g.flatten(1), t.flatten(1)) for g, t in zip(grads, targets)]
    if cost == "l2":
        return sum((g - t).pow(2).sum(1) for g, t in flat)
    if cost == "l1":
        return sum((g - t).abs().sum(1) for g, t in flat)
    dot = sum((g * t).sum(1) for g, t in flat)
    norms = sum(g.pow(2).sum(1) for g, _ in flat).sqrt() * sum(t.pow(2).sum(1) for _, t in flat).sqrt()
    return 1 - dot / norms.clamp_min(torch.finfo(dot.dtype).tiny)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation ``mean|dx| + mean|dy|`` of each image ``[T, C, H, W]`` -> ``[T]``."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
    return dx + dy


def _check_pair(x: Tensor, reference: Tensor) -> None:
    if x.shape != reference.shape or x.dim() != 4:
        raise ValueError(
            f"expected two image batches [N, C, H, W] of one shape, got {tuple(x.shape)} and {tuple(reference.shape)}"
        )


def psnr(x: Tensor, reference: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio ``10 log10(range^2 / MSE)`` per image, in dB.

    Args:
        x, reference: images ``[N, C, H, W]`` on the de-normalized scale (e.g. [0, 1]).
        data_range: the value range (1 for [0, 1] images).

    Returns:
        ``[N]``; ``inf`` for identical images.
    """
    _check_pair(x, reference)
    mse = (x - reference).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(x: Tensor, reference: Tensor, *, data_range: float = 1.0, window: int = 7, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004) per image, averaged over channels and positions.

    A Gaussian window (``sigma``) of side ``window`` (shrunk to the image side, kept odd) over the
    valid positions, with ``K1 = 0.01`` and ``K2 = 0.03``.

    Args:
        x, reference: images ``[N, C, H, W]``.
        data_range: the value range (1 for [0, 1] images).
        window: side of the window (7 suits 8x8 digits; the paper's 11 suits larger images).
        sigma: standard deviation of the Gaussian window, in pixels.

    Returns:
        ``[N]`` in [-1, 1]; 1 for identical images.
    """
    _check_pair(x, reference)
    size = min(window, x.shape[2], x.shape[3])
    size -= 1 - size % 2
    coords = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, size, size)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, kernel, groups=x.shape[1])

    mu_x, mu_r = blur(x), blur(reference)
    var_x = blur(x * x) - mu_x**2
    var_r = blur(reference * reference) - mu_r**2
    cov = blur(x * reference) - mu_x * mu_r
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_r**2 + c1) * (var_x + var_r + c2))
    return index.flatten(1).mean(1)


# ----------------------------------------------------------------------------------------
# The attack
# ----------------------------------------------------------------------------------------

_OPTIMIZERS = ("adam", "sgd", "lbfgs")


@dataclass(frozen=True)
class AttackConfig:
    """Settings of a gradient-matching attack (defaults: inverting gradients, Adam+Cosine).

    Attributes:
        cost: ``"cosine"``, ``"l2"`` or ``"l1"`` (see :func:`gradient_distance`).
        optimizer: ``"adam"``, ``"sgd"`` (Nesterov momentum 0.9) or ``"lbfgs"`` (torch's, up to
            20 inner iterations per step, with a strong-Wolfe line search: without one, a unit
            step overshoots the cosine cost, which is scale-free).
        lr: learning rate.
        iterations: optimizer steps.
        signed: step on the sign of the image gradient (inverting gradients' signed Adam).
        tv: weight of the total-variation prior.
        boxed: keep the image inside the valid box (the normalized image of [0, 1]).
        lr_decay: multiply the learning rate by 0.1 at 3/8, 5/8 and 7/8 of the run.
        restarts: independent random starts per target; the one with the lowest final cost is kept.
    """

    cost: str = "cosine"
    optimizer: str = "adam"
    lr: float = 0.1
    iterations: int = 4800
    signed: bool = True
    tv: float = 1e-4
    boxed: bool = True
    lr_decay: bool = True
    restarts: int = 1

    def __post_init__(self):
        if self.cost not in _COSTS:
            raise ValueError(f"cost must be one of {_COSTS}, got {self.cost!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.iterations < 1 or self.restarts < 1:
            raise ValueError(f"iterations and restarts must be >= 1, got {self.iterations} and {self.restarts}")
        if not self.lr > 0 or self.tv < 0:
            raise ValueError(f"lr must be > 0 and tv >= 0, got lr={self.lr}, tv={self.tv}")


PRESETS: dict[str, AttackConfig] = {
    # The six attacks ATS evaluates ("optimizer+distance"), as inversefed configures them.
    "lbfgs_l2": AttackConfig(
        cost="l2", optimizer="lbfgs", lr=1.0, iterations=300, signed=False, tv=0.0, lr_decay=False
    ),
    "adam_cosine": AttackConfig(),
    "lbfgs_cosine": AttackConfig(optimizer="lbfgs", lr=1.0, iterations=300, signed=False, lr_decay=False),
    "adam_l1": AttackConfig(cost="l1"),
    "adam_l2": AttackConfig(cost="l2"),
    "sgd_cosine": AttackConfig(optimizer="sgd", lr=0.01),
}
PRESETS["dlg"] = PRESETS["lbfgs_l2"]
PRESETS["inverting_gradients"] = PRESETS["adam_cosine"]


class Reconstruction(NamedTuple):
    """Result of :func:`reconstruct`.

    Attributes:
        images: ``[T, C, H, W]`` reconstructions, de-normalized to [0, 1].
        labels: ``[T]`` labels used (given or recovered by iDLG).
        cost: ``[T]`` final gradient distance of the kept restart.
    """

    images: Tensor
    labels: Tensor
    cost: Tensor


Stats = Union[float, Sequence[float], Tensor, None]
"""A data-normalization statistic: one value, one per channel, or None (mean 0, std 1)."""


def channel_stats(mean: Stats, std: Stats, like: Tensor) -> tuple[Tensor, Tensor]:
    """``mean`` and ``std`` as ``[1, C, 1, 1]`` tensors (``C`` may be 1) in ``like``'s dtype and device."""
    mean_t = torch.as_tensor(0.0 if mean is None else mean, dtype=like.dtype, device=like.device)
    std_t = torch.as_tensor(1.0 if std is None else std, dtype=like.dtype, device=like.device)
    return mean_t.reshape(1, -1, 1, 1), std_t.reshape(1, -1, 1, 1)


def normalize(x: Tensor, mean: Stats = None, std: Stats = None) -> Tensor:
    """``(x - mean) / std`` for images ``[N, C, H, W]`` with scalar or per-channel statistics; None means 0 and 1."""
    if mean is None and std is None:
        return x
    mean_t, std_t = channel_stats(mean, std, x)
    return (x - mean_t) / std_t


def reconstruct(
    model: nn.Module,
    target_grads: Sequence[Tensor],
    labels: Optional[Tensor] = None,
    *,
    shape: Sequence[int],
    config: Union[str, AttackConfig] = "adam_cosine",
    mean: Stats = None,
    std: Stats = None,
    start: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
    **overrides,
) -> Reconstruction:
    """Reconstruct one image per target gradient, all targets (and restarts) in one optimization.

    Minimizes ``distance(grad(x_t), g*_t) + tv * TV(x_t)`` over the dummy images ``x_t``
    (normalized space, started from ``randn``), for every target ``t`` at once.

    Args:
        model: the network the gradients are of (its current mode is used).
        target_grads: observed gradients, ``[T, *shape_i]`` per trainable parameter (one row per
            target, e.g. :func:`per_example_gradients` of the victim's examples).
        labels: int64 ``[T]``; default: recovered from the gradients by iDLG (:func:`recover_labels`).
        shape: ``(C, H, W)`` of one image.
        config: a preset name (``"adam_cosine"``, ``"lbfgs_l2"``/``"dlg"``, ``"lbfgs_cosine"``,
            ``"adam_l1"``, ``"adam_l2"``, ``"sgd_cosine"``) or an :class:`AttackConfig`.
        mean, std: the data normalization (scalars or per channel); default none (0 and 1).
        start: starting images in normalized space, ``[restarts * T, C, H, W]`` (restart r of
            target t in row ``r * T + t``); default ``randn``.
        generator: source of the random starts.
        progress: show a progress bar over the iterations.
        **overrides: fields of :class:`AttackConfig` to change, e.g. ``iterations=200``.

    Returns:
        A :class:`Reconstruction` with images de-normalized to [0, 1].
    """
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown attack preset {config!r}; expected one of {sorted(PRESETS)}")
        config = PRESETS[config]
    config = dataclasses.replace(config, **overrides)
    target_grads = [t.detach() for t in target_grads]
    n_targets = target_grads[0].shape[0]
    params = _trainable(model)
    if len(target_grads) != len(params):
        raise ValueError(f"target_grads has {len(target_grads)} tensors but the model has {len(params)} trainable ones")
    for t, (name, p) in zip(target_grads, params.items()):
        if t.shape[1:] != p.shape or t.shape[0] != n_targets:
            raise ValueError(
                f"target gradient for {name} is {tuple(t.shape)}; expected [T={n_targets}, *{tuple(p.shape)}]"
            )
    if labels is None:
        labels = recover_labels(model, target_grads)
    if labels.shape != (n_targets,):
        raise ValueError(f"labels must be [T={n_targets}], got {tuple(labels.shape)}")

    like = target_grads[0]
    mean_t, std_t = channel_stats(mean, std, like)
    low, high = (0 - mean_t) / std_t, (1 - mean_t) / std_t
    rows = config.restarts * n_targets  # restart r of target t is row r * T + t
    if start is None:
        start = torch.randn((rows, *shape), generator=generator, dtype=like.dtype)
    elif start.shape != (rows, *shape):
        raise ValueError(f"start must be [restarts * T, *shape] = {[rows, *shape]}, got {list(start.shape)}")
    x = start.detach().to(like.device, like.dtype).clone().requires_grad_(True)
    targets = [t.repeat(config.restarts, *([1] * (t.dim() - 1))) for t in target_grads]
    row_labels = labels.to(like.device).repeat(config.restarts)

    def distance() -> Tensor:
        return gradient_distance(per_example_gradients(model, x, row_labels), targets, config.cost)

    def closure() -> Tensor:
        optimizer.zero_grad()
        objective = (distance() + config.tv * total_variation(x)).sum()
        objective.backward()
        if config.signed:
            x.grad.sign_()
        return objective

    if config.optimizer == "adam":
        optimizer = torch.optim.Adam([x], lr=config.lr)
    elif config.optimizer == "sgd":
        optimizer = torch.optim.SGD([x], lr=config.lr, momentum=0.9, nesterov=True)
    else:
        optimizer = torch.optim.LBFGS([x], lr=config.lr, line_search_fn="strong_wolfe")
    milestones = [int(config.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if config.lr_decay else []
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    for _ in tqdm(
        range(config.iterations), desc=f"reconstruct {n_targets} x {config.restarts}", disable=not progress, leave=False
    ):
        optimizer.step(closure)
        scheduler.step()
        if config.boxed:
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, high), low))

    with torch.no_grad():
        final = distance().detach().view(config.restarts, n_targets)
    best = final.nan_to_num(float("inf")).argmin(0)
    columns = torch.arange(n_targets, device=best.device)
    chosen = x.detach().view(config.restarts, n_targets, *shape)[best, columns]
    return Reconstruction((chosen * std_t + mean_t).clamp(0, 1), labels, final[best, columns])
