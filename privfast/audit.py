"""Membership audits: a per-epoch trainer callback, and the audit of one trained model.

Liu, Oya & Kerschbaum ("Generalization techniques empirically outperform differential privacy
against membership inference", arXiv 2021) judge a training algorithm by the whole curve of test
accuracy against membership-inference error over training, and find that early stopping alone
lands at a better point than much DP noise. :class:`MembershipAudit` records that curve::

    audit = MembershipAudit(members=train, nonmembers=test)
    train_classifier(model, *train, epochs=30, callbacks=[audit])      # or any trainer: audit(model, epoch)
    audit.history[-1]["calibrated"]["decision_advantage"], audit.early_stopping_epoch()

:func:`audit_model` attacks one trained model once, as ``privfast audit`` does: the threshold
attacks, LiRA on shadow models, and the exposure of the canaries inserted in its training set;
:mod:`privfast.reports` renders its :class:`ModelAudit` as text and Markdown.

Every attack record holds two advantages, named apart because they answer different questions:
``decision_advantage`` (TPR - FPR of the attack's own calibrated decision, on the examples the
attacker did not know: what an attacker achieves) and ``best_advantage`` (the best threshold
chosen after seeing every score and label: an upper bound, not an attack).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from privfast.attacks.common import EVAL_BATCH, AttackResult, example_losses, predict_logits
from privfast.attacks.exposure import exposure, exposure_extrapolated
from privfast.attacks.mia import augmentation_aware, calibrated_threshold, yeom
from privfast.data import Split
from privfast.metrics import dp_perr_bound

__all__ = [
    "ATTACKS",
    "DEFAULT_ATTACKS",
    "CanaryExposure",
    "MembershipAudit",
    "ModelAudit",
    "audit_model",
    "canary_exposure",
    "extrapolate_exposure",
]

Attack = Callable[..., AttackResult]
"""``attack(model, members, nonmembers, *, generator=...) -> AttackResult``."""

ATTACKS: dict[str, Attack] = {
    "yeom": yeom,
    "calibrated": calibrated_threshold,
    "calibrated_per_class": partial(calibrated_threshold, per_class=True),
    "augmentation_aware": augmentation_aware,
}
"""Attacks :class:`MembershipAudit` knows by name."""

DEFAULT_ATTACKS = ("yeom", "calibrated", "calibrated_per_class", "augmentation_aware")
"""The attacks :func:`audit_model` runs unless told otherwise. yeom, calibrated and
calibrated_per_class score examples alike (``-loss``: one ROC curve, one AUC) and differ only in
their threshold; :meth:`ModelAudit.shared_scores` finds such groups from the scores themselves."""


def _subset(data, limit: int, generator: torch.Generator) -> Split:
    x, y = data
    if len(y) <= limit:
        return Split(x, y)
    keep = torch.randperm(len(y), generator=generator)[:limit]
    return Split(x[keep], y[keep])


def _accuracy(model: nn.Module, data: Split, batch_size: int) -> float:
    x, y = data
    return float((predict_logits(model, x, batch_size=batch_size).argmax(1).cpu() == y.cpu()).double().mean())


def _metrics(result: AttackResult) -> dict:
    """The numbers a record keeps of one attack; the decision's are None for an attack without one (LiRA)."""
    decision = result.decision_advantage
    return {
        "decision_advantage": decision,
        "p_err": None if decision is None else (1 - decision) / 2,
        "auc": result.summary["auc"],
        "best_advantage": result.best_advantage,
        "tpr_at_fpr": result.summary["tpr_at_fpr"],
    }


class MembershipAudit:
    """Callback ``audit(model, epoch)`` recording test accuracy and attack metrics after each epoch.

    Args:
        members: the model's training examples, a :class:`~privfast.data.Split` ``(x, y)``; up to
            ``max_examples`` are attacked.
        nonmembers: examples it never trains on ``(x, y)``; up to ``max_examples`` are attacked.
        test: the utility set ``(x, y)``; default: ``nonmembers`` (as in Liu et al., whose test set
            is the non-members).
        attacks: names from :data:`ATTACKS`, or a mapping name -> ``attack(model, members,
            nonmembers, *, generator)``, e.g. a :func:`~privfast.attacks.salem_nn` with its shadow bound.
        max_examples: cap on each of the two attacked sets (Liu et al.: 5,000 + 5,000); the
            subsets are drawn once, so every epoch is attacked on the same examples.
        n_known: the attacker's known members (and non-members) for the attacks named from
            :data:`ATTACKS` (Liu et al.: 100); both attacked sets must be larger.
        epsilon: returns the privacy spent so far (e.g. ``lambda: engine.get_epsilon(delta)``), or None.
        delta: the delta of ``epsilon``, for the bound ``P_err >= (1 - delta) / (1 + e^epsilon)``.
        seed: seeds the subsets and each epoch's attacker knowledge (the same every epoch, so
            epochs differ only by the model).
        batch_size: rows per forward pass.

    Attributes:
        history: one dict per call: ``epoch``, ``test_accuracy``, ``train_accuracy``, per attack a
            dict of ``decision_advantage`` (TPR - FPR of its own decision on the examples it did
            not know; None without a decision), ``p_err`` (of that decision), ``auc``,
            ``best_advantage`` (best threshold chosen knowing every label: an upper bound) and
            ``tpr_at_fpr``; plus ``epsilon`` and ``dp_perr_bound`` when ``epsilon`` is given.
        results: attack name -> the full :class:`~privfast.attacks.AttackResult` of the last call
            (scores and ROC), which the history does not keep.
    """

    def __init__(
        self,
        members,
        nonmembers,
        test=None,
        *,
        attacks: Union[Sequence[str], Mapping[str, Attack]] = ("yeom", "calibrated"),
        max_examples: int = 5000,
        n_known: int = 100,
        epsilon: Optional[Callable[[], float]] = None,
        delta: float = 1e-5,
        seed: int = 0,
        batch_size: int = EVAL_BATCH,
    ):
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        generator = torch.Generator().manual_seed(seed)
        self.members = _subset(members, max_examples, generator)
        self.nonmembers = _subset(nonmembers, max_examples, generator)
        if not isinstance(attacks, Mapping):
            unknown = [name for name in attacks if name not in ATTACKS]
            if unknown:
                raise ValueError(
                    f"unknown attacks {unknown}; expected names from {sorted(ATTACKS)} or a mapping "
                    "name -> attack callable"
                )
            smallest = min(len(self.members[1]), len(self.nonmembers[1]))
            if attacks and smallest <= n_known:
                raise ValueError(
                    f"the attacked sets hold {len(self.members[1])} members and "
                    f"{len(self.nonmembers[1])} non-members, but the attacker knows n_known={n_known} "
                    f"of each and attacks the rest; lower n_known (privfast audit --known) below {smallest} or "
                    "attack more examples (--examples)"
                )
            attacks = {name: partial(ATTACKS[name], n_known=n_known) for name in attacks}
        self.test = test if test is not None else nonmembers
        self.attacks = dict(attacks)
        self.epsilon = epsilon
        self.delta = delta
        self.seed = seed
        self.batch_size = batch_size
        self.history: list[dict] = []
        self.results: dict[str, AttackResult] = {}

    def __call__(self, model: nn.Module, epoch: int) -> dict:
        """Attack ``model`` as it stands after ``epoch``; append and return the record."""
        record = {
            "epoch": epoch,
            "test_accuracy": _accuracy(model, self.test, self.batch_size),
            "train_accuracy": _accuracy(model, self.members, self.batch_size),
        }
        for name, attack in self.attacks.items():
            result = attack(model, self.members, self.nonmembers, generator=torch.Generator().manual_seed(self.seed))
            self.results[name] = result
            record[name] = _metrics(result)
        if self.epsilon is not None:
            record["epsilon"] = float(self.epsilon())
            record["dp_perr_bound"] = dp_perr_bound(record["epsilon"], self.delta)
        self.history.append(record)
        return record

    def early_stopping_epoch(self, *, patience: Optional[int] = None) -> int:
        """The epoch whose model early stopping on test accuracy keeps.

        Args:
            patience: stop once accuracy has not improved for this many epochs (then keep the best
                so far); None looks at the whole run.

        Returns:
            The ``epoch`` of the kept record.
        """
        if not self.history:
            raise ValueError("no epoch recorded yet; pass the audit to the trainer as a callback first")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        best = 0
        for i, record in enumerate(self.history):
            if record["test_accuracy"] > self.history[best]["test_accuracy"]:
                best = i
            elif patience is not None and i - best >= patience:
                break
        return self.history[best]["epoch"]

    def plot(self, attack: Optional[str] = None, *, ax=None):
        """Privacy-utility curve: test accuracy against the attack's decision advantage, one point per epoch.

        Args:
            attack: which recorded attack (default: the last one given).
            ax: a matplotlib Axes to draw on (default: a new figure).

        Returns:
            The Axes.
        """
        import matplotlib.pyplot as plt

        if not self.history:
            raise ValueError("no epoch recorded yet")
        attack = attack or list(self.attacks)[-1]
        if attack not in self.attacks:
            raise ValueError(f"attack {attack!r} was not recorded; recorded: {list(self.attacks)}")
        ax = ax if ax is not None else plt.subplots()[1]
        advantage = [r[attack]["decision_advantage"] for r in self.history]
        accuracy = [r["test_accuracy"] for r in self.history]
        ax.plot(advantage, accuracy, "o-", label=attack)
        stop = [r["epoch"] for r in self.history].index(self.early_stopping_epoch())
        ax.plot(advantage[stop], accuracy[stop], "r*", markersize=14, label="early stopping")
        ax.set_xlabel(f"{attack} decision advantage (TPR - FPR on unknown examples)")
        ax.set_ylabel("test accuracy")
        ax.legend()
        return ax


# ------------------------------------------------------------------------------------------------
# The audit of one trained model
# ------------------------------------------------------------------------------------------------
def extrapolate_exposure(canary_losses: Tensor, reference_losses: Tensor) -> tuple[list[float], Optional[str]]:
    """Skew-normal exposures of the canaries, or NaNs where the fit cannot be made, with the fit's
    warning or error as a note: an audit reports an untrustworthy extrapolation instead of failing
    or hiding it.

    Args:
        canary_losses: ``[C]`` losses of the inserted canaries.
        reference_losses: ``[R]`` losses of candidates never inserted.

    Returns:
        ``(exposures [C] in bits, note or None)``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            fitted = exposure_extrapolated(canary_losses, reference_losses).tolist()
        except ValueError as error:
            return [math.nan] * len(canary_losses), f"not extrapolated: {error}"
    notes = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return fitted, "; ".join(notes) or None


@dataclass
class CanaryExposure:
    """Exposure of the canaries inserted in a model's training set (Carlini et al., "The Secret
    Sharer", USENIX Security 2019), ranked among references never inserted.

    Attributes:
        labels: each canary's label.
        losses: each canary's loss under the model.
        exposure: rank-based exposure in bits, at most :attr:`max_exposure`.
        extrapolated: skew-normal extrapolated exposure in bits (NaN where no fit).
        references: how many never-inserted candidates the canaries are ranked among.
        repeats: insertions of each canary (r).
        note: why the extrapolation is unreliable, or None.
    """

    labels: list[int]
    losses: list[float]
    exposure: list[float]
    extrapolated: list[float]
    references: int
    repeats: int = 1
    note: Optional[str] = None

    @property
    def inserted(self) -> int:
        return len(self.labels)

    @property
    def max_exposure(self) -> float:
        """``log2(references + 1)``: the exposure of a canary ranked above every reference."""
        return math.log2(self.references + 1)

    def to_dict(self) -> dict:
        return {
            "inserted": self.inserted,
            "references": self.references,
            "repeats": self.repeats,
            "max_exposure": self.max_exposure,
            "labels": self.labels,
            "losses": self.losses,
            "exposure": self.exposure,
            "exposure_extrapolated": self.extrapolated,
            "extrapolation_note": self.note,
        }


def canary_exposure(
    model: nn.Module, canaries: Split, references: Split, *, repeats: int = 1
) -> Optional[CanaryExposure]:
    """Rank-based and extrapolated exposure of inserted canaries; None when none were inserted.

    Args:
        model: the trained model.
        canaries: the inserted canaries ``(x [C, ...], y [C])``.
        references: candidates drawn like them and never inserted ``(x [R, ...], y [R])``.
        repeats: how often each canary was inserted (reported alongside).
    """
    if not len(canaries.y):
        return None
    canary_losses, reference_losses = example_losses(model, *canaries), example_losses(model, *references)
    fitted, note = extrapolate_exposure(canary_losses, reference_losses)
    return CanaryExposure(
        [int(label) for label in canaries.y],
        canary_losses.tolist(),
        exposure(canary_losses, reference_losses).tolist(),
        fitted,
        len(references.y),
        repeats,
        note,
    )


@dataclass
class ModelAudit:
    """What :func:`audit_model` measured on one trained model.

    Attributes:
        method: the training method of the model's run.
        epoch: the epoch the model was saved after.
        config: the run's configuration (a dict).
        record: a :class:`MembershipAudit` record: accuracies, per attack its numbers
            (``decision_advantage``, ``best_advantage``, ``auc``, ...), and ``epsilon`` /
            ``dp_perr_bound`` for a private run.
        results: attack name -> :class:`~privfast.attacks.AttackResult` (scores, ROC).
        members, nonmembers: examples attacked, each set.
        known: of each set, the examples the calibrated attacks' attacker knows.
        shadows: LiRA's shadow models (0: LiRA not run).
        canaries: the canaries' exposure, or None when the run inserted none.
    """

    method: str
    epoch: int
    config: dict
    record: dict
    results: dict[str, AttackResult]
    members: int
    nonmembers: int
    known: int
    shadows: int
    canaries: Optional[CanaryExposure] = None

    def shared_scores(self) -> list[list[str]]:
        """Groups of the audited attacks that gave every example the same score (one ROC curve)."""
        groups: list[list[str]] = []
        for name, result in self.results.items():
            for group in groups:
                first = self.results[group[0]]
                if torch.equal(first.member_scores, result.member_scores) and torch.equal(
                    first.nonmember_scores, result.nonmember_scores
                ):
                    group.append(name)
                    break
            else:
                groups.append([name])
        return [group for group in groups if len(group) > 1]

    def to_dict(self) -> dict:
        """JSON-ready numbers (no scores); ``privfast report`` reads them back from ``audit.json``."""
        return {
            "method": self.method,
            "epoch": self.epoch,
            "config": self.config,
            "record": self.record,
            "members": self.members,
            "nonmembers": self.nonmembers,
            "known": self.known,
            "shadows": self.shadows,
            "shared_scores": self.shared_scores(),
            "canaries": None if self.canaries is None else self.canaries.to_dict(),
        }


def _lira_attacks(
    config, members: Split, nonmembers: Split, *, shadows: int, epochs: int, seed: int, nproc: int, progress: bool
) -> dict[str, Attack]:
    """LiRA (online and offline) against the audited members and non-members.

    As in Carlini et al. ("Membership inference attacks from first principles", S&P 2022), the
    attacker trains ``shadows`` models of the target's architecture on random halves of the
    population it queries: the audited members and non-members together, so that every audited
    example is IN for half of the shadows and OUT for the other half. With ``nproc > 1``, or under
    torchrun, the shadows are sharded across processes.
    """
    from privfast import launch
    from privfast.attacks.lira import lira
    from privfast.attacks.training import train_shadow_models
    from privfast.data import data_shape
    from privfast.models import build_model

    x, y = torch.cat([members.x, nonmembers.x]), torch.cat([members.y, nonmembers.y])
    is_member = torch.arange(len(y)) < len(members.y)
    make_model = partial(build_model, config, **data_shape(Split(x, y)))  # picklable, for a sharded run
    if launch.is_distributed(nproc):  # --nproc N, or started by torchrun
        trained = launch.launch_shadow_models(
            make_model, x, y, n_shadows=shadows, nproc=nproc, seed=seed, epochs=epochs, progress=False
        )
    else:
        trained = train_shadow_models(
            make_model,
            x,
            y,
            n_shadows=shadows,
            epochs=epochs,
            generator=torch.Generator().manual_seed(seed),
            progress=progress,
        )

    def attack(model, members, nonmembers, *, generator, online: bool):
        # Per-example variances need many shadows (the paper: 64+); below that one pooled variance is steadier.
        return lira(model, trained, x, y, is_member=is_member, online=online, fix_variance=shadows < 64)

    return {"lira_online": partial(attack, online=True), "lira_offline": partial(attack, online=False)}


def audit_model(
    model: nn.Module,
    config,
    history: Sequence[dict],
    *,
    canaries: Optional[tuple[Split, Split]] = None,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    examples: int = 1000,
    known: int = 100,
    shadows: int = 16,
    shadow_epochs: int = 20,
    seed: int = 0,
    nproc: int = 1,
    progress: bool = False,
    data: Optional[tuple[Split, Split]] = None,
) -> ModelAudit:
    """Attack one model trained by :class:`privfast.trainer.Trainer`: threshold attacks, LiRA, canary exposure.

    Members are the run's training examples, non-members its test split; up to ``examples`` of
    each are attacked, and the calibrated attacks' attacker knows ``known`` of each.

    Args:
        model: the trained model.
        config: the run's :class:`~privfast.config.TrainConfig`.
        history: the run's per-epoch records (the last one gives the epoch and epsilon).
        canaries: ``(inserted, references)`` as :func:`privfast.canaries.load_canaries` returns
            them, or None.
        attacks: names from :data:`ATTACKS`.
        examples: members and non-members attacked, each.
        known: members and non-members the attacker knows, each.
        shadows: LiRA's shadow models, even (0: no LiRA).
        shadow_epochs: training epochs of each shadow model.
        seed: seeds the attacked subsets, the attacker's knowledge and the shadows.
        nproc: processes the shadow models are sharded across.
        progress: show the shadow models' progress bar.
        data: the run's ``(train, test)`` splits (default: loaded from ``config``).

    Returns:
        A :class:`ModelAudit`.
    """
    if not history:
        raise ValueError("the run has no epoch recorded; train at least one epoch first")
    if data is None:
        from privfast.data import load_data

        data = load_data(config)
    last = history[-1]  # a checkpoint is written after a whole epoch only
    audit = MembershipAudit(
        *data,
        attacks=attacks,
        max_examples=examples,
        n_known=known,
        seed=seed,
        epsilon=(lambda: last["epsilon"]) if "epsilon" in last else None,
        delta=config.delta,
    )
    if shadows:
        audit.attacks.update(
            _lira_attacks(
                config,
                audit.members,
                audit.nonmembers,
                shadows=shadows,
                epochs=shadow_epochs,
                seed=seed,
                nproc=nproc,
                progress=progress,
            )
        )
    record = audit(model, last["epoch"])
    exposure_ = None if canaries is None else canary_exposure(model, *canaries, repeats=config.canary_repeats)
    return ModelAudit(
        config.method,
        last["epoch"],
        config.to_dict(),
        record,
        dict(audit.results),
        len(audit.members.y),
        len(audit.nonmembers.y),
        known,
        shadows,
        exposure_,
    )
