"""The configuration of a training run: :class:`TrainConfig`, one field per ``privfast train`` flag.

A configuration is plain values, so it is stored in every checkpoint and report. Its errors name
the command-line flags (``--k-base``), the vocabulary of both the command and this class (field
``k_base`` is flag ``--k-base``).

Augmentation counts: ``k_base`` self-augmentations, ``k_self`` mixups and ``k_diff`` public pool
samples per example; :attr:`TrainConfig.augmult` is their sum K, the rows each example becomes,
which is what ``augmult`` means everywhere in privfast (:class:`~privfast.augment.DPMix`,
:class:`~privfast.grad_sample.GradSampleModule`, :class:`~privfast.privacy_engine.PrivacyEngine`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from privfast.data import DATASET_AUGMENTATION, DATASETS
from privfast.models import MODELS

if TYPE_CHECKING:
    from privfast.augment import DPMix
    from privfast.data import Split

__all__ = ["METHODS", "MIXING", "RESUMABLE", "TrainConfig", "check_resume", "flag"]

METHODS = ("nonprivate", "dp-sgd", "self-aug", "dp-mix", "dp-mix-diff", "sam", "dp-sam")
MIXING = ("dp-mix", "dp-mix-diff")
"""The methods that mix self-augmentations (``k_self`` >= 1)."""
RESUMABLE = ("epochs", "data_root")
"""Fields that may change when a run is resumed: they do not alter the epochs already trained. The
noise (``noise_multiplier``, ``target_epsilon``) may be respelled as long as the noise multiplier
stays the one the run trained with (see :meth:`privfast.trainer.Trainer.fit`)."""


def flag(field: str) -> str:
    """The ``privfast train`` flag of a :class:`TrainConfig` field: ``k_base`` -> ``--k-base``."""
    return "--" + field.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in checkpoints and reports).

    Attributes:
        dataset: a name from :data:`privfast.data.DATASETS`.
        data_root: directory of the files of a file-based data set.
        train_examples: train on the first this many training examples (fewer overfit more, which
            is how membership leakage is studied); None: all (less the public pool of dp-mix-diff).
        model: one of :data:`privfast.models.MODELS`.
        width: channels of the ConvNet's first layer / hidden units of the MLP.
        method: ``"nonprivate"``, ``"dp-sgd"``, ``"self-aug"`` (DP-SGD with ``k_base`` >= 2
            self-augmentations per example), ``"dp-mix"``, ``"dp-mix-diff"`` (DP-Mix with ``k_diff``
            samples of a public pool), ``"sam"`` (non-private) or ``"dp-sam"``.
        epochs: passes over the training set.
        batch_size: expected (Poisson) batch size of the private methods, batch size otherwise.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD L2 coefficient.
        max_grad_norm: clipping bound C of the private methods.
        noise_multiplier: sigma; with ``target_epsilon`` left None it is used as given.
        target_epsilon: spend exactly this epsilon in ``epochs`` epochs (the noise is searched).
        delta: the delta of the accounting and of the DP bound on the attack error.
        k_base: self-augmentations per example (K_base); >= 2 with ``self-aug``, 1 with ``dp-sgd``.
            K, the rows each example becomes, is k_base + k_self + k_diff.
        k_self: DP-Mix mixups per example (K_self), >= 1 with ``dp-mix`` and ``dp-mix-diff``.
        k_diff: public pool samples per example (K_diff), >= 1 with ``dp-mix-diff`` only.
        pool_examples: size of dp-mix-diff's public pool, the last rows of the training split.
        rho: neighbourhood radius of ``sam`` and ``dp-sam`` (0.05, as in Foret et al., "Sharpness-Aware
            Minimization for Efficiently Improving Generalization", ICLR 2021).
        canaries: random-pattern image canaries inserted into the private training set (M).
        canary_repeats: insertions of each canary (r).
        crop_padding: padding of the random crops (0 turns crops off); None: the data set's
            (1 pixel for 8x8 digits, 4 for 32x32 CIFAR: an eighth of the side).
        flip: mirror the self-augmentations at random; None: the data set's (off for digits and the
            synthetic set, whose mirror images are other classes' images; on for CIFAR and Fashion-MNIST).
        grad_sample_mode: per-example gradient strategy (see :class:`~privfast.grad_sample.GradSampleModule`).
        attacks: membership attacks of the per-epoch audit (names from :data:`privfast.audit.ATTACKS`).
        audit_examples: members and non-members attacked each (the test set holds the non-members).
        audit_known: members and non-members the attacker knows, each (N = 100 in Kaya & Dumitraş,
            "When Does Data Augmentation Help With Membership Inference Attacks?", ICML 2021,
            Section 3); fewer than ``audit_examples`` and than the test set.
        seed: seeds the model, the data order, the augmentations and the noise.
    """

    dataset: str = "digits"
    data_root: Optional[str] = None
    train_examples: Optional[int] = None
    model: str = "convnet"
    width: int = 16
    method: str = "dp-sgd"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    target_epsilon: Optional[float] = None
    delta: float = 1e-5
    k_base: int = 1
    k_self: int = 0
    k_diff: int = 0
    pool_examples: int = 200
    rho: float = 0.05
    canaries: int = 0
    canary_repeats: int = 1
    crop_padding: Optional[int] = None
    flip: Optional[bool] = None
    grad_sample_mode: str = "auto"
    attacks: tuple[str, ...] = ("yeom", "calibrated")
    audit_examples: int = 500
    audit_known: int = 100
    seed: int = 0

    def __post_init__(self):
        self.attacks = tuple(self.attacks)
        # The data set's augmentation defaults, fixed here so that checkpoints store the values used.
        defaults = DATASET_AUGMENTATION.get(self.dataset, {})
        for name in ("crop_padding", "flip"):
            if getattr(self, name) is None and name in defaults:
                setattr(self, name, defaults[name])
        problems = self._problems()
        if problems:
            raise ValueError("invalid training configuration:\n  - " + "\n  - ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        method = f"--method {self.method}"
        for name, choices in (("dataset", DATASETS), ("model", MODELS), ("method", METHODS)):
            if getattr(self, name) not in choices:
                problems.append(f"{flag(name)} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        small = [
            f"{flag(name)} {getattr(self, name)}"
            for name in ("epochs", "batch_size", "width", "audit_examples")
            if getattr(self, name) < 1
        ]
        if small:
            problems.append(
                "--epochs, --batch-size, --width and --audit-examples must be >= 1; got " + ", ".join(small)
            )
        if self.train_examples is not None and self.train_examples < 2:
            problems.append(f"--train-examples must be >= 2 (or none: all); got {self.train_examples}")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0; got {self.lr}")
        if self.k_base < 1 or self.k_self < 0 or self.k_diff < 0 or (self.crop_padding or 0) < 0:
            problems.append(
                f"need --k-base >= 1, --k-self >= 0, --k-diff >= 0, --crop-padding >= 0; got "
                f"{self.k_base}, {self.k_self}, {self.k_diff}, {self.crop_padding}"
            )
        if self.method in MIXING and self.k_self < 1:
            problems.append(f"{method} mixes self-augmentations: give --k-self >= 1 (e.g. --k-base 2 --k-self 2)")
        if self.method not in MIXING and self.k_self:
            problems.append(
                f"--k-self {self.k_self} applies to --method {' and '.join(MIXING)} only, not {self.method}"
            )
        if (self.method == "dp-mix-diff") != (self.k_diff > 0):
            problems.append(
                f"--k-diff >= 1 goes with --method dp-mix-diff and only with it; got --k-diff "
                f"{self.k_diff} with {method}"
            )
        if self.method == "dp-mix-diff" and self.pool_examples < 1:
            problems.append(f"--pool-examples must be >= 1; got {self.pool_examples}")
        if self.method == "self-aug" and self.k_base < 2:
            problems.append(
                "--method self-aug averages --k-base >= 2 self-augmentations per example (--k-base 1 is "
                "--method dp-sgd)"
            )
        if self.method == "dp-sgd" and self.k_base > 1:
            problems.append(f"--method dp-sgd takes no --k-base (got {self.k_base}); use --method self-aug")
        if not self.private and (self.k_base > 1 or self.target_epsilon is not None):
            problems.append(f"{method} is non-private: it takes no --k-base or --target-epsilon")
        if self.method in ("sam", "dp-sam") and not self.rho > 0:
            problems.append(f"--rho must be > 0; got {self.rho}")
        if self.canaries < 0 or self.canary_repeats < 1:
            problems.append(
                f"need --canaries >= 0 and --canary-repeats >= 1; got {self.canaries}, {self.canary_repeats}"
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            problems.append(f"--target-epsilon must be > 0; got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            problems.append(f"--delta must be in (0, 1); got {self.delta}")
        if self.attacks and not 0 <= self.audit_known < self.audit_examples:
            problems.append(
                f"--audit-known {self.audit_known} must be >= 0 and below --audit-examples "
                f"{self.audit_examples}: the attacker knows that many members and non-members and "
                "is scored on the rest"
            )
        return problems

    @property
    def private(self) -> bool:
        return self.method not in ("nonprivate", "sam")

    @property
    def augmult(self) -> int:
        """K = k_base + k_self + k_diff: the rows each example becomes (1 without augmentation)."""
        return self.k_base + self.k_self + self.k_diff

    def augmenter(self, num_classes: int, *, pool: Optional[Split] = None) -> Optional[DPMix]:
        """The batch transform of the method: DP-Mix(_Diff), Self-Aug (K > 1), or None (plain rows).

        Args:
            num_classes: classes of the labels (DP-Mix mixes one-hot labels).
            pool: dp-mix-diff's public pool ``(x [M, C, H, W], y [M])``.
        """
        from privfast.augment import DPMix, SelfAug

        if self.method in MIXING:
            return DPMix(
                self.k_base,
                self.k_self,
                self.k_diff,
                pool=tuple(pool) if self.k_diff else None,
                crop_padding=self.crop_padding,
                flip=self.flip,
                num_classes=num_classes,
            )
        if self.k_base > 1:
            return SelfAug(self.k_base, crop_padding=self.crop_padding, flip=self.flip, num_classes=num_classes)
        return None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown configuration fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**values)


def check_resume(stored: TrainConfig, current: TrainConfig) -> None:
    """Refuse to resume the run ``stored`` as ``current`` unless only :data:`RESUMABLE` fields differ.

    ``noise_multiplier`` and ``target_epsilon`` are not compared: they may change together as long
    as the noise multiplier stays the one trained with, which only the trainer knows (it is searched
    when ``target_epsilon`` is set).

    Raises:
        ValueError: naming the flags that changed, their values and what to do instead.
    """
    before, after = stored.to_dict(), current.to_dict()
    changed = [
        name
        for name in before
        if name not in (*RESUMABLE, "noise_multiplier", "target_epsilon") and before[name] != after[name]
    ]
    if changed:
        diff = ", ".join(f"{flag(name)} {_spelled(before[name])} -> {_spelled(after[name])}" for name in changed)
        raise ValueError(
            f"cannot change {diff} on resume: only {' and '.join(map(flag, RESUMABLE))} may change. "
            "For a new run give another --out directory (or --overwrite this one)"
        )


def _spelled(value) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)
