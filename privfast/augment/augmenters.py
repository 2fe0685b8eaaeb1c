"""Self-augmentation (De et al.) and DP-Mix as batch transforms.

DP-Mix is Algorithm 1 of Bao, Pittaluga, Kumar B G and Bindschaedler, "DP-Mix: Mixup-based Data
Augmentation for Differentially Private Learning" (NeurIPS 2023).

Each turns a batch ``(x [B, C, H, W], y)`` into ``(x [B*K, C, H, W], soft labels [B*K, classes])``
with the K rows of an example contiguous, which is what the private engine folds before clipping.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from privfast import ops


class DPMix:
    """DP-Mix: K_base self-augmentations, K_diff public samples, K_self mixups of pairs of those.

    For each example the rows are its ``k_base`` random crops (+ flips), then ``k_diff`` samples
    drawn from ``pool`` (public or synthetic data: no privacy cost), then ``k_self`` mixups
    ``lam * S[p] + (1 - lam) * S[q]`` of two rows of that set with ``lam ~ Beta(alpha, alpha)``;
    labels are mixed alike. All ``K = k_base + k_diff + k_self`` rows' gradients are averaged
    before clipping, so the sensitivity stays C.

    Args:
        k_base: self-augmentations per example, >= 1.
        k_self: mixups per example, >= 0.
        k_diff: pool samples per example, >= 0 (DP-Mix_Diff); needs ``pool``.
        alpha: Beta parameter of the mixup weight, > 0.
        pool: ``(x [M, C, H, W], y)`` with ``y`` int ``[M]`` or soft ``[M, classes]``.
        crop_padding: reflect padding before the random crop.
        flip: mirror each crop with probability 1/2.
        num_classes: classes of the soft labels; needed when labels come as class indices.

    Raises:
        ValueError: on counts out of range, ``k_diff`` without a pool, or a malformed pool.
    """

    def __init__(
        self,
        k_base: int,
        k_self: int,
        k_diff: int = 0,
        alpha: float = 0.2,
        pool: Optional[tuple[Tensor, Tensor]] = None,
        *,
        crop_padding: int = 4,
        flip: bool = True,
        num_classes: Optional[int] = None,
    ):
        if k_base < 1 or k_self < 0 or k_diff < 0:
            raise ValueError(f"need k_base >= 1, k_self >= 0, k_diff >= 0; got {k_base}, {k_self}, {k_diff}")
        if k_self and not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if k_diff and pool is None:
            raise ValueError("k_diff > 0 draws from a public/synthetic pool: pass pool=(x_pool, y_pool)")
        if pool is not None and (
            len(pool) != 2 or pool[0].dim() != 4 or pool[0].shape[0] != pool[1].shape[0] or pool[0].shape[0] == 0
        ):
            raise ValueError("pool must be (x [M, C, H, W], y [M] or [M, classes]) with M >= 1")
        self.k_base, self.k_self, self.k_diff, self.alpha = k_base, k_self, k_diff, alpha
        self.pool = pool
        self.crop_padding, self.flip, self.num_classes = crop_padding, flip, num_classes

    @property
    def augmult(self) -> int:
        """K: the rows each example becomes."""
        return self.k_base + self.k_diff + self.k_self

    def _soft(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        if y.is_floating_point():
            return y.to(dtype)
        if self.num_classes is None:
            raise ValueError("labels are class indices: pass num_classes=... to build soft labels")
        return F.one_hot(y, self.num_classes).to(dtype)

    def __call__(self, x: Tensor, y: Tensor, *, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """Augment a batch.

        Args:
            x: images ``[B, C, H, W]``.
            y: labels, int ``[B]`` or soft ``[B, classes]``.
            generator: source of the random draws (default: torch's default generator).

        Returns:
            ``(x [B*K, C, H, W], soft labels [B*K, classes])``, rows of an example contiguous.
        """
        if x.dim() != 4 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"expected x [B, C, H, W] and y [B] or [B, classes], got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        labels = self._soft(y, x.dtype).unsqueeze(1).expand(-1, self.k_base, -1)  # [B, k_base, classes]
        extra = None
        if self.k_diff:
            pool_x, pool_y = self.pool
            picks = torch.randint(0, pool_x.shape[0], (x.shape[0], self.k_diff), generator=generator)
            picks = picks.to(pool_x.device)
            extra = pool_x[picks].to(device=x.device, dtype=x.dtype)
            labels = torch.cat([labels, self._soft(pool_y, x.dtype)[picks].to(x.device)], dim=1)
        out, params = ops.augment_batch(
            x,
            self.k_base,
            crop_padding=self.crop_padding,
            flip=self.flip,
            mixups=self.k_self,
            alpha=self.alpha,
            extra=extra,
            generator=generator,
            return_params=True,
        )
        if self.k_self:
            rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
            first, second = labels[rows, params.mix_pairs[..., 0]], labels[rows, params.mix_pairs[..., 1]]
            lam = params.mix_lambda.to(x.dtype).unsqueeze(2)
            labels = torch.cat([labels, lam * first + (1 - lam) * second], dim=1)
        return out, labels.reshape(-1, labels.shape[-1])


class SelfAug(DPMix):
    """Augmentation multiplicity (De et al., 2022): K random crops and flips of each example.

    The special case of DP-Mix with no mixups and no pool. Args as :class:`DPMix`.
    """

    def __init__(self, k: int, *, crop_padding: int = 4, flip: bool = True, num_classes: Optional[int] = None):
        super().__init__(k, 0, crop_padding=crop_padding, flip=flip, num_classes=num_classes)
