"""The canaries of a training run: drawn from its seed, inserted into its private training set,
stored in its checkpoint for ``privfast audit`` to measure their exposure.

Canaries are :func:`~privfast.attacks.image_canaries` (random-pattern images with random labels),
inserted ``canary_repeats`` times each (:func:`~privfast.attacks.exposure.insert_canaries`); the
:data:`CANARY_REFERENCES` reference candidates come from the same distribution and are never
inserted: a canary's exposure is its rank among them (Carlini et al., "The Secret Sharer",
USENIX Security 2019, Section 4).
"""

from __future__ import annotations

import os

import torch

from privfast.config import TrainConfig
from privfast.data import Split

__all__ = ["CANARY_REFERENCES", "load_canaries", "make_canaries"]

CANARY_REFERENCES = 1000
"""Candidates, never inserted, that each canary is ranked against (exposure up to log2(1001) ~ 10 bits)."""


def make_canaries(config: TrainConfig, *, shape: dict) -> tuple[Split, Split]:
    """The run's ``config.canaries`` image canaries and the :data:`CANARY_REFERENCES` candidates never inserted.

    Both are drawn from one generator seeded by ``config.seed`` (so a resumed run inserts the same
    canaries) and from the same distribution, which makes the references a fair yardstick.

    Args:
        config: the run.
        shape: :func:`~privfast.data.data_shape` of its data.

    Returns:
        ``(canaries [M, C, H, W] with labels [M], references [R, C, H, W] with labels [R])``.
    """
    from privfast.attacks.exposure import image_canaries

    generator = torch.Generator().manual_seed(config.seed)
    size = (shape["in_channels"], shape["image_size"], shape["image_size"])
    canaries = image_canaries(config.canaries, shape=size, num_classes=shape["num_classes"], generator=generator)
    references = image_canaries(CANARY_REFERENCES, shape=size, num_classes=shape["num_classes"], generator=generator)
    return canaries, references


def load_canaries(path: str | os.PathLike) -> tuple[Split, Split]:
    """The canaries a :class:`~privfast.trainer.Trainer` checkpoint inserted and their never-inserted references.

    Args:
        path: the checkpoint, or its run directory.

    Returns:
        ``(canaries x [M, C, H, W], y [M]; references x [R, C, H, W], y [R])``; M is 0 for a run without canaries.
    """
    from privfast.checkpoint import read_checkpoint

    stored = read_checkpoint(path)["canaries"]
    return Split(stored["x"], stored["y"]), Split(stored["references_x"], stored["references_y"])
