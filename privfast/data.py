"""Bundled data. The embedded default is scikit-learn's digits (1,797 8x8 grey images, 10
classes), which ships inside scikit-learn: nothing is downloaded."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Split(NamedTuple):
    """Images ``x [N, 1, size, size]`` in [0, 1] and labels ``y [N]`` (int64)."""

    x: Tensor
    y: Tensor


def load_digits(*, size: int = 8, test_fraction: float = 0.3, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> tuple[Split, Split]:
    """The digits data as a (train, test) pair of fixed, stratification-free random splits.

    Args:
        size: side of the returned images; 8 is native, larger sizes are bilinear upsamplings.
        test_fraction: fraction of the 1,797 images held out.
        seed: seed of the split.
        dtype: floating dtype of the images.

    Returns:
        ``(train, test)``, each a :class:`Split`.
    """
    from sklearn.datasets import load_digits as _sklearn_digits

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = _sklearn_digits()
    x = torch.as_tensor(bunch.images, dtype=dtype).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train]), Split(x[test], y[test])
