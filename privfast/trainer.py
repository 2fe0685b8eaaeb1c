"""Training loop behind ``privfast train``: non-private, DP-SGD, Self-Aug, DP-Mix, DP-Mix_Diff, SAM or
DP-SAM, with a membership audit after every epoch, optional canaries, atomic checkpoints and exact resume.

A run is described by a :class:`TrainConfig` (plain values, so it is stored in every checkpoint
and in the reports) and executed by :class:`Trainer`::

    config = TrainConfig(method="dp-mix", augmult=2, k_self=2, epochs=10, target_epsilon=8)
    trainer = Trainer(config, checkpoint="run/checkpoint.pt")
    history = trainer.fit()            # a crash or Ctrl-C later, the same call with resume=True goes on
    history[-1]["test_accuracy"], history[-1]["epsilon"], history[-1]["calibrated"]["auc"]

Exact resume: every source of randomness of an epoch (Poisson sampling, shuffling, augmentation
draws) is torch's global CPU generator, and the checkpoint written after each epoch holds its
state together with the model, the optimizer, the accountant and the DP noise generator. A run
stopped after epoch e and resumed therefore makes the very same updates as one never stopped.
Checkpoints are taken at epoch boundaries only: a run killed mid-epoch redoes that epoch.

Data: the model trains on the first ``train_examples`` rows of the data set's training split;
DP-Mix_Diff's public pool is the last ``pool_examples`` rows of that split, never trained on
privately and disjoint from the test split (the audited non-members). Canaries
(:func:`~privfast.attacks.image_canaries`, drawn from ``seed``) are appended ``canary_repeats``
times to the private training set; reference candidates from the same distribution, never
inserted, are drawn with them, and both are stored in the checkpoint for ``privfast audit``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from privfast._io import atomic_save
from privfast.attacks.exposure import image_canaries, insert_canaries
from privfast.audit import MembershipAudit
from privfast.augment import DPMix, SelfAug
from privfast.data import Split, load_dataset
from privfast.models import MLP, ConvNet, ResNet20, WideResNet
from privfast.optim import SAM
from privfast.privacy_engine import PrivacyEngine

__all__ = ["CHECKPOINT_FORMAT", "METHODS", "MODELS", "TrainConfig", "Trainer", "build_model",
           "data_shape", "load_canaries", "load_data", "load_pool", "load_trained", "make_canaries"]

METHODS = ("nonprivate", "dp-sgd", "self-aug", "dp-mix", "dp-mix-diff", "sam", "dp-sam")
_MIXING = ("dp-mix", "dp-mix-diff")
CANARY_REFERENCES = 1000
"""Candidates, never inserted, that each canary is ranked against (exposure up to log2(1001) ~ 10 bits)."""
MODELS = ("convnet", "mlp", "wrn16-4", "resnet20")
CHECKPOINT_FORMAT = 2  # 2: hyphenated method names, canaries, SAM's base optimizer state
# Fields that may change when a run is resumed: they do not alter the epochs already trained
# (except that a target epsilon spreads its noise over the epochs: see Trainer._restore).
_RESUMABLE_CHANGES = {"epochs"}


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in checkpoints and reports).

    Attributes:
        dataset: a name from :data:`privfast.data.DATASETS`.
        data_root: directory of the files of a file-based data set.
        train_examples: train on the first this many training examples (fewer overfit more, which
            is how membership leakage is studied); None: all (less the public pool of dp-mix-diff).
        model: one of :data:`MODELS`.
        width: channels of the ConvNet's first layer / hidden units of the MLP.
        method: ``"nonprivate"``, ``"dp-sgd"``, ``"self-aug"`` (DP-SGD with ``augmult`` >= 2
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
        augmult: self-augmentations per example (K_base); >= 2 with ``self-aug``, 1 with ``dp-sgd``.
        k_self: DP-Mix mixups per example (K_self), >= 1 with ``dp-mix`` and ``dp-mix-diff``.
        k_diff: public pool samples per example (K_diff), >= 1 with ``dp-mix-diff`` only.
        pool_examples: size of dp-mix-diff's public pool, the last rows of the training split.
        rho: neighbourhood radius of ``sam`` and ``dp-sam`` (0.05 in seed generalization-vs-dp-against-mia).
        canaries: random-pattern image canaries inserted into the private training set (M).
        canary_repeats: insertions of each canary (r).
        crop_padding: padding of the random crops (0 turns crops off).
        flip: mirror the self-augmentations at random (off for digits and text-like images).
        grad_sample_mode: per-example gradient strategy (see :class:`~privfast.grad_sample.GradSampleModule`).
        attacks: membership attacks of the per-epoch audit (names from :data:`privfast.audit.ATTACKS`).
        audit_examples: members and non-members attacked each (the test set holds the non-members).
        audit_known: members and non-members the attacker knows, each (Kaya & Dumitraş, ICML 2021: 100); fewer than
            ``audit_examples`` and than the test set.
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
    augmult: int = 1
    k_self: int = 0
    k_diff: int = 0
    pool_examples: int = 200
    rho: float = 0.05
    canaries: int = 0
    canary_repeats: int = 1
    crop_padding: int = 1
    flip: bool = True
    grad_sample_mode: str = "auto"
    attacks: tuple[str, ...] = ("yeom", "calibrated")
    audit_examples: int = 500
    audit_known: int = 100
    seed: int = 0

    def __post_init__(self):
        self.attacks = tuple(self.attacks)
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
        if self.model not in MODELS:
            problems.append(f"model must be one of {MODELS}, got {self.model!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.width < 1 or self.audit_examples < 1:
            problems.append(f"epochs, batch_size, width and audit_examples must be >= 1, got {self.epochs}, "
                            f"{self.batch_size}, {self.width}, {self.audit_examples}")
        if self.train_examples is not None and self.train_examples < 2:
            problems.append(f"train_examples must be >= 2 or None, got {self.train_examples}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.augmult < 1 or self.k_self < 0 or self.crop_padding < 0:
            problems.append(f"need augmult >= 1, k_self >= 0, crop_padding >= 0; got {self.augmult}, {self.k_self}, "
                            f"{self.crop_padding}")
        if self.method in _MIXING and self.k_self < 1:
            problems.append(f"{self.method} mixes self-augmentations: set k_self >= 1 (e.g. augmult=2, k_self=2)")
        if self.method not in _MIXING and self.k_self:
            problems.append(f"k_self={self.k_self} only applies to methods {_MIXING}")
        if (self.method == "dp-mix-diff") != (self.k_diff > 0):
            problems.append(f"k_diff >= 1 goes with method='dp-mix-diff' and only with it, got k_diff={self.k_diff} "
                            f"with {self.method!r}")
        if self.method == "dp-mix-diff" and self.pool_examples < 1:
            problems.append(f"pool_examples must be >= 1, got {self.pool_examples}")
        if self.method == "self-aug" and self.augmult < 2:
            problems.append("self-aug averages augmult >= 2 self-augmentations per example; augmult=1 is dp-sgd")
        if self.method == "dp-sgd" and self.augmult > 1:
            problems.append(f"dp-sgd takes no augmult (got {self.augmult}); use method='self-aug'")
        if not self.private and (self.augmult > 1 or self.target_epsilon is not None):
            problems.append(f"{self.method} runs are non-private: they take no augmult or target_epsilon")
        if self.method in ("sam", "dp-sam") and not self.rho > 0:
            problems.append(f"rho must be > 0, got {self.rho}")
        if self.canaries < 0 or self.canary_repeats < 1:
            problems.append(f"need canaries >= 0 and canary_repeats >= 1, got {self.canaries}, {self.canary_repeats}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            problems.append(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if not 0 < self.delta < 1:
            problems.append(f"delta must be in (0, 1), got {self.delta}")
        if problems:
            raise ValueError("invalid training configuration:\n  - " + "\n  - ".join(problems))

    @property
    def private(self) -> bool:
        return self.method not in ("nonprivate", "sam")

    def augmenter(self, num_classes: int, *, pool: Optional[Split] = None) -> Optional[DPMix]:
        """The batch transform of the method: DP-Mix(_Diff), Self-Aug (K > 1), or None (plain rows).

        Args:
            num_classes: classes of the labels (DP-Mix mixes one-hot labels).
            pool: dp-mix-diff's public pool ``(x [M, C, H, W], y [M])``.
        """
        if self.method in _MIXING:
            return DPMix(self.augmult, self.k_self, self.k_diff, pool=tuple(pool) if self.k_diff else None,
                         crop_padding=self.crop_padding, flip=self.flip, num_classes=num_classes)
        if self.augmult > 1:
            return SelfAug(self.augmult, crop_padding=self.crop_padding, flip=self.flip, num_classes=num_classes)
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


def build_model(config: TrainConfig, *, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The model ``config.model`` for images ``[B, in_channels, image_size, image_size]``."""
    if config.model == "convnet":
        return ConvNet(in_channels=in_channels, num_classes=num_classes, width=config.width, image_size=image_size,
                       groups=min(8, config.width))
    if config.model == "mlp":
        return MLP(in_channels * image_size**2, num_classes, hidden=(config.width,))
    if config.model == "wrn16-4":
        return WideResNet(depth=16, widen=4, num_classes=num_classes, in_channels=in_channels)
    return ResNet20(num_classes=num_classes, in_channels=in_channels)


def load_data(config: TrainConfig) -> tuple[Split, Split]:
    """The ``(train, test)`` splits of ``config``: its data set, cut to ``train_examples``.

    The private training set excludes dp-mix-diff's public pool (:func:`load_pool`) and the
    canaries (:func:`make_canaries`), which the :class:`Trainer` appends.
    """
    train, test = load_dataset(config.dataset, root=config.data_root)
    available = len(train.y) - (config.pool_examples if config.method == "dp-mix-diff" else 0)
    wanted = available if config.train_examples is None else config.train_examples
    if wanted > available or available < 2:
        pool = f" less the {config.pool_examples} of the public pool" if config.method == "dp-mix-diff" else ""
        raise ValueError(f"train_examples={wanted} but {config.dataset} has {len(train.y)} training examples{pool}")
    return Split(train.x[:wanted], train.y[:wanted]), test


def load_pool(config: TrainConfig) -> Split:
    """dp-mix-diff's public pool: the last ``pool_examples`` rows of the training split.

    They are disjoint from the private training set (its first rows, :func:`load_data`) and from
    the test split (the audited non-members), so they stand for public data of the same domain.
    """
    train, _ = load_dataset(config.dataset, root=config.data_root)
    return Split(train.x[-config.pool_examples:], train.y[-config.pool_examples:])


def make_canaries(config: TrainConfig, *, shape: dict) -> tuple[Split, Split]:
    """The run's ``config.canaries`` image canaries and the :data:`CANARY_REFERENCES` candidates never inserted.

    Both are drawn from one generator seeded by ``config.seed`` (so a resumed run inserts the same
    canaries) and from the same distribution, which makes the references a fair yardstick.

    Args:
        config: the run.
        shape: :func:`data_shape` of its data.

    Returns:
        ``(canaries [M, C, H, W] with labels [M], references [R, C, H, W] with labels [R])``.
    """
    generator = torch.Generator().manual_seed(config.seed)
    size = (shape["in_channels"], shape["image_size"], shape["image_size"])
    canaries = image_canaries(config.canaries, shape=size, num_classes=shape["num_classes"], generator=generator)
    references = image_canaries(CANARY_REFERENCES, shape=size, num_classes=shape["num_classes"], generator=generator)
    return canaries, references


def data_shape(*splits: Split) -> dict:
    """``in_channels``, ``image_size`` and ``num_classes`` of images ``[N, C, H, W]`` with labels ``[N]``."""
    num_classes = int(max(split.y.max() for split in splits)) + 1
    return {"in_channels": splits[0].x.shape[1], "image_size": splits[0].x.shape[-1], "num_classes": num_classes}


def load_trained(path: str | os.PathLike) -> tuple[nn.Module, TrainConfig, list[dict]]:
    """The model, configuration and per-epoch history stored in a :class:`Trainer` checkpoint.

    Args:
        path: a checkpoint written by :meth:`Trainer.fit`.

    Returns:
        ``(model in eval mode, config, history)``.
    """
    checkpoint = _read_checkpoint(path)
    config = TrainConfig.from_dict(checkpoint["config"])
    model = build_model(config, **data_shape(*load_data(config)))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), config, checkpoint["history"]


def load_canaries(path: str | os.PathLike) -> tuple[Split, Split]:
    """The canaries a :class:`Trainer` checkpoint inserted and their never-inserted reference candidates.

    Returns:
        ``(canaries x [M, C, H, W], y [M]; references x [R, C, H, W], y [R])``; M is 0 for a run without canaries.
    """
    stored = _read_checkpoint(path)["canaries"]
    return Split(stored["x"], stored["y"]), Split(stored["references_x"], stored["references_y"])


def _read_checkpoint(path: str | os.PathLike) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; expected a file written by `privfast train`")
    checkpoint = torch.load(path, weights_only=False)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a privfast training checkpoint (format {CHECKPOINT_FORMAT}); "
                         "it was not written by `privfast train`")
    return checkpoint


def _soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    # An empty Poisson batch still steps (the update is pure noise); its mean loss would be NaN.
    return F.cross_entropy(logits, targets) if len(targets) else logits.sum() * 0.0


class Trainer:
    """Trains one model by :class:`TrainConfig`, auditing membership leakage after every epoch.

    Args:
        config: the run.
        data: ``(train, test)`` splits; default: :func:`load_data` of ``config``.
        checkpoint: file rewritten (atomically) after every epoch, and read by ``fit(resume=True)``.
        callbacks: called as ``callback(trainer, record)`` after each epoch's record is complete.
        progress: show progress bars over epochs and batches.
        distributed: a :class:`privfast.distributed.DistributedContext` to train across processes
            (private methods only); None trains in this process.

    Attributes:
        model: the plain model (not the per-example gradient wrapper).
        engine: the :class:`~privfast.privacy_engine.PrivacyEngine` of a private run, else None.
        history: one record per epoch: ``epoch``, ``train_loss``, ``test_accuracy``,
            ``train_accuracy``, one dict per attack (``auc``, ``decision_advantage``, ``p_err``,
            ``best_advantage``, ``tpr_at_fpr``), ``steps`` (optimizer steps so far), and for
            private runs ``epsilon``, ``dp_perr_bound`` (the lower bound
            ``(1 - delta) / (1 + e^epsilon)`` on P_err) and ``noise_multiplier`` (sigma).
        canaries: the inserted canaries ``x [M, C, H, W], y [M]`` (M = ``config.canaries``, may be 0).
        canary_references: their never-inserted reference candidates ``x [R, C, H, W], y [R]``.
    """

    def __init__(self, config: TrainConfig, *, data: Optional[tuple[Split, Split]] = None,
                 checkpoint: Optional[str | os.PathLike] = None,
                 callbacks: Iterable[Callable[["Trainer", dict], object]] = (), progress: bool = True,
                 distributed=None):
        if distributed is not None and not config.private:
            raise ValueError("distributed training is implemented for the private methods only, not "
                             f"{config.method!r}")
        self.config = config
        self.train_split, self.test_split = data if data is not None else load_data(config)
        self.checkpoint = checkpoint
        self.callbacks = list(callbacks)
        self.progress = progress
        self.distributed = distributed
        self.shape = data_shape(self.train_split, self.test_split)
        self.augmenter = config.augmenter(self.shape["num_classes"],
                                          pool=load_pool(config) if config.method == "dp-mix-diff" else None)
        self.canaries, self.canary_references = make_canaries(config, shape=self.shape)
        self.history: list[dict] = []
        self.engine: Optional[PrivacyEngine] = None

        torch.manual_seed(config.seed)
        self.model = build_model(config, **self.shape)
        sgd = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        if config.method in ("sam", "dp-sam"):  # PrivacyEngine turns a SAM into DP-SAM
            optimizer = SAM(self.model.parameters(), torch.optim.SGD, rho=config.rho, **sgd)
        else:
            optimizer = torch.optim.SGD(self.model.parameters(), **sgd)
        # The audit's members stay the real training examples: canaries are scored by exposure.
        trained_on = insert_canaries(self.train_split, self.canaries, repeats=config.canary_repeats)
        dataset = TensorDataset(trained_on.x, trained_on.y)
        if config.private:
            self.engine = PrivacyEngine()
            self.trained, self.optimizer, self.loader = self._make_private(optimizer, dataset)
        else:
            self.trained, self.optimizer = self.model, optimizer
            self.loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True)
        self.audit = MembershipAudit(
            self.train_split, self.test_split, attacks=config.attacks, max_examples=config.audit_examples,
            n_known=config.audit_known,
            epsilon=(lambda: self.engine.get_epsilon(config.delta)) if self.engine else None, delta=config.delta,
            seed=config.seed,
        )

    def _make_private(self, optimizer: torch.optim.Optimizer, dataset: TensorDataset):
        config = self.config
        # The loop augments each batch (not the loader's collate), so that one loop serves the
        # single-process and the distributed loaders alike.
        k = self.augmenter.augmult if self.augmenter is not None else 1
        args = dict(module=self.model, optimizer=optimizer, max_grad_norm=config.max_grad_norm, augmult=k,
                    grad_sample_mode=config.grad_sample_mode,
                    data_loader=DataLoader(dataset, batch_size=config.batch_size))
        if config.target_epsilon is not None:
            args.update(target_epsilon=config.target_epsilon, target_delta=config.delta, epochs=config.epochs)
        else:
            args.update(noise_multiplier=config.noise_multiplier)
        if self.distributed is not None:
            return self.distributed.make_private(self.engine, **args)
        if config.target_epsilon is not None:
            return self.engine.make_private_with_epsilon(**args)
        return self.engine.make_private(**args)

    @property
    def noise_multiplier(self) -> Optional[float]:
        """sigma of a private run (searched when ``target_epsilon`` is set), else None."""
        return self.optimizer.noise_multiplier if self.engine is not None else None

    @property
    def _sam(self) -> Optional[SAM]:
        """The SAM optimizer of a sam / dp-sam run (inside DP-SAM's wrapper), else None."""
        return next((o for o in (self.optimizer, getattr(self.optimizer, "original_optimizer", None))
                     if isinstance(o, SAM)), None)

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints and reports (rank 0, or the only process)."""
        return self.distributed is None or self.distributed.rank == 0

    # -- training ---------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> float:
        self.model.train()
        total, rows = 0.0, 0
        for x, y in tqdm(self.loader, desc=f"epoch {epoch + 1}", disable=not self.progress, leave=False):
            if self.augmenter is not None:
                x, y = self.augmenter(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss = _soft_cross_entropy(self.trained(x), y)
            loss.backward()
            if self._sam is not None:
                # SAM's second gradient, at the perturbed weights, on the same (augmented) batch.
                self.optimizer.step(lambda: _soft_cross_entropy(self.trained(x), y).backward())
            else:
                self.optimizer.step()
            total += float(loss.detach()) * len(y)
            rows += len(y)
        return total / rows if rows else math.nan

    def fit(self, *, resume: bool = False) -> list[dict]:
        """Train up to ``config.epochs`` epochs, auditing and checkpointing after each.

        Args:
            resume: continue from ``checkpoint`` if it exists (only ``epochs`` may differ from the
                stored configuration, to extend a run, and not with ``target_epsilon``, whose noise
                was chosen for the stored epoch count); without a checkpoint file, start afresh.

        Returns:
            :attr:`history`, one record per epoch trained so far.

        Raises:
            ValueError: ``resume`` without a checkpoint path, or a checkpoint of another run.
        """
        if resume and self.checkpoint is None:
            raise ValueError("resume=True needs the checkpoint path given to Trainer(checkpoint=...)")
        if resume and os.path.isfile(self.checkpoint):
            self._restore(_read_checkpoint(self.checkpoint))
        bar = tqdm(range(len(self.history), self.config.epochs), desc=self.config.method, disable=not self.progress)
        for epoch in bar:
            train_loss = self._train_epoch(epoch)
            # Distributed processes hold identical models and each audits its own: the records agree
            # without another collective (the audit's draws are seeded, not taken from the global RNG).
            record = {**self.audit(self.model, epoch + 1), "train_loss": train_loss,
                      "steps": (epoch + 1) * len(self.loader)}  # every epoch makes len(loader) steps
            if self.engine is not None:  # searched when target_epsilon is set: the config does not hold it
                record["noise_multiplier"] = self.optimizer.noise_multiplier
            self.history.append(record)
            bar.set_postfix(acc=f"{record['test_accuracy']:.3f}",
                            **({"eps": f"{record['epsilon']:.2f}"} if "epsilon" in record else {}))
            if self.checkpoint is not None:
                state = self._state()  # a collective when distributed: every process takes part
                if self.is_main:
                    atomic_save(state, self.checkpoint)
            for callback in self.callbacks:
                callback(self, record)
        return self.history

    def _state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # SAM keeps the descent optimizer's state (momentum) in its base optimizer, outside its state_dict.
            "sam_base_optimizer": self._sam.base_optimizer.state_dict() if self._sam is not None else None,
            "privacy_engine": self.engine.state_dict() if self.engine is not None else None,
            "world_size": 1 if self.distributed is None else self.distributed.world_size,
            # Each process's own stream (batches, augmentations), restored to the same process.
            "rng": torch.get_rng_state() if self.distributed is None else self.distributed.gather_rng_states(),
            "history": self.history,
            "audit_history": self.audit.history,
            "canaries": {"x": self.canaries.x, "y": self.canaries.y, "references_x": self.canary_references.x,
                         "references_y": self.canary_references.y},
        }

    def _restore(self, checkpoint: dict) -> None:
        stored = checkpoint["config"]
        current = self.config.to_dict()
        # With a target epsilon the noise was chosen to spend it in exactly `epochs` epochs.
        resumable = _RESUMABLE_CHANGES if self.config.target_epsilon is None else set()
        changed = sorted(k for k in current if k not in resumable and stored.get(k) != current[k])
        world_size = 1 if self.distributed is None else self.distributed.world_size
        if checkpoint["world_size"] != world_size:
            changed.append("world_size")
            stored, current = {**stored, "world_size": checkpoint["world_size"]}, {**current, "world_size": world_size}
        if changed:
            diff = ", ".join(f"{k}: {stored.get(k)!r} -> {current[k]!r}" for k in changed)
            raise ValueError(f"{self.checkpoint} belongs to another run ({diff}); only {sorted(_RESUMABLE_CHANGES)} "
                             "may change on resume: use another checkpoint path for a new run")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self._sam is not None:
            self._sam.base_optimizer.load_state_dict(checkpoint["sam_base_optimizer"])
            # Loading replaced the base optimizer's groups: share them with SAM again, as its constructor does.
            self._sam.param_groups = self._sam.base_optimizer.param_groups
        if self.engine is not None:
            self.engine.load_state_dict(checkpoint["privacy_engine"])
        rng = checkpoint["rng"]
        torch.set_rng_state(rng if self.distributed is None else rng[self.distributed.rank])
        self.history = list(checkpoint["history"])
        self.audit.history = list(checkpoint["audit_history"])

