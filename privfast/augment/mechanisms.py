"""The seven augmentation mechanisms of Kaya & Dumitraş, as batched tensor ops.

From "When Does Data Augmentation Help With Membership Inference Attacks?" (ICML 2021), Section 4.1.

Each mechanism has one intensity parameter, named as in the paper:

- soft labels by distillation (SL), :class:`SoftLabels`: the temperature ``T``;
- label smoothing (LS), :class:`LabelSmoothing`: ``alpha``, the label mass spread uniformly;
- DisturbLabel (DL), :class:`DisturbLabel`: ``theta``, the rate of wrong labels;
- random crop (RC), :class:`RandomCrop`: the zero padding ``P``;
- cutout (CO), :class:`Cutout`: the side ``M`` of the occluded square;
- Gaussian augmentation (GA), :class:`GaussianAugmentation`: the noise variance ``sigma^2``;
- mixup (MU), :class:`Mixup`: ``gamma``, with ``lambda ~ Beta(gamma, gamma)``.

A mechanism maps a batch of images ``x [B, C, H, W]`` and probability targets ``[B, K]`` (one-hot
rows for hard labels, see :func:`one_hot_targets`) to new ones, so mechanisms compose and the
targets feed ``torch.nn.functional.cross_entropy`` directly. Random mechanisms draw fresh
randomness at every call, as they do at every training iteration in the paper.

Every mechanism but mixup treats each example on its own, so it can serve as a DP
self-augmentation (:func:`self_augment`); mixup combines two examples and would break the
per-example sensitivity of DP-SGD.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privfast import ops

__all__ = [
    "Cutout",
    "DisturbLabel",
    "GaussianAugmentation",
    "LabelSmoothing",
    "Mechanism",
    "Mixup",
    "RandomCrop",
    "SoftLabels",
    "one_hot_targets",
    "self_augment",
]


def one_hot_targets(y: Tensor, num_classes: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer labels ``[B]`` as one-hot probability targets ``[B, num_classes]``."""
    if y.dim() != 1 or y.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"y must be integer labels [B], got {y.dtype} {tuple(y.shape)}")
    return F.one_hot(y.long(), num_classes).to(dtype)


def _check_batch(x: Tensor, targets: Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be float images [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
    if targets.dim() != 2 or targets.shape[0] != x.shape[0] or not targets.is_floating_point():
        raise ValueError(
            f"targets must be float probabilities [B={x.shape[0]}, num_classes], got "
            f"{targets.dtype} {tuple(targets.shape)}; use one_hot_targets(y, num_classes)"
        )


def _generator_device(generator: Optional[torch.Generator], fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


class Mechanism:
    """Base class: ``mechanism(x [B, C, H, W], targets [B, K], generator=None) -> (x', targets')``."""

    mixes_examples = False
    """True when an output row depends on several examples (then it is no DP self-augmentation)."""

    def __call__(
        self, x: Tensor, targets: Tensor, *, generator: Optional[torch.Generator] = None
    ) -> tuple[Tensor, Tensor]:
        _check_batch(x, targets)
        return self._apply(x, targets, generator)

    def _apply(self, x: Tensor, targets: Tensor, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not isinstance(v, nn.Module))
        return f"{type(self).__name__}({fields})"


class SoftLabels(Mechanism):
    """SL: targets become a teacher's tempered posteriors ``softmax(teacher(x) / T)`` (Hinton et al.).

    The teacher is trained beforehand without augmentation; large ``T`` flattens the targets
    (Kaya & Dumitraş use 1 <= T <= 1000). In private training the teacher must itself be private,
    or the soft labels leak the data it saw.

    Args:
        teacher: a classifier ``[B, C, H, W] -> [B, K]`` logits; evaluated without gradients.
        temperature: T > 0.
    """

    def __init__(self, teacher: nn.Module, temperature: float):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.teacher = teacher
        self.temperature = float(temperature)

    def _apply(self, x, targets, generator):
        with torch.no_grad():
            logits = self.teacher(x)
        if logits.shape != targets.shape:
            raise ValueError(f"the teacher gives logits {tuple(logits.shape)} but targets are {tuple(targets.shape)}")
        return x, torch.softmax(logits.to(targets.dtype) / self.temperature, dim=1)


class LabelSmoothing(Mechanism):
    """LS: ``targets' = (1 - alpha) * targets + alpha / K`` (Szegedy et al.).

    For a one-hot target the true class keeps ``1 - alpha + alpha / K`` and every other class
    gets ``alpha / K`` (Kaya & Dumitraş: alpha = 0.3 over 3 classes gives 80% / 10% / 10%).

    Args:
        alpha: smoothing mass in [0, 1].
    """

    def __init__(self, alpha: float):
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)

    def _apply(self, x, targets, generator):
        return x, targets * (1 - self.alpha) + self.alpha / targets.shape[1]


class DisturbLabel(Mechanism):
    """DL: each example's label is replaced, with probability ``theta``, by a different class (Xie et al.).

    The replacement is drawn uniformly among the K - 1 wrong classes, so a fraction ``theta`` of
    the labels in an iteration is wrong, as Kaya & Dumitraş define it. The "label" of a soft target is
    its arg-max; a replaced row becomes one-hot.

    Args:
        theta: replacement rate in [0, 1].
    """

    def __init__(self, theta: float):
        if not 0 <= theta <= 1:
            raise ValueError(f"theta must be in [0, 1], got {theta}")
        self.theta = float(theta)

    def _apply(self, x, targets, generator):
        batch, classes = targets.shape
        if classes < 2:
            raise ValueError("DisturbLabel needs at least two classes")
        device = _generator_device(generator, targets.device)
        replace = (torch.rand(batch, generator=generator, device=device) < self.theta).to(targets.device)
        # A shift in [1, K) modulo K lands uniformly on the K - 1 other classes.
        shift = torch.randint(1, classes, (batch,), generator=generator, device=device).to(targets.device)
        wrong = (targets.argmax(1) + shift) % classes
        return x, torch.where(replace[:, None], F.one_hot(wrong, classes).to(targets.dtype), targets)


class RandomCrop(Mechanism):
    """RC: zero-pad ``P`` pixels on each side, then crop a random H x W window (Simonyan & Zisserman).

    Unlike :func:`privfast.ops.augment_batch` (reflect padding, the DP-Mix recipe), this pads with
    zeros and allows ``P >= H``, as Kaya & Dumitraş do (1 <= P <= 38 on 32 x 32 images).

    Args:
        padding: P >= 0.
    """

    def __init__(self, padding: int):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = int(padding)

    def _apply(self, x, targets, generator):
        batch, _, height, width = x.shape
        p = self.padding
        device = _generator_device(generator, x.device)
        offsets = torch.randint(0, 2 * p + 1, (batch, 2), generator=generator, device=device).to(x.device)
        padded = F.pad(x, (p, p, p, p))
        rows = (offsets[:, 0, None] + torch.arange(height, device=x.device))[:, :, None]  # [B, H, 1]
        cols = (offsets[:, 1, None] + torch.arange(width, device=x.device))[:, None, :]  # [B, 1, W]
        crops = padded[torch.arange(batch, device=x.device)[:, None, None], :, rows, cols]  # [B, H, W, C]
        return crops.permute(0, 3, 1, 2).contiguous(), targets


class Cutout(Mechanism):
    """CO: zero an M x M square centred at a uniformly random pixel, clipped at the borders (DeVries & Taylor).

    Args:
        size: M >= 0, the side of the square.
    """

    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size = int(size)

    def _apply(self, x, targets, generator):
        batch, _, height, width = x.shape
        device = _generator_device(generator, x.device)
        centre_y = torch.randint(0, height, (batch, 1), generator=generator, device=device).to(x.device)
        centre_x = torch.randint(0, width, (batch, 1), generator=generator, device=device).to(x.device)
        low = self.size // 2  # the square spans [c - M//2, c - M//2 + M)
        ys = torch.arange(height, device=x.device) - (centre_y - low)
        xs = torch.arange(width, device=x.device) - (centre_x - low)
        inside_y = (ys >= 0) & (ys < self.size)  # [B, H]
        inside_x = (xs >= 0) & (xs < self.size)  # [B, W]
        keep = ~(inside_y[:, :, None] & inside_x[:, None, :])
        return x * keep[:, None].to(x.dtype), targets


class GaussianAugmentation(Mechanism):
    """GA: add ``N(0, sigma^2 I)`` noise to every image (Cohen et al.); Kaya & Dumitraş use 0.01 <= sigma^2 <= 0.35.

    Args:
        variance: sigma^2 >= 0 (the paper's intensity is the variance, not the standard deviation).
    """

    def __init__(self, variance: float):
        if not variance >= 0:
            raise ValueError(f"variance must be >= 0, got {variance}")
        self.variance = float(variance)

    def _apply(self, x, targets, generator):
        device = _generator_device(generator, x.device)
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        return x + self.variance**0.5 * noise, targets


class Mixup(Mechanism):
    """MU: ``x' = lam * x_i + (1 - lam) * x_j`` and the targets alike, ``lam ~ Beta(gamma, gamma)`` (Zhang et al.).

    Each example i is paired with example j = perm(i) of a random permutation of the batch, and
    draws its own lam. gamma -> 0 gives no interpolation, gamma -> inf plain averaging.

    Args:
        gamma: Beta parameter > 0.
    """

    mixes_examples = True

    def __init__(self, gamma: float):
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)

    def _apply(self, x, targets, generator):
        batch = x.shape[0]
        device = _generator_device(generator, x.device)
        partner = torch.randperm(batch, generator=generator, device=device).to(x.device)
        lam = ops.sample_beta(self.gamma, (batch,), generator=generator).to(x.device)
        lam_x = lam.to(x.dtype).view(batch, 1, 1, 1)
        lam_t = lam.to(targets.dtype)[:, None]
        return lam_x * x + (1 - lam_x) * x[partner], lam_t * targets + (1 - lam_t) * targets[partner]


def self_augment(
    mechanism: Mechanism, x: Tensor, targets: Tensor, k: int, *, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor]:
    """K independent draws of a single-example mechanism per example, rows of an example contiguous.

    This is the layout DP-SGD with augmentation multiplicity expects: the per-example gradient
    is the mean over an example's K rows.

    Args:
        mechanism: a :class:`Mechanism` that does not mix examples.
        x: images ``[B, C, H, W]``.
        targets: probabilities ``[B, K_classes]``.
        k: draws per example, >= 1.
        generator: source of the draws.

    Returns:
        ``(x' [B * k, C, H, W], targets' [B * k, K_classes])``.
    """
    if getattr(mechanism, "mixes_examples", False):
        raise ValueError(f"{mechanism!r} mixes examples, so it cannot be a per-example (DP) self-augmentation")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return mechanism(x.repeat_interleave(k, 0), targets.repeat_interleave(k, 0), generator=generator)
