"""Data loaders for DP training: Poisson sampling keyed from the operating system's entropy.

Opacus's secure mode draws its Poisson batches from torchcsprng, which privfast does not depend
on; :class:`SecureUniformWithReplacementSampler` draws them from ``os.urandom`` (the kernel's
CSPRNG) instead, so that ``PrivacyEngine(secure_mode=True)`` covers the sampling as well as the noise.
"""

import os
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader

__all__ = ["SecureUniformWithReplacementSampler", "observe_batches", "rebuild_data_loader", "secure_uniform"]


def secure_uniform(n: int) -> np.ndarray:
    """``n`` float64 draws uniform on [0, 1) from ``os.urandom``: the top 53 bits of a 64-bit word,
    so every value is a multiple of 2^-53 and none rounds up to 1."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


class SecureUniformWithReplacementSampler(UniformWithReplacementSampler):
    """Opacus's Poisson sampler (each example joins a batch with probability ``sample_rate``), with
    its draws from the operating system's CSPRNG instead of a torch generator. Not reproducible
    by design; yields lists of indices, empty ones included, ``steps`` times."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: Optional[int] = None):
        # No generator argument: one passed here would be silently ignored.
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, steps=steps)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield np.flatnonzero(secure_uniform(self.num_samples) < self.sample_rate).tolist()


def rebuild_data_loader(loader: DataLoader, *, collate_fn=None, batch_sampler=None) -> DataLoader:
    """A new loader over ``loader``'s dataset with every setting kept but the given ones (a
    DataLoader refuses to have its batch sampler or collate function replaced in place)."""
    return DataLoader(
        loader.dataset,
        batch_sampler=loader.batch_sampler if batch_sampler is None else batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn if collate_fn is None else collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )


_OBSERVED: dict[type, type] = {}


def _observed_iter(self):
    for batch in type(self).__mro__[1].__iter__(self):
        first = next((t for t in tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        if first is not None:
            self._privfast_on_batch(tuple(first.shape))
        yield batch


def observe_batches(loader: DataLoader, on_batch: Callable[[tuple], None]) -> DataLoader:
    """Make ``loader`` call ``on_batch(shape)`` in the main process with the shape of each batch's first
    tensor as it yields the batch. The loader keeps its class (a subclass of it is swapped in), so
    ``isinstance(loader, DPDataLoader)`` and everything else about it stay as they were."""
    cls = type(loader)
    if cls not in _OBSERVED.values():
        if cls not in _OBSERVED:
            _OBSERVED[cls] = type(f"Observed{cls.__name__}", (cls,), {"__iter__": _observed_iter})
        loader.__class__ = _OBSERVED[cls]
    loader._privfast_on_batch = on_batch
    return loader
