"""Per-epoch privacy-utility audit: a trainer callback that attacks the model after every epoch.

Seed 001 (Liu, Oya & Kerschbaum) judges a training algorithm by the whole curve of test accuracy
against membership-inference error over training, and finds that early stopping alone lands at
a better point than much DP noise. :class:`MembershipAudit` records that curve::

    audit = MembershipAudit(members=train, nonmembers=test)
    train_classifier(model, *train, epochs=30, callbacks=[audit])      # or any trainer: audit(model, epoch)
    audit.history[-1]["calibrated"]["advantage"], audit.early_stopping_epoch()
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from privfast.attacks.mia import AttackResult, augmentation_aware, calibrated_threshold, yeom
from privfast.attacks.training import EVAL_BATCH, predict_logits
from privfast.metrics import dp_perr_bound

__all__ = ["ATTACKS", "MembershipAudit"]

Attack = Callable[..., AttackResult]
"""``attack(model, members, nonmembers, *, generator=...) -> AttackResult``."""

ATTACKS: dict[str, Attack] = {
    "yeom": yeom,
    "calibrated": calibrated_threshold,
    "calibrated_per_class": partial(calibrated_threshold, per_class=True),
    "augmentation_aware": augmentation_aware,
}
"""Attacks :class:`MembershipAudit` knows by name."""


def _subset(data, limit: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    x, y = data
    if len(y) <= limit:
        return x, y
    keep = torch.randperm(len(y), generator=generator)[:limit]
    return x[keep], y[keep]


def _accuracy(model: nn.Module, data, batch_size: int) -> float:
    x, y = data
    return float((predict_logits(model, x, batch_size=batch_size).argmax(1).cpu() == y.cpu()).double().mean())


class MembershipAudit:
    """Callback ``audit(model, epoch)`` recording test accuracy and attack metrics after each epoch.

    Args:
        members: the model's training examples ``(x, y)``; up to ``max_examples`` are attacked.
        nonmembers: examples it never trains on ``(x, y)``; up to ``max_examples`` are attacked.
        test: the utility set ``(x, y)``; default: ``nonmembers`` (seed 001's test set is its non-members).
        attacks: names from :data:`ATTACKS`, or a mapping name -> ``attack(model, members,
            nonmembers, *, generator)``, e.g. a :func:`~privfast.attacks.salem_nn` with its shadow bound.
        max_examples: cap on each of the two attacked sets (seed 000/001: 5,000 + 5,000); the
            subsets are drawn once, so every epoch is attacked on the same examples.
        n_known: the attacker's known members (and non-members) for the attacks named from
            :data:`ATTACKS` (seed 000: 100); both attacked sets must be larger.
        epsilon: returns the privacy spent so far (e.g. ``lambda: engine.get_epsilon(delta)``), or None.
        delta: the delta of ``epsilon``, for the bound ``P_err >= (1 - delta) / (1 + e^epsilon)``.
        seed: seeds the subsets and each epoch's attacker knowledge (the same every epoch, so
            epochs differ only by the model).
        batch_size: rows per forward pass.

    Attributes:
        history: one dict per call: ``epoch``, ``test_accuracy``, ``train_accuracy``, per attack a
            dict of ``advantage`` (of its own decision), ``auc``, ``p_err``, ``best_advantage`` and
            ``tpr_at_fpr``; plus ``epsilon`` and ``dp_perr_bound`` when ``epsilon`` is given.
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
                raise ValueError(f"unknown attacks {unknown}; expected names from {sorted(ATTACKS)} or a mapping "
                                 "name -> attack callable")
            smallest = min(len(self.members[1]), len(self.nonmembers[1]))
            if attacks and smallest <= n_known:
                raise ValueError(f"the attacked sets hold {len(self.members[1])} members and "
                                 f"{len(self.nonmembers[1])} non-members, but the attacker knows n_known={n_known} "
                                 f"of each and attacks the rest; lower n_known below {smallest} or give more examples")
            attacks = {name: partial(ATTACKS[name], n_known=n_known) for name in attacks}
        self.test = test if test is not None else nonmembers
        self.attacks = dict(attacks)
        self.epsilon = epsilon
        self.delta = delta
        self.seed = seed
        self.batch_size = batch_size
        self.history: list[dict] = []

    def __call__(self, model: nn.Module, epoch: int) -> dict:
        """Attack ``model`` as it stands after ``epoch``; append and return the record."""
        record = {
            "epoch": epoch,
            "test_accuracy": _accuracy(model, self.test, self.batch_size),
            "train_accuracy": _accuracy(model, self.members, self.batch_size),
        }
        for name, attack in self.attacks.items():
            result = attack(model, self.members, self.nonmembers, generator=torch.Generator().manual_seed(self.seed))
            record[name] = {
                "advantage": result.advantage,
                "p_err": (1 - result.advantage) / 2,
                "auc": result.summary["auc"],
                "best_advantage": result.summary["advantage"],
                "tpr_at_fpr": result.summary["tpr_at_fpr"],
            }
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
        """Privacy-utility curve: test accuracy against the attack's advantage, one point per epoch.

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
        advantage = [r[attack]["advantage"] for r in self.history]
        accuracy = [r["test_accuracy"] for r in self.history]
        ax.plot(advantage, accuracy, "o-", label=attack)
        stop = [r["epoch"] for r in self.history].index(self.early_stopping_epoch())
        ax.plot(advantage[stop], accuracy[stop], "r*", markersize=14, label="early stopping")
        ax.set_xlabel(f"{attack} advantage (TPR - FPR)")
        ax.set_ylabel("test accuracy")
        ax.legend()
        return ax
