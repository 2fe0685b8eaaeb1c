"""Attacks that measure what a model leaks: membership inference (threshold, Salem NN,
augmentation-aware, LiRA) and canary exposure; see also :mod:`privfast.metrics`."""

from privfast.attacks.exposure import (
    TokenCanary,
    exposure,
    exposure_extrapolated,
    image_canaries,
    insert_canaries,
    log_perplexity,
    token_canary,
)
from privfast.attacks.lira import lira, logit_confidence
from privfast.attacks.mia import AttackResult, augmentation_aware, calibrated_threshold, salem_nn, yeom
from privfast.attacks.training import (
    ShadowModels,
    example_losses,
    predict_logits,
    train_classifier,
    train_shadow_models,
)

__all__ = [
    "AttackResult",
    "ShadowModels",
    "TokenCanary",
    "augmentation_aware",
    "calibrated_threshold",
    "example_losses",
    "exposure",
    "exposure_extrapolated",
    "image_canaries",
    "insert_canaries",
    "lira",
    "log_perplexity",
    "logit_confidence",
    "predict_logits",
    "salem_nn",
    "token_canary",
    "train_classifier",
    "train_shadow_models",
    "yeom",
]
from privfast.attacks.reconstruction import PRESETS, AttackConfig, Reconstruction, gradient_distance, per_example_gradients, psnr, reconstruct, recover_labels, ssim, total_variation  # noqa: E402,F401
