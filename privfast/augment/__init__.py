"""Augmentation: Self-Aug and DP-Mix for private training (per-example, folded before clipping),
the seven augmentation mechanisms of Kaya & Dumitras (ICML 2021), and the 50-entry ATS
transformation library with its policies."""

from privfast.augment.ats_library import LIBRARY, Policy, apply_transform, random_policy
from privfast.augment.augmenters import DPMix, SelfAug
from privfast.augment.mechanisms import (
    Cutout,
    DisturbLabel,
    GaussianAugmentation,
    LabelSmoothing,
    Mechanism,
    Mixup,
    RandomCrop,
    SoftLabels,
    one_hot_targets,
    self_augment,
)

__all__ = [
    "LIBRARY",
    "Cutout",
    "DPMix",
    "DisturbLabel",
    "GaussianAugmentation",
    "LabelSmoothing",
    "Mechanism",
    "Mixup",
    "Policy",
    "RandomCrop",
    "SelfAug",
    "SoftLabels",
    "apply_transform",
    "one_hot_targets",
    "random_policy",
    "self_augment",
]
