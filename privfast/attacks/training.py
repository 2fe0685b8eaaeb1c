"""Plain (non-private) training of target and shadow models.

The attacks need models trained by a known recipe: the target of an experiment, the shadow
models of LiRA and of Salem et al.'s attack. :func:`train_classifier` trains one model with Adam
(the optimizer of Kaya & Dumitraş, "When Does Data Augmentation Help With Membership Inference
Attacks?", ICML 2021); :func:`train_shadow_models` trains many with the same recipe at once,
stacked with :func:`torch.func.stack_module_state` and run under :func:`torch.func.vmap`, so
16 shadow models cost one batched pass per step instead of 16.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from privfast.attacks.common import EVAL_BATCH, check_data, predict_logits

__all__ = ["ShadowModels", "train_classifier", "train_shadow_models"]


def _adam(params: Iterable[Tensor], *, lr: float, weight_decay: float) -> torch.optim.Adam:
    """The recipe's optimizer. The fused kernel updates each (stacked) tensor in one pass; on 16 stacked
    CPU models the per-op loop made Adam half of a step (figures: benchmarks/RESULTS.md, "Notes moved
    from docstrings")."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


def _epoch_order(index: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Each row of ``index [S, n]`` shuffled on its own: the example order of one epoch per model."""
    keys = torch.rand(index.shape, generator=generator)
    return index.gather(1, keys.argsort(1))


def _train_loop(
    step: Callable[[Tensor], None],
    index: Tensor,
    *,
    epochs: int,
    batch_size: int,
    generator: Optional[torch.Generator],
    progress: bool,
    desc: str,
    end_of_epoch: Callable[[int], None] = lambda epoch: None,
) -> None:
    """Run ``step(batch_index [S, b])`` over ``epochs`` shuffled passes of ``index [S, n]``."""
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got epochs={epochs}, batch_size={batch_size}")
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        order = _epoch_order(index, generator)
        for start in range(0, order.shape[1], batch_size):
            step(order[:, start : start + batch_size])
        end_of_epoch(epoch)


def _through(
    mechanism: Optional[Callable],
    xb: Tensor,
    yb: Tensor,
    num_classes: Optional[int],
    generator: Optional[torch.Generator],
) -> tuple[Tensor, Tensor]:
    """A batch and its cross-entropy targets, passed through ``mechanism`` (probability targets) if any."""
    if mechanism is None:
        return xb, yb
    return mechanism(xb, F.one_hot(yb, num_classes).to(xb.dtype), generator=generator)


def _transform_grads(params: list[Tensor], transform: Callable[[list[Tensor]], list[Tensor]]) -> None:
    """Replace the gradients of ``params`` (those that have one) by ``transform`` of them."""
    with_grad = [p for p in params if p.grad is not None]
    new = list(transform([p.grad for p in with_grad]))
    if len(new) != len(with_grad) or any(g.shape != p.shape for g, p in zip(new, with_grad)):
        raise ValueError(
            f"grad_transform must return {len(with_grad)} tensors shaped like its input, got "
            f"{[tuple(g.shape) for g in new]} for {[tuple(p.shape) for p in with_grad]}"
        )
    for p, g in zip(with_grad, new):
        p.grad = g.to(dtype=p.dtype, device=p.device)


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    mechanism: Optional[Callable] = None,
    callbacks: Iterable[Callable[[nn.Module, int], object]] = (),
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    grad_transform: Optional[Callable[[list[Tensor]], list[Tensor]]] = None,
) -> nn.Module:
    """Train ``model`` in place with Adam on cross-entropy, optionally through an augmentation mechanism.

    Args:
        model: a classifier ``[B, ...] -> [B, K]``.
        x: inputs ``[N, ...]``.
        y: int64 labels ``[N]``.
        epochs: passes over the data.
        lr: Adam learning rate.
        batch_size: examples per step (the last step of an epoch may be smaller).
        weight_decay: L2 coefficient (Kaya & Dumitraş use 1e-6).
        mechanism: a :class:`privfast.augment.mechanisms.Mechanism` applied to every batch, or None.
        callbacks: called as ``callback(model, epoch)`` after each epoch (e.g.
            :class:`privfast.audit.MembershipAudit`); the model is left in train mode after.
        generator: source of the shuffling and of the mechanism's draws.
        progress: show a progress bar over epochs.
        grad_transform: called every step, after the backward pass and before the optimizer step, on
            the list of the parameters' gradients (those that have one, in ``model.parameters()``
            order); the tensors it returns (same number and shapes) replace them. It simulates a
            one-client federated SGD in which the server steps on what a defended client shares,
            e.g. ``lambda g: privfast.federated.add_noise(g, kind="gaussian", scale=1e-3)``.
            None steps on the raw gradients.

    Returns:
        ``model``, trained.

    Raises:
        ValueError: if ``grad_transform`` returns a different number of tensors or other shapes.
    """
    check_data(x, y)
    device = next(model.parameters()).device
    optimizer = _adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    params = list(model.parameters())
    callbacks = list(callbacks)
    num_classes = predict_logits(model, x[:1]).shape[1] if mechanism is not None else None

    def step(batch: Tensor) -> None:
        xb, targets = _through(mechanism, x[batch[0]].to(device), y[batch[0]].to(device), num_classes, generator)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), targets).backward()
        if grad_transform is not None:
            _transform_grads(params, grad_transform)
        optimizer.step()

    def end_of_epoch(epoch: int) -> None:
        for callback in callbacks:
            callback(model, epoch)
        model.train()

    model.train()
    _train_loop(
        step,
        torch.arange(len(y))[None],
        epochs=epochs,
        batch_size=batch_size,
        generator=generator,
        progress=progress,
        desc="train",
        end_of_epoch=end_of_epoch,
    )
    return model


@dataclass
class ShadowModels:
    """Shadow models trained together: stacked parameters and which examples each one saw.

    Attributes:
        base: a copy of the architecture on the ``meta`` device (holds no weights), for ``functional_call``.
        params: name -> stacked parameter ``[S, *shape]``.
        buffers: name -> stacked buffer ``[S, *shape]``.
        in_mask: bool ``[S, N]``: shadow s was trained on example n of the pool.
    """

    base: nn.Module
    params: dict
    buffers: dict
    in_mask: Tensor

    @property
    def num_models(self) -> int:
        return self.in_mask.shape[0]

    def _forward(self, params: dict, buffers: dict, x: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def logits(self, x: Tensor, *, batch_size: int = EVAL_BATCH) -> Tensor:
        """Logits ``[S, N, K]`` of every shadow model on the same inputs ``x [N, ...]``, on the models' device."""
        forward = vmap(self._forward, in_dims=(0, 0, None), randomness="different")
        device = next(iter(self.params.values())).device
        with torch.no_grad():
            self.base.eval()
            return torch.cat(
                [forward(self.params, self.buffers, chunk.to(device)) for chunk in x.split(batch_size)], dim=1
            )


def _half_splits(n_shadows: int, n: int, generator: Optional[torch.Generator]) -> Tensor:
    """``[S, n]`` membership: shadows 2j and 2j+1 train on a random half of the pool and on its complement.

    So every shadow sees half the data and every example is IN for exactly half the shadows,
    which the online attack needs (the same IN and OUT counts per example).
    """
    ranks = torch.rand(n_shadows // 2, n, generator=generator).argsort(1).argsort(1)
    first_half = ranks < n // 2
    return torch.stack([first_half, ~first_half], 1).reshape(n_shadows, n)


def train_shadow_models(
    make_model: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    *,
    n_shadows: int = 16,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    mechanism: Optional[Callable] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
) -> ShadowModels:
    """Train ``n_shadows`` models, each on a random half of the pool ``(x, y)``, together in one vmapped pass.

    The recipe is :func:`train_classifier`'s (Adam, cross-entropy, shuffled batches); Adam on
    stacked parameters is exactly independent Adam per model, since it acts element by element.
    The shadow of a half with one example fewer (odd N) sees one example twice per epoch, so that
    all shadows step in lockstep.

    Args:
        make_model: builds a fresh, randomly initialized model (called ``n_shadows`` times).
        x: pool inputs ``[N, ...]``.
        y: pool labels ``[N]``.
        n_shadows: number of models S, even and >= 2.
        epochs, lr, batch_size, weight_decay: the training recipe, as in :func:`train_classifier`.
        mechanism: the target's augmentation, a :class:`privfast.augment.mechanisms.Mechanism` that
            does not mix examples (mixing the S models' batches would leak OUT examples into a shadow).
        generator: source of the splits, initializations, shuffling and augmentation draws.
        progress: show a progress bar over epochs.

    Returns:
        The trained :class:`ShadowModels`.

    Note:
        On CPU with glibc's malloc, every step frees the S models' stacked activations (10-20 MB
        for 16 small CNNs), which glibc hands back to the kernel and the next step faults back in,
        a sizeable share of a small model's run (benchmarks/RESULTS.md, "LiRA shadow training", has
        the page-fault counts and timings). A process-wide allocator setting removes
        it, e.g. ``MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000`` in the
        environment (both are needed), or jemalloc / tcmalloc preloaded as PyTorch recommends for CPU.
    """
    check_data(x, y)
    if n_shadows < 2 or n_shadows % 2:
        raise ValueError(f"n_shadows must be even and >= 2 (halves come in complementary pairs), got {n_shadows}")
    if len(y) < 2:
        raise ValueError(f"the pool needs at least 2 examples to be halved, got {len(y)}")
    if getattr(mechanism, "mixes_examples", False):
        raise ValueError(
            f"{mechanism!r} mixes examples; the shadows' batches are augmented together, so it would "
            "mix one shadow's examples into another's"
        )
    in_mask = _half_splits(n_shadows, len(y), generator)
    # Each row lists its IN examples first; wrapping around fills the shorter halves to a common length.
    counts = in_mask.sum(1, keepdim=True)
    in_first = (~in_mask).to(torch.int8).argsort(dim=1, stable=True)
    width = int(counts.max())
    index = in_first.gather(1, torch.arange(width)[None] % counts)

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):  # seeded initializations without touching the caller's RNG
        torch.manual_seed(seed)
        models = [make_model() for _ in range(n_shadows)]
    device = next(models[0].parameters()).device
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    shadows = ShadowModels(base, params, buffers, in_mask)
    optimizer = _adam(params.values(), lr=lr, weight_decay=weight_decay)

    batched_forward = vmap(shadows._forward, randomness="different")

    num_classes = shadows.logits(x[:1]).shape[-1] if mechanism is not None else None

    def step(batch: Tensor) -> None:
        xb, targets = _through(
            mechanism, x[batch.flatten()].to(device), y[batch.flatten()].to(device), num_classes, generator
        )
        optimizer.zero_grad(set_to_none=True)
        logits = batched_forward(params, buffers, xb.view(*batch.shape, *xb.shape[1:]))  # [S, b, K]
        # The loss stays outside vmap, where cross-entropy is one fused op over all S * b rows.
        # Summing over models keeps each model's gradient its own: model s's loss depends only on slice s.
        losses = F.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
        losses.view(batch.shape).mean(1).sum().backward()
        optimizer.step()

    base.train()
    _train_loop(
        step,
        index,
        epochs=epochs,
        batch_size=batch_size,
        generator=generator,
        progress=progress,
        desc=f"{n_shadows} shadow models",
    )
    for tensor in params.values():
        tensor.requires_grad_(False)
    return shadows
