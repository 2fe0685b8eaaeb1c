"""privfast: fast private deep learning, and fast attacks to measure its privacy.

Train privately with :class:`PrivacyEngine` (Opacus's names; augmentation multiplicity and DP-Mix
through :mod:`privfast.augment`), attack the result with :mod:`privfast.attacks` and
:mod:`privfast.metrics`, search ATS policies with :mod:`privfast.search`, simulate collaborative
learning with :mod:`privfast.federated`, run whole experiments with :class:`Trainer` or the ``privfast``
command (:mod:`privfast.cli`). The fused kernels are in :mod:`privfast.ops`.
"""

import importlib
from typing import Any

# Everything loads on first use (PEP 562): `import privfast` and `privfast --help` stay fast, and a
# user of the engine does not pay for scikit-learn, matplotlib or the attacks.
_SUBMODULES = (
    "attacks",
    "audit",
    "auditing",
    "augment",
    "canaries",
    "checkpoint",
    "config",
    "data",
    "federated",
    "grad_sample",
    "metrics",
    "models",
    "ops",
    "optim",
    "reports",
    "search",
    "secret_sharer",
    "text",
    "throughput",
    "trainer",
)
_NAMES = {
    "DPMix": "privfast.augment",
    "SelfAug": "privfast.augment",
    "DPOptimizer": "privfast.optim",
    "SAM": "privfast.optim",
    "GradSampleModule": "privfast.grad_sample",
    "MembershipAudit": "privfast.audit",
    "PrivacyEngine": "privfast.privacy_engine",
    "TrainConfig": "privfast.config",
    "Trainer": "privfast.trainer",
    "has_extension": "privfast.ops",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"privfast.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'privfast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__version__ = "0.1.0"

__all__ = sorted([*_NAMES, *_SUBMODULES, "__version__"])
