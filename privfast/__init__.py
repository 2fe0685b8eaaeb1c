"""privfast: fast private deep learning, and fast attacks to measure its privacy.

Train privately with :class:`PrivacyEngine` (Opacus's names; augmentation multiplicity and DP-Mix
through :mod:`privfast.augment`), attack the result with :mod:`privfast.attacks` and
:mod:`privfast.metrics`, search ATS policies with :mod:`privfast.search`, simulate collaborative
learning with :mod:`privfast.federated`, run whole experiments with :class:`Trainer` or the ``privfast``
command (:mod:`privfast.cli`). The fused kernels are in :mod:`privfast.ops`.
"""

from privfast import attacks, audit, augment, data, federated, grad_sample, metrics, models, ops, optim, reports, search, trainer
from privfast.audit import MembershipAudit
from privfast.augment import DPMix, SelfAug
from privfast.grad_sample import GradSampleModule
from privfast.ops import has_extension
from privfast.optim import SAM, DPOptimizer
from privfast.privacy_engine import PrivacyEngine
from privfast.trainer import TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    "DPMix",
    "DPOptimizer",
    "GradSampleModule",
    "MembershipAudit",
    "PrivacyEngine",
    "SAM",
    "SelfAug",
    "TrainConfig",
    "Trainer",
    "__version__",
    "attacks",
    "audit",
    "augment",
    "data",
    "federated",
    "grad_sample",
    "has_extension",
    "metrics",
    "models",
    "ops",
    "optim",
    "reports",
    "search",
    "trainer",
]
