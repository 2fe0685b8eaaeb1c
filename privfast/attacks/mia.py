"""Black-box membership inference attacks on a classifier: threshold attacks and Salem et al.'s NN attack.

Every attack scores *all* the given members and non-members (higher = more likely a member) and
returns an :class:`AttackResult`. The attacks that need attacker knowledge (N known members, and
non-members for the calibrated ones) draw it at random from the given sets, as Kaya & Dumitraş
("When Does Data Augmentation Help With Membership Inference Attacks?", ICML 2021) do
(N = 100 out of 5,000 + 5,000). Known examples are scored too, so scores line up with the input
order across runs (what :func:`privfast.metrics.outliers` needs), but the metrics of an attack's
decision (``decision_advantage``) leave them out; ``summary["best_advantage"]`` is the best
threshold chosen after seeing every score and label, known examples included: an upper bound.

yeom, calibrated_threshold and calibrated_threshold(per_class=True) share one score, ``-loss``:
one ROC curve and one AUC; they differ only in the threshold they decide with.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from privfast import ops
from privfast.attacks.common import EVAL_BATCH, AttackResult, attack_result, example_losses, labelled, predict_logits
from privfast.augment.mechanisms import Mechanism
from privfast.data import Split
from privfast.metrics import attack_summary

__all__ = [
    "REDUCTIONS",
    "augmentation_aware",
    "calibrated_threshold",
    "salem_nn",
    "yeom",
]


def _known(n: int, n_known: int, name: str, generator: Optional[torch.Generator]) -> Tensor:
    """Indices of the ``n_known`` examples of a set of ``n`` that the attacker knows (at least one stays unknown)."""
    if not 1 <= n_known < n:
        raise ValueError(
            f"n_known must be in [1, {n - 1}]: the attacker knows some of the {n} {name} and "
            f"the rest are attacked; got {n_known}"
        )
    return torch.randperm(n, generator=generator)[:n_known]


def _best_threshold(member_scores: Tensor, nonmember_scores: Tensor) -> float:
    """The threshold that maximizes balanced accuracy (TPR - FPR) on these scores."""
    return attack_summary(member_scores, nonmember_scores)["threshold"]


def _losses(model: nn.Module, members: Split, nonmembers: Split, batch_size: int) -> tuple[Tensor, Tensor]:
    return (
        example_losses(model, *labelled(members, "members"), batch_size=batch_size).cpu(),
        example_losses(model, *labelled(nonmembers, "nonmembers"), batch_size=batch_size).cpu(),
    )


def yeom(
    model: nn.Module,
    members: Split,
    nonmembers: Split,
    *,
    n_known: int = 100,
    generator: Optional[torch.Generator] = None,
    batch_size: int = EVAL_BATCH,
) -> AttackResult:
    """Yeom et al.'s threshold attack: member iff loss <= the mean loss of ``n_known`` known members.

    Args:
        model: the target classifier.
        members: its training examples to test, ``(x [N_m, ...], y [N_m])``.
        nonmembers: examples it did not see, ``(x [N_n, ...], y [N_n])``.
        n_known: N, the members the attacker knows (Kaya & Dumitraş: 100).
        generator: draws the known members.
        batch_size: rows per forward pass.

    Returns:
        :class:`AttackResult` with scores ``-loss``; ``info["threshold"]`` is the loss threshold.
    """
    member_losses, nonmember_losses = _losses(model, members, nonmembers, batch_size)
    known = _known(len(member_losses), n_known, "members", generator)
    threshold = member_losses[known].mean()
    return attack_result(
        -member_losses,
        -nonmember_losses,
        member_threshold=-threshold,
        nonmember_threshold=-threshold,
        known=(known,),
        info={"threshold": float(threshold)},
    )


def _known_pair(
    n_members: int, n_nonmembers: int, n_known: int, generator: Optional[torch.Generator]
) -> tuple[Tensor, Tensor]:
    return (_known(n_members, n_known, "members", generator), _known(n_nonmembers, n_known, "nonmembers", generator))


def _calibrated(
    member_scores: Tensor,
    nonmember_scores: Tensor,
    known_m: Tensor,
    known_n: Tensor,
    *,
    member_labels: Optional[Tensor] = None,
    nonmember_labels: Optional[Tensor] = None,
    info: Optional[dict] = None,
) -> AttackResult:
    """Threshold on scores with the best accuracy on the known members and non-members; per class with labels."""
    overall = _best_threshold(member_scores[known_m], nonmember_scores[known_n])
    info = {**(info or {}), "threshold": overall}
    if member_labels is None:
        return attack_result(
            member_scores,
            nonmember_scores,
            member_threshold=overall,
            nonmember_threshold=overall,
            known=(known_m, known_n),
            info=info,
        )
    num_classes = int(max(member_labels.max(), nonmember_labels.max())) + 1
    per_class = torch.full((num_classes,), overall, dtype=torch.float64)
    for c in range(num_classes):  # a loop over classes, each a vectorized threshold search
        in_m, in_n = known_m[member_labels[known_m] == c], known_n[nonmember_labels[known_n] == c]
        if len(in_m) and len(in_n):  # a class the attacker has no examples of keeps the overall threshold
            per_class[c] = _best_threshold(member_scores[in_m], nonmember_scores[in_n])
    info["class_thresholds"] = per_class
    return attack_result(
        member_scores,
        nonmember_scores,
        member_threshold=per_class[member_labels].to(member_scores.dtype),
        nonmember_threshold=per_class[nonmember_labels].to(nonmember_scores.dtype),
        known=(known_m, known_n),
        info=info,
    )


def calibrated_threshold(
    model: nn.Module,
    members: Split,
    nonmembers: Split,
    *,
    n_known: int = 100,
    per_class: bool = False,
    generator: Optional[torch.Generator] = None,
    batch_size: int = EVAL_BATCH,
) -> AttackResult:
    """The "powerful" attack of Kaya & Dumitraş: the loss threshold most accurate on N known members and N non-members.

    The search is exact: every threshold between the 2N known losses is tried (the reference sweeps
    mean ± k·std on a grid). With ``per_class`` (Song & Mittal), each class gets the threshold that is
    best on the known examples of that class; a class without known members and non-members keeps
    the overall one.

    Args:
        model: the target classifier.
        members: its training examples to test, ``(x [N_m, ...], y [N_m])``.
        nonmembers: examples it did not see, ``(x [N_n, ...], y [N_n])``.
        n_known: N, the known members and known non-members (Kaya & Dumitraş: 100 each).
        per_class: one threshold per class.
        generator: draws the known examples.
        batch_size: rows per forward pass.

    Returns:
        :class:`AttackResult` with scores ``-loss``; ``info["threshold"]`` is the overall threshold on
        scores (on ``-loss``) and, per class, ``info["class_thresholds"] [K]``.
    """
    member_losses, nonmember_losses = _losses(model, members, nonmembers, batch_size)
    labels = {"member_labels": members[1].cpu(), "nonmember_labels": nonmembers[1].cpu()} if per_class else {}
    known = _known_pair(len(member_losses), len(nonmember_losses), n_known, generator)
    return _calibrated(-member_losses, -nonmember_losses, *known, **labels)


def _top3_posteriors(model: nn.Module, x: Tensor, batch_size: int) -> np.ndarray:
    """Salem et al.'s attack features: the three largest softmax posteriors, sorted, ``[N, 3]``."""
    probs = predict_logits(model, x, batch_size=batch_size).softmax(1)
    if probs.shape[1] < 3:
        raise ValueError(f"the Salem attack uses the top-3 posteriors; the model has {probs.shape[1]} classes")
    return probs.topk(3, dim=1).values.double().cpu().numpy()


def salem_nn(
    model: nn.Module,
    members: Split,
    nonmembers: Split,
    *,
    shadow_model: nn.Module,
    shadow_members: Split,
    shadow_nonmembers: Split,
    hidden: int = 64,
    seed: int = 0,
    batch_size: int = EVAL_BATCH,
) -> AttackResult:
    """Salem et al.'s attack: an MLP on the sorted top-3 posteriors, trained on one shadow model.

    The shadow model is trained by the attacker, with the target's recipe, on ``shadow_members``
    (data disjoint from the target's, from the same distribution); ``shadow_nonmembers`` are other
    examples of that distribution. The attack model (scikit-learn's ``MLPClassifier``, one hidden
    layer) learns shadow membership from the shadow's posteriors, on equally many shadow members
    and non-members (the larger set is subsampled), then reads the target's.

    Args:
        model: the target classifier.
        members, nonmembers: the target's examples to test, as in :func:`yeom`.
        shadow_model: the trained shadow model.
        shadow_members: the shadow's training examples.
        shadow_nonmembers: examples the shadow did not see.
        hidden: width of the attack MLP's hidden layer (Salem et al.: 64).
        seed: seed of the attack MLP's initialization.
        batch_size: rows per forward pass.

    Returns:
        :class:`AttackResult` with scores P(member); the decision is P(member) >= 1/2.
    """
    from sklearn.neural_network import MLPClassifier

    features = [
        _top3_posteriors(net, labelled(data, name)[0], batch_size)
        for net, data, name in (
            (shadow_model, shadow_members, "shadow_members"),
            (shadow_model, shadow_nonmembers, "shadow_nonmembers"),
            (model, members, "members"),
            (model, nonmembers, "nonmembers"),
        )
    ]
    # Equal numbers of shadow members and non-members, so that the attack model learns no prior.
    rng = np.random.default_rng(seed)
    size = min(len(features[0]), len(features[1]))
    train = np.concatenate([f[rng.permutation(len(f))[:size]] for f in features[:2]])
    labels = np.concatenate([np.ones(size), np.zeros(size)])
    attack = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=1000, random_state=seed).fit(train, labels)
    member_scores, nonmember_scores = (torch.from_numpy(attack.predict_proba(f)[:, 1]) for f in features[2:])
    return attack_result(
        member_scores, nonmember_scores, member_threshold=0.5, nonmember_threshold=0.5, info={"attack_model": attack}
    )


REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda losses: losses.mean(1),
    "median": lambda losses: losses.median(1).values,
    "min": lambda losses: losses.amin(1),
    "max": lambda losses: losses.amax(1),
    "std": lambda losses: losses.std(1),
}
"""Statistics of an example's losses under augmentation draws ``[N, draws] -> [N]``; low means "member"."""


def _augmented_losses(
    model: nn.Module, x: Tensor, y: Tensor, draws: int, augment, generator, batch_size: int
) -> Tensor:
    """Losses ``[N, draws]`` of each example under ``draws`` independent augmentations."""
    repeated_x, repeated_y = x.repeat_interleave(draws, 0), y.repeat_interleave(draws, 0)
    if isinstance(augment, Mechanism):
        num_classes = predict_logits(model, x[:1]).shape[1]
        targets = torch.nn.functional.one_hot(repeated_y, num_classes).to(x.dtype)
        augmented = augment(repeated_x, targets, generator=generator)[0]
    else:
        augmented = augment(repeated_x, generator=generator)
    return example_losses(model, augmented, repeated_y, batch_size=batch_size).view(len(y), draws).cpu()


def _crop_and_flip(x: Tensor, *, generator: Optional[torch.Generator]) -> Tensor:
    """One reflect-padded random crop (padding 4) with a random horizontal flip of each row."""
    return ops.augment_batch(x, 1, crop_padding=min(4, min(x.shape[-2:]) - 1), flip=True, generator=generator)


def augmentation_aware(
    model: nn.Module,
    members: Split,
    nonmembers: Split,
    *,
    draws: int = 20,
    augment: Union[Mechanism, Callable[..., Tensor]] = _crop_and_flip,
    n_known: int = 100,
    generator: Optional[torch.Generator] = None,
    batch_size: int = EVAL_BATCH,
) -> AttackResult:
    """The augmentation-aware attack: losses under ``draws`` augmentations, reduced by the best statistic.

    Each reduction of :data:`REDUCTIONS` (mean, median, min, max, std) of an example's losses is a
    candidate score; the attacker keeps the one whose calibrated threshold has the highest
    advantage on its N known members and N known non-members, then applies that threshold.

    Args:
        model: the target classifier.
        members, nonmembers: as in :func:`yeom`.
        draws: augmentations per example (Kaya & Dumitraş: 20).
        augment: the training-time augmentation: a :class:`~privfast.augment.mechanisms.Mechanism`
            (its image part is used), or ``augment(x [B, ...], generator=...) -> [B, ...]`` drawing one
            augmentation per row. Default: reflect-padded random crop (padding 4) and flip.
        n_known: N, as in :func:`calibrated_threshold`.
        generator: draws the augmentations and the known examples.
        batch_size: rows per forward pass.

    Returns:
        :class:`AttackResult` with scores ``-reduction(losses)``; ``info["reduction"]`` names the
        chosen statistic and ``info["known_advantage"]`` maps each statistic to its advantage on the known examples.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    member_losses, nonmember_losses = (
        _augmented_losses(model, *labelled(data, name), draws, augment, generator, batch_size)
        for data, name in ((members, "members"), (nonmembers, "nonmembers"))
    )
    known_m, known_n = _known_pair(len(member_losses), len(nonmember_losses), n_known, generator)
    known_advantage = {
        name: attack_summary(-reduce(member_losses[known_m]), -reduce(nonmember_losses[known_n]))["best_advantage"]
        for name, reduce in REDUCTIONS.items()
    }
    best = max(known_advantage, key=known_advantage.get)
    return _calibrated(
        -REDUCTIONS[best](member_losses),
        -REDUCTIONS[best](nonmember_losses),
        known_m,
        known_n,
        info={"reduction": best, "known_advantage": known_advantage},
    )
