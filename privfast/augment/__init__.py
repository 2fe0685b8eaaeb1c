"""Augmentation for private training: Self-Aug and DP-Mix (per-example, folded before clipping)."""

from privfast.augment.augmenters import DPMix, SelfAug

__all__ = ["DPMix", "SelfAug"]
