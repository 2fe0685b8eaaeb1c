"""ATS's two cheap scores of a transformation policy (Gao et al., CVPR 2021, Sections 4.2-4.3).

- :func:`privacy_score` (S_pri): how steadily the gradient similarity grows along the straight
  line from a random start to the transformed image; a flat curve (low area) means a
  gradient-matching attacker gets no direction to follow. Lower is more private.
- :func:`accuracy_score` (S_acc): a training-free proxy of the accuracy a model trained on
  transformed data reaches, from the eigenvalues of the correlation of input Jacobians at random
  initialization (Mellor et al.'s NASWOT score). Higher is better.

Both run batched: S_pri computes all N * (bins + 1) per-example gradients in chunks (privfast's
per-example engine, or vmap where the engine refuses the model) and compares them with
:func:`privfast.ops.gradsim`; S_acc gets the Jacobians of all batches from one
backward pass.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from privfast import ops
from privfast.attacks.common import eval_mode
from privfast.attacks.reconstruction import (  # normalize: re-exported
    Stats,
    normalize,
    per_example_gradient_chunks,
    per_example_gradients,
)
from privfast.augment.ats_library import Policy
from privfast.augment.mechanisms import RandomCrop

__all__ = ["accuracy_score", "crop_and_flip", "normalize", "privacy_score"]

PolicyLike = Union[Policy, str, None]


def _as_policy(policy: PolicyLike) -> Optional[Policy]:
    return Policy(policy) if isinstance(policy, str) else policy


def _check_batch(x: Tensor, y: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be float images [N, C, H, W] in [0, 1], got {getattr(x, 'shape', type(x))}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must be int64 labels [N={x.shape[0]}], got {tuple(y.shape)}")


def gradsim_curve_area(
    model: nn.Module,
    targets: Tensor,
    y: Tensor,
    start: Tensor,
    *,
    bins: int = 20,
    per_layer: bool = True,
    chunk_size: int = 512,
    progress: bool = False,
) -> Tensor:
    """Trapezoid area under GradSim along ``x_i = (i/bins) target + (1 - i/bins) start``, i = 0..bins.

    The inputs are already transformed and normalized: this is S_pri's kernel, shared by
    :func:`privacy_score` and the policy search (which scores many policies in one call).

    Args:
        model: the semi-trained network, in eval mode.
        targets: normalized transformed images ``[N, C, H, W]``.
        y: labels ``[N]``.
        start: normalized starting images ``[N, C, H, W]``.
        bins: intervals of the path (``bins + 1`` points, the last being the target itself).
        per_layer: mean of per-tensor cosines (ATS) rather than one whole-model cosine.
        chunk_size: gradients computed and compared per batched pass.
        progress: show a progress bar over the chunks.

    Returns:
        ``[N]`` scores.
    """
    n = targets.shape[0]
    refs = per_example_gradients(model, targets, y, chunk_size=chunk_size)
    weights = torch.arange(bins, dtype=targets.dtype, device=targets.device) / bins
    # Points i < bins of image n are rows n * bins + i; point ``bins`` is the target, whose cosine is 1.
    points = (
        weights.view(1, bins, 1, 1, 1) * targets.unsqueeze(1)
        + (1 - weights).view(1, bins, 1, 1, 1) * start.unsqueeze(1)
    ).flatten(0, 1)
    labels = y.repeat_interleave(bins)
    index = torch.arange(n, device=targets.device).repeat_interleave(bins)
    cosines = torch.empty(n * bins, dtype=targets.dtype, device=targets.device)
    chunks = per_example_gradient_chunks(model, points, labels, chunk_size=chunk_size)
    lo = 0
    # closing: the engine leaves the model as soon as the loop ends, even on an error
    with contextlib.closing(chunks), tqdm(total=n * bins, desc="S_pri", disable=not progress, leave=False) as bar:
        for grads in chunks:
            hi = lo + grads[0].shape[0]
            cosines[lo:hi] = ops.gradsim(grads, refs, index=index[lo:hi], per_layer=per_layer)
            bar.update(hi - lo)
            lo = hi
    curve = torch.cat([cosines.view(n, bins), cosines.new_ones(n, 1)], 1)
    return torch.trapezoid(curve, dx=1.0 / bins, dim=1)


def privacy_score(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    policy: PolicyLike = None,
    start: Optional[Tensor] = None,
    bins: int = 20,
    per_layer: bool = True,
    mean: Stats = None,
    std: Stats = None,
    chunk_size: int = 512,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    augment: bool = False,
) -> Tensor:
    """S_pri of each image: the area under its GradSim curve (ATS Eq. 7, trapezoid rule).

    For image x with label y and transformed image T(x), with ``x_i = (i/bins) T(x) + (1 - i/bins) x0``
    in normalized space, ``c_i`` is the cosine between the loss gradients at ``x_i`` and at ``T(x)``
    (per parameter tensor, averaged over tensors when ``per_layer``), and the score is
    ``sum_{i=1..bins} (c_{i-1} + c_i) / (2 bins)``. The model runs in eval mode. S_pri of a policy
    is the mean over images; lower is more private.

    A parameter whose gradient vanishes identically (e.g. a convolution's bias right before a
    GroupNorm with one channel per group) has a cosine of rounding noise; with ``per_layer`` it
    adds noise to the score, so freeze such parameters (``requires_grad_(False)``) to leave them out.

    Args:
        model: the semi-trained network.
        x: images ``[N, C, H, W]`` in [0, 1] (before normalization).
        y: int64 labels ``[N]``.
        policy: transformation applied to ``x`` first (a :class:`Policy` or its string); None: none.
        start: the starting images x0 ``[N, C, H, W]`` in [0, 1]; default uniform random.
        bins: number of intervals K (K + 1 points; 20 in ATS).
        per_layer: per-tensor cosines averaged (ATS); False: one cosine of the whole gradient.
        mean, std: data normalization (scalars or per channel), applied to T(x) and x0 alike.
        chunk_size: interpolation points per batched gradient pass (bounds memory at
            ``chunk_size`` per-example gradients).
        generator: source of the policy's draws and of the random start.
        progress: show a progress bar over the gradient chunks (for large models or many images).
        augment: apply :func:`crop_and_flip` before the policy, as the reference's augmented
            evaluation does (RandomCrop(32, padding 4) and a random flip).

    Returns:
        ``[N]`` scores, each in [-1, 1].
    """
    _check_batch(x, y)
    if bins < 1 or chunk_size < 1:
        raise ValueError(f"bins and chunk_size must be >= 1, got bins={bins}, chunk_size={chunk_size}")
    policy = _as_policy(policy)
    if augment:
        x = crop_and_flip(x, generator=generator)
    transformed = policy(x, generator=generator) if policy is not None else x
    if start is None:
        start = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    elif start.shape != x.shape:
        raise ValueError(f"start must have the shape of x {tuple(x.shape)}, got {tuple(start.shape)}")
    with eval_mode(model, no_grad=False):
        return gradsim_curve_area(
            model,
            normalize(transformed, mean, std),
            y,
            normalize(start, mean, std),
            bins=bins,
            per_layer=per_layer,
            chunk_size=chunk_size,
            progress=progress,
        )


def crop_and_flip(x: Tensor, *, padding: int = 4, generator: Optional[torch.Generator] = None) -> Tensor:
    """A random crop of each image after zero-padding ``padding`` pixels, mirrored with probability 1/2.

    The reference ATS code's augmented mode applies this (torchvision's RandomCrop(32, padding=4)
    and RandomHorizontalFlip) before the policy, when it scores and attacks.

    Args:
        x: images ``[N, C, H, W]`` in [0, 1].
        padding: zero padding on each side before the H x W crop.
        generator: source of the crop offsets and the flips.

    Returns:
        ``[N, C, H, W]`` images.
    """
    cropped, _ = RandomCrop(padding)(x, torch.zeros(x.shape[0], 1, dtype=x.dtype, device=x.device), generator=generator)
    mirror = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(mirror[:, None, None, None], cropped.flip(-1), cropped)


def one_per_class(y: Tensor, batches: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """``[batches, K]`` indices into ``y``: in each batch, one random example of each of the K labels present."""
    classes = torch.unique(y)
    scores = torch.rand(batches, y.shape[0], generator=generator).to(y.device)
    member = y.unsqueeze(0) == classes.unsqueeze(1)  # [K, N]
    return torch.where(member, scores.unsqueeze(1), -1.0).argmax(-1)


def jacobian_score(jacobians: Tensor) -> Tensor:
    """``-sum_j [log(v_j + 1e-5) + 1 / (v_j + 1e-5)]`` over the eigenvalues ``v`` of ``corrcoef(J)``.

    Args:
        jacobians: ``[..., B, D]``, one Jacobian row per image.

    Returns:
        ``[...]`` scores, computed in float64.
    """
    j = jacobians.double()
    centered = j - j.mean(-1, keepdim=True)
    cov = centered @ centered.transpose(-1, -2)
    d = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    corr = cov / (d.unsqueeze(-1) * d.unsqueeze(-2))
    v = torch.linalg.eigvalsh(corr) + 1e-5
    return -(v.log() + 1 / v).sum(-1)


def accuracy_score(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    policy: PolicyLike = None,
    batches: int = 10,
    mean: Stats = None,
    std: Stats = None,
    generator: Optional[torch.Generator] = None,
) -> float:
    """S_acc of a policy: Jacobian-correlation score of a randomly initialized model (ATS Eq. 10).

    Each of ``batches`` batches holds one random image per distinct label in ``y``, transformed by
    the policy; ``J = d(sum of logits) / dx`` is reshaped to ``[B, D]`` and scored by
    :func:`jacobian_score`; the result is the mean over batches. The model runs in eval mode, so
    images do not interact and all batches share one backward pass.

    Args:
        model: a randomly initialized network.
        x: images ``[N, C, H, W]`` in [0, 1].
        y: int64 labels ``[N]``, at least two distinct.
        policy: transformation applied to the drawn images; None: none.
        batches: number of batches averaged (10 in ATS).
        mean, std: data normalization applied after the policy.
        generator: source of the draws (images and policy).

    Returns:
        The score (higher is better).
    """
    _check_batch(x, y)
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    index = one_per_class(y, batches, generator=generator)
    if index.shape[1] < 2:
        raise ValueError("accuracy_score needs images of at least two distinct labels")
    policy = _as_policy(policy)
    images = x[index.flatten()]
    images = policy(images, generator=generator) if policy is not None else images
    images = normalize(images, mean, std).detach().requires_grad_(True)
    with eval_mode(model, no_grad=False), torch.enable_grad():
        (jacobian,) = torch.autograd.grad(model(images).sum(), images)
    return float(jacobian_score(jacobian.view(batches, index.shape[1], -1)).mean())
