"""Attacks that measure what a model leaks: membership inference (threshold, Salem NN,
augmentation-aware, LiRA, RMIA) and canary exposure; see also :mod:`privfast.metrics`.

A LiRA audit of a model trained on a random half of a pool::

    shadows = train_shadow_models(make_model, pool.x, pool.y, n_shadows=16, epochs=30)  # all 16 at once
    result = lira(target, shadows, pool.x, pool.y, is_member=in_target)
    result.summary["auc"], result.summary["tpr_at_fpr"][0.001]
    rmia(target, shadows, pool.x, pool.y, is_member=in_target, online=False)   # RMIA on the same shadows
"""

from privfast.attacks.common import AttackResult, example_losses, predict_logits
from privfast.attacks.exposure import (
    Extraction,
    TokenCanary,
    candidate_index,
    enumerate_log_perplexities,
    exposure,
    exposure_extrapolated,
    extract,
    image_canaries,
    insert_canaries,
    log_perplexity,
    score_candidates,
    token_canary,
)
from privfast.attacks.lira import lira, logit_confidence
from privfast.attacks.mia import augmentation_aware, calibrated_threshold, salem_nn, yeom
from privfast.attacks.reconstruction import (
    PRESETS,
    AttackConfig,
    Reconstruction,
    gradient_distance,
    per_example_gradients,
    psnr,
    reconstruct,
    recover_labels,
    ssim,
    total_variation,
)
from privfast.attacks.rmia import rmia, rmia_scores, tune_offline_a
from privfast.attacks.training import ShadowModels, train_classifier, train_shadow_models

__all__ = [
    "PRESETS",
    "AttackConfig",
    "AttackResult",
    "Extraction",
    "Reconstruction",
    "ShadowModels",
    "TokenCanary",
    "augmentation_aware",
    "calibrated_threshold",
    "candidate_index",
    "enumerate_log_perplexities",
    "example_losses",
    "exposure",
    "gradient_distance",
    "exposure_extrapolated",
    "extract",
    "image_canaries",
    "insert_canaries",
    "lira",
    "log_perplexity",
    "logit_confidence",
    "per_example_gradients",
    "predict_logits",
    "psnr",
    "reconstruct",
    "recover_labels",
    "rmia",
    "rmia_scores",
    "salem_nn",
    "score_candidates",
    "ssim",
    "token_canary",
    "total_variation",
    "train_classifier",
    "train_shadow_models",
    "tune_offline_a",
    "yeom",
]
