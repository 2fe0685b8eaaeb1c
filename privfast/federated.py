"""Collaborative-learning simulation: participants, an honest-but-curious server, and defenses.

The setting of ATS (Gao et al., CVPR 2021, Section 5): N participants (10 by default) hold equal,
same-distribution shares of the training data and train one global model with FedSGD (each
shares a minibatch gradient every round) or FedAvg (each shares the change of a local copy after
a few local steps). The server is honest but curious: it follows the protocol and runs a
gradient-inversion attack on what a participant shares. A participant can defend by transforming
its data with an ATS policy, adding Gaussian or Laplacian noise to what it shares, or pruning it
per layer; :func:`evaluate_defenses` trains and attacks once per defense and reports PSNR and
accuracy side by side, like the paper's Table 3. :func:`invert_gradients` inverts one model's
per-example gradients without and with a policy (the paper's Fig. 4) and scores the
reconstructions against the shared (transformed) images, which measures the defense, and against
the clean ones.

All participants are simulated in batched passes: ``torch.func.vmap`` over participants of the
gradient of each one's minibatch loss (FedSGD), or of each one's local copy (FedAvg).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from privfast.attacks.reconstruction import (
    AttackConfig,
    per_example_gradients,
    psnr,
    reconstruct,
    ssim,
)
from privfast.augment.ats_library import Policy
from privfast.data import Split
from privfast.search.scores import Stats, normalize
from privfast.search.search import SearchResult, ats_search

__all__ = [
    "Defense",
    "DefenseReport",
    "Federation",
    "ServerAttack",
    "add_noise",
    "ats_experiment",
    "INVERSION_NOTE",
    "Inversion",
    "evaluate_defenses",
    "format_report",
    "invert_gradients",
    "prune",
    "split_participants",
]

_NOISE = ("gaussian", "laplacian")


# ----------------------------------------------------------------------------------------
# Defenses on shared gradients (batched over a leading dimension of senders)
# ----------------------------------------------------------------------------------------


def add_noise(
    grads: Sequence[Tensor], *, kind: str, scale: float, generator: Optional[torch.Generator] = None
) -> list[Tensor]:
    """Add i.i.d. noise to every entry: ``N(0, scale^2)`` (``"gaussian"``) or ``Laplace(0, scale)``
    (``"laplacian"``), as in DLG's and ATS's baselines ("Gaussian(1e-3)" is ``scale=1e-3``).

    Args:
        grads: tensors of any shape.
        kind: ``"gaussian"`` or ``"laplacian"``.
        scale: standard deviation (Gaussian) or diversity b (Laplacian), >= 0.
        generator: source of the noise.

    Returns:
        The noisy tensors.
    """
    if kind not in _NOISE:
        raise ValueError(f"noise kind must be one of {_NOISE}, got {kind!r}")
    if not scale >= 0:
        raise ValueError(f"noise scale must be >= 0, got {scale}")
    out = []
    for g in grads:
        if kind == "gaussian":
            noise = torch.randn(g.shape, generator=generator, dtype=g.dtype)
        else:  # inverse CDF of the Laplace distribution on u ~ U(-1/2, 1/2)
            u = torch.rand(g.shape, generator=generator, dtype=g.dtype) - 0.5
            noise = -u.sign() * torch.log1p(-2 * u.abs())
        out.append(g + scale * noise.to(g.device))
    return out


def prune(grads: Sequence[Tensor], *, ratio: float) -> list[Tensor]:
    """Per-layer magnitude pruning of each sender's gradient (Lin et al.'s deep gradient compression,
    as DLG and ATS use it): in every tensor of every row, the ``ratio`` fraction of entries of
    smallest magnitude is zeroed and the rest kept as they are.

    Args:
        grads: ``[S, *shape_i]`` per tensor, one row per sender.
        ratio: fraction pruned, in [0, 1] (0.7 keeps the top 30%).

    Returns:
        The pruned tensors, same shapes.
    """
    if not 0 <= ratio <= 1:
        raise ValueError(f"prune ratio must be in [0, 1], got {ratio}")
    out = []
    for g in grads:
        flat = g.flatten(1)
        drop = int(math.floor(ratio * flat.shape[1]))
        if drop == 0:
            out.append(g)
            continue
        # The drop-th smallest magnitude of each row is its threshold; ties at it are dropped too.
        threshold = flat.abs().kthvalue(drop, dim=1, keepdim=True).values
        out.append(torch.where(flat.abs() > threshold, flat, 0).view_as(g))
    return out


@dataclass(frozen=True)
class Defense:
    """What a participant does to protect its data.

    Attributes:
        name: label in reports.
        policy: ATS transformation policy applied to its images (e.g. ``"3-1-7+43-18-18"``), or None.
        noise: ``"gaussian"`` or ``"laplacian"`` noise on what it shares, or None.
        noise_scale: the noise's standard deviation (Gaussian) or diversity (Laplacian).
        prune_ratio: fraction of each layer's smallest-magnitude entries zeroed before sharing.
    """

    name: str = "none"
    policy: Optional[str] = None
    noise: Optional[str] = None
    noise_scale: float = 0.0
    prune_ratio: float = 0.0

    def __post_init__(self):
        if self.noise is not None and self.noise not in _NOISE:
            raise ValueError(f"noise must be None or one of {_NOISE}, got {self.noise!r}")
        if not 0 <= self.prune_ratio <= 1 or self.noise_scale < 0:
            raise ValueError(
                f"prune_ratio must be in [0, 1] and noise_scale >= 0, got {self.prune_ratio}, {self.noise_scale}"
            )
        if self.policy is not None:
            Policy(self.policy)  # fail early on a malformed policy

    def transform(self, x: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """Apply the policy (if any) to images ``[N, C, H, W]`` in [0, 1]."""
        return Policy(self.policy)(x, generator=generator) if self.policy is not None else x

    def protect(self, shared: Sequence[Tensor], *, generator: Optional[torch.Generator] = None) -> list[Tensor]:
        """Prune, then add noise to, the shared tensors ``[S, *shape_i]`` (one row per sender)."""
        shared = prune(shared, ratio=self.prune_ratio) if self.prune_ratio > 0 else list(shared)
        if self.noise is not None and self.noise_scale > 0:
            shared = add_noise(shared, kind=self.noise, scale=self.noise_scale, generator=generator)
        return shared


# ----------------------------------------------------------------------------------------
# Federation
# ----------------------------------------------------------------------------------------


def split_participants(n: int, participants: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """Equal, disjoint random shares of ``n`` examples: int64 ``[participants, n // participants]``
    (the remainder is left out so that every share has the same size)."""
    if not 1 <= participants <= n:
        raise ValueError(f"participants must be in [1, {n}] for {n} examples, got {participants}")
    per = n // participants
    return torch.randperm(n, generator=generator)[: per * participants].view(participants, per)


class Federation:
    """Participants training one global model through a parameter server.

    Args:
        model: the global model (trained in place). Use GroupNorm or no normalization: the
            participants are vmapped, which BatchNorm's running statistics do not allow.
        data: the training :class:`~privfast.data.Split`: images ``[N, C, H, W]`` in [0, 1] and
            int64 labels ``[N]`` (any pair ``(x, y)``).
        participants: number of participants (10 in ATS), each with ``N // participants`` examples.
        defense: what every participant does to its data and to what it shares.
        algorithm: ``"fedsgd"`` (share a minibatch gradient each round) or ``"fedavg"`` (share
            ``global - local`` after ``local_steps`` local SGD steps).
        batch_size: minibatch per participant and step.
        lr: server learning rate (FedSGD) or local learning rate (FedAvg).
        momentum, weight_decay: the server's SGD (FedSGD; ATS trains with both).
        local_steps: local SGD steps per round (FedAvg).
        mean, std: data normalization applied after the policy.
        seed: seed of the split and of every draw.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Split,
        *,
        participants: int = 10,
        defense: Defense = Defense(),
        algorithm: str = "fedsgd",
        batch_size: int = 32,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        local_steps: int = 5,
        mean: Stats = None,
        std: Stats = None,
        seed: int = 0,
    ):
        if algorithm not in ("fedsgd", "fedavg"):
            raise ValueError(f"algorithm must be 'fedsgd' or 'fedavg', got {algorithm!r}")
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError(
                "Federation vmaps the participants, which BatchNorm's running statistics do not "
                "allow: build the model with GroupNorm (e.g. norm='group')"
            )
        if batch_size < 1 or local_steps < 1:
            raise ValueError(f"batch_size and local_steps must be >= 1, got {batch_size}, {local_steps}")
        self.model, self.defense, self.algorithm = model, defense, algorithm
        self.batch_size, self.lr, self.local_steps = batch_size, lr, local_steps
        self.mean, self.std = mean, std
        self.generator = torch.Generator().manual_seed(seed)
        x, y = Split(*data)
        self.shares = split_participants(x.shape[0], participants, generator=self.generator)
        self.x, self.y = x, y
        if self.batch_size > self.shares.shape[1]:
            raise ValueError(f"batch_size {batch_size} exceeds a participant's {self.shares.shape[1]} examples")
        self.optimizer = torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=momentum if algorithm == "fedsgd" else 0,
            weight_decay=weight_decay if algorithm == "fedsgd" else 0,
        )
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._buffers = dict(model.named_buffers())
        self._batch_grad = vmap(grad(self._batch_loss), in_dims=(0 if algorithm == "fedavg" else None, 0, 0))

    @property
    def participants(self) -> int:
        return self.shares.shape[0]

    def _batch_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(self.model, (params, self._buffers), (x,)), y)

    def _draw_batches(self) -> tuple[Tensor, Tensor]:
        """One defended minibatch per participant: ``[P, b, C, H, W]`` and ``[P, b]``."""
        pick = torch.rand(self.shares.shape, generator=self.generator).argsort(1)[:, : self.batch_size]
        index = self.shares.gather(1, pick).flatten()
        x = normalize(self.defense.transform(self.x[index], generator=self.generator), self.mean, self.std)
        return x.view(self.participants, self.batch_size, *x.shape[1:]), self.y[index].view(self.participants, -1)

    def _messages(self) -> list[Tensor]:
        """What each participant shares this round, before its defense: ``[P, *shape_i]``."""
        params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        if self.algorithm == "fedsgd":
            grads = self._batch_grad(params, *self._draw_batches())
            return [grads[n] for n in self._names]
        local = {n: p.expand(self.participants, *p.shape).clone() for n, p in params.items()}
        for _ in range(self.local_steps):
            grads = self._batch_grad(local, *self._draw_batches())
            local = {n: local[n] - self.lr * grads[n] for n in self._names}
        return [params[n] - local[n] for n in self._names]

    def round(self) -> None:
        """One communication round: every participant shares, the server averages and updates."""
        shared = self.defense.protect(self._messages(), generator=self.generator)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.algorithm == "fedsgd":
            for p, s in zip(trainable, shared):
                p.grad = s.mean(0)
            self.optimizer.step()
        else:  # FedAvg: the new global model is the mean of the local ones
            with torch.no_grad():
                for p, s in zip(trainable, shared):
                    p.sub_(s.mean(0))

    def train(self, rounds: int, *, progress: bool = True) -> "Federation":
        """Run ``rounds`` rounds with the model in train mode, decaying the FedSGD server's learning
        rate by 10x at 1/2 and 3/4 of the run. Returns self."""
        self.model.train()
        scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, [rounds // 2, 3 * rounds // 4], gamma=0.1)
        for _ in tqdm(range(rounds), desc=f"{self.algorithm} ({self.defense.name})", disable=not progress):
            self.round()
            if self.algorithm == "fedsgd":
                scheduler.step()
        return self

    @torch.no_grad()
    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Top-1 accuracy of the global model (eval mode) on images ``[N, C, H, W]`` in [0, 1]."""
        self.model.eval()
        return float((self.model(normalize(x, self.mean, self.std)).argmax(1) == y).float().mean())

    def attack(
        self,
        participant: int = 0,
        *,
        images: int = 8,
        config: Union[str, AttackConfig] = "adam_cosine",
        known_labels: bool = True,
        progress: bool = True,
        **overrides,
    ) -> "ServerAttack":
        """The honest-but-curious server inverts a participant's shared gradients.

        As in ATS, the strongest case is attacked: ``images`` rounds of batch size 1, i.e. one
        shared gradient per example of the participant's share, each computed on the transformed
        image and protected by the participant's defense; all are reconstructed in one batched run.

        Args:
            participant: whose share is attacked.
            images: examples attacked (the first of the share).
            config: reconstruction preset or :class:`AttackConfig`.
            known_labels: give the attack the true labels (ATS); else iDLG recovers them.
            progress: show the attack's progress bar.
            **overrides: :class:`AttackConfig` fields to change.

        Returns:
            A :class:`ServerAttack`; PSNR and SSIM compare with the transformed images, as ATS does.
        """
        if not 0 <= participant < self.participants:
            raise ValueError(f"participant must be in [0, {self.participants}), got {participant}")
        index = self.shares[participant, :images]
        self.model.eval()
        transformed = self.defense.transform(self.x[index], generator=self.generator)
        labels = self.y[index]
        shared = self.defense.protect(
            per_example_gradients(self.model, normalize(transformed, self.mean, self.std), labels),
            generator=self.generator,
        )
        rec = reconstruct(
            self.model,
            shared,
            labels if known_labels else None,
            shape=transformed.shape[1:],
            config=config,
            mean=self.mean,
            std=self.std,
            generator=self.generator,
            progress=progress,
            **overrides,
        )
        return ServerAttack(
            rec.images, transformed, self.x[index], psnr(rec.images, transformed), ssim(rec.images, transformed)
        )


class ServerAttack(NamedTuple):
    """Images ``[T, C, H, W]`` in [0, 1] and per-image scores ``[T]`` of a server attack."""

    reconstructed: Tensor
    transformed: Tensor
    original: Tensor
    psnr: Tensor
    ssim: Tensor


class DefenseReport(NamedTuple):
    """One row of :func:`evaluate_defenses`: mean PSNR (dB) and SSIM of the attack, test accuracy."""

    defense: str
    psnr: float
    ssim: float
    accuracy: float


def evaluate_defenses(
    make_model: Callable[[], nn.Module],
    train: Split,
    test: Split,
    defenses: Sequence[Defense],
    *,
    rounds: int = 200,
    attack_images: int = 8,
    attack: Union[str, AttackConfig] = "adam_cosine",
    seed: int = 0,
    progress: bool = True,
    federation_kwargs: Optional[dict] = None,
    **attack_overrides,
) -> list[DefenseReport]:
    """Train a federation per defense from the same initialization, attack participant 0, and
    report PSNR and accuracy per defense (ATS Table 3).

    Args:
        make_model: builds the (freshly initialized) global model; called once, then copied.
        train, test: :class:`~privfast.data.Split` s of images in [0, 1] and labels.
        defenses: the defenses to compare (include ``Defense()`` for the undefended baseline).
        rounds: communication rounds per federation.
        attack_images: examples of participant 0 attacked, one shared gradient each.
        attack: reconstruction preset or :class:`AttackConfig`.
        seed: seed of the model, the splits and every draw (the same for every defense).
        progress: show progress bars.
        federation_kwargs: further :class:`Federation` arguments (participants, algorithm, lr, ...).
        **attack_overrides: :class:`AttackConfig` fields to change, e.g. ``iterations=300``.

    Returns:
        One :class:`DefenseReport` per defense, in order.
    """
    torch.manual_seed(seed)
    initial = make_model().state_dict()
    reports = []
    for defense in defenses:
        model = make_model()
        model.load_state_dict(initial)
        fed = Federation(model, train, defense=defense, seed=seed, **(federation_kwargs or {}))
        fed.train(rounds, progress=progress)
        result = fed.attack(0, images=attack_images, config=attack, progress=progress, **attack_overrides)
        reports.append(
            DefenseReport(
                defense.name, float(result.psnr.mean()), float(result.ssim.mean()), fed.accuracy(*Split(*test))
            )
        )
    return reports


def format_report(reports: Sequence[DefenseReport], *, markdown: bool = False) -> str:
    """The reports as a table (defense, PSNR and SSIM against the transformed images, accuracy %)."""
    from privfast.reports import table

    return table(
        ["defense", "PSNR", "SSIM", "ACC"],
        [[r.defense, f"{r.psnr:.2f}", f"{r.ssim:.3f}", f"{100 * r.accuracy:.2f}%"] for r in reports],
        markdown=markdown,
    )


def ats_experiment(
    make_model: Callable[[], nn.Module],
    train: Split,
    test: Split,
    *,
    candidates: int = 200,
    images: int = 20,
    acc_threshold: Optional[float] = None,
    top_n: int = 2,
    semi_fraction: float = 0.1,
    semi_epochs: int = 50,
    baselines: Sequence[Defense] = (),
    rounds: int = 100,
    attack_images: int = 16,
    seed: int = 0,
    progress: bool = True,
    federation_kwargs: Optional[dict] = None,
    **attack_overrides,
) -> tuple[SearchResult, list[DefenseReport]]:
    """The whole ATS pipeline: semi-train, search, train collaboratively with the hybrid, attack.

    1-2. :func:`privfast.search.ats_search`: ``M^s`` trained on ``semi_fraction`` of ``train`` for
       ``semi_epochs`` epochs (ATS: 10% for 50 epochs), ``M^r`` at random initialization, and the
       search over ``candidates`` random policies.
    3. :func:`evaluate_defenses` for no defense, the hybrid, each selected policy, and ``baselines``
       (e.g. noise or pruning), every federation from the same initialization.

    Args:
        make_model: builds a freshly initialized model (GroupNorm or no normalization).
        train, test: :class:`~privfast.data.Split` s of images in [0, 1] and labels.
        candidates, images, top_n: search settings (see :func:`privfast.search.search`).
        acc_threshold: S_acc filter; default the S_acc of no transformation on ``M^r``, i.e. keep
            the policies that score at least as well as the raw data (the absolute -85 of ATS's
            CIFAR-100 runs depends on the number of classes and the model).
        semi_fraction, semi_epochs: how ``M^s`` is trained (Adam, lr 1e-3, batch 64).
        baselines: further defenses to report.
        rounds, attack_images: collaborative training and attack sizes.
        seed: seed of every draw.
        progress: show progress bars.
        federation_kwargs: further :class:`Federation` arguments.
        **attack_overrides: :class:`AttackConfig` fields, e.g. ``iterations=300``.

    Returns:
        ``(search_result, reports)``; ``reports[0]`` is the undefended run, ``reports[1]`` the hybrid.
    """
    found = ats_search(
        make_model,
        Split(*train),
        candidates=candidates,
        images=images,
        acc_threshold=acc_threshold,
        top_n=top_n,
        semi_fraction=semi_fraction,
        semi_epochs=semi_epochs,
        seed=seed,
        progress=progress,
    )
    defenses = [Defense(), Defense(f"hybrid {found.hybrid}", policy=str(found.hybrid))]
    defenses += [Defense(str(p), policy=str(p)) for p in found.selected] + list(baselines)
    reports = evaluate_defenses(
        make_model,
        train,
        test,
        defenses,
        rounds=rounds,
        attack_images=attack_images,
        seed=seed,
        progress=progress,
        federation_kwargs=federation_kwargs,
        **attack_overrides,
    )
    return found, reports


# ----------------------------------------------------------------------------------------
# One inversion of shared gradients, without and with a policy (ATS Fig. 4)
# ----------------------------------------------------------------------------------------
INVERSION_NOTE = (
    "'vs shared' compares each reconstruction with the image whose gradient was shared (transformed by the "
    "policy, when there is one): it measures the defense, since a policy protects only if what the attacker "
    "rebuilds is unreadable. 'vs clean' compares with the untransformed image and also drops when the policy "
    "merely changes pixel values (an inverted or shifted digit scores low there yet stays readable), so it "
    "overstates the defense."
)
"""Which of :class:`Inversion`'s comparisons measures the defense, and why."""


@dataclass
class Inversion:
    """Reconstructions of images from their per-example gradients, and how close they come.

    Rows ``[0, N)`` attack the clean images; with a policy, rows ``[N, 2N)`` attack the same images
    transformed by it.

    Attributes:
        preset: the reconstruction preset.
        iterations: optimizer steps of the attack.
        policy: the ATS policy of the defended rows, or None.
        clean: the clean images ``[N, C, H, W]``.
        shared: the images whose gradients were shared ``[T, C, H, W]`` (T = N, or 2N with a policy).
        reconstructed: the attack's images ``[T, C, H, W]``.
        labels_recovered: rows whose label the attack recovered.
        psnr_vs_shared, ssim_vs_shared: ``[T]`` against ``shared`` (measures the defense).
        psnr_vs_clean, ssim_vs_clean: ``[T]`` against the clean images.
    """

    preset: str
    iterations: int
    policy: Optional[str]
    clean: Tensor
    shared: Tensor
    reconstructed: Tensor
    labels_recovered: int
    psnr_vs_shared: Tensor
    ssim_vs_shared: Tensor
    psnr_vs_clean: Tensor
    ssim_vs_clean: Tensor

    @property
    def cases(self) -> dict[str, slice]:
        """Row ranges by defense: ``"no defense"`` and, with a policy, ``"policy <policy>"``."""
        n = len(self.clean)
        return {"no defense": slice(0, n), **({f"policy {self.policy}": slice(n, 2 * n)} if self.policy else {})}

    def format_table(self, *, markdown: bool = False) -> str:
        """Per image and defense: PSNR and SSIM against the shared and against the clean image, with means."""
        from privfast.reports import table

        columns = (self.psnr_vs_shared, self.ssim_vs_shared, self.psnr_vs_clean, self.ssim_vs_clean)
        rows = []
        for case, index in self.cases.items():
            values = [column[index] for column in columns]
            rows += [
                [str(i), case, *(f"{v[i]:.2f}" if k % 2 == 0 else f"{v[i]:.3f}" for k, v in enumerate(values))]
                for i in range(len(values[0]))
            ]
            rows.append(
                ["mean", case, *(f"{v.mean():.2f}" if k % 2 == 0 else f"{v.mean():.3f}" for k, v in enumerate(values))]
            )
        return table(
            ["image", "defense", "PSNR vs shared (dB)", "SSIM vs shared", "PSNR vs clean (dB)", "SSIM vs clean"],
            rows,
            markdown=markdown,
            align="llrrrr",
        )

    def grid(self) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
        """Rows and captions for :func:`privfast.reports.plot_reconstructions` (ATS Fig. 4), each
        reconstruction captioned with its PSNR and SSIM against the shared image."""
        cases = self.cases
        rows = {"clean": self.clean, "reconstructed": self.reconstructed[cases["no defense"]]}
        if self.policy:
            defended = cases[f"policy {self.policy}"]
            rows |= {"transformed": self.shared[defended], "reconstructed (policy)": self.reconstructed[defended]}
        titles = {
            label: [
                f"{p:.1f} dB, {s:.2f}"
                for p, s in zip(self.psnr_vs_shared[index].tolist(), self.ssim_vs_shared[index].tolist())
            ]
            for label, index in (
                ("reconstructed", cases["no defense"]),
                *((("reconstructed (policy)", cases[f"policy {self.policy}"]),) if self.policy else ()),
            )
        }
        return rows, titles

    def to_dict(self) -> dict:
        """JSON-ready numbers, per defense."""
        return {
            "preset": self.preset,
            "iterations": self.iterations,
            "policy": self.policy,
            "labels_recovered": self.labels_recovered,
            "measures_the_defense": "vs_shared",
            **{
                case: {
                    "psnr_vs_shared": self.psnr_vs_shared[index].tolist(),
                    "ssim_vs_shared": self.ssim_vs_shared[index].tolist(),
                    "psnr_vs_clean": self.psnr_vs_clean[index].tolist(),
                    "ssim_vs_clean": self.ssim_vs_clean[index].tolist(),
                }
                for case, index in self.cases.items()
            },
        }


def invert_gradients(
    model: nn.Module,
    images: Split,
    *,
    policy: Optional[str] = None,
    preset: str = "dlg",
    iterations: int = 100,
    seed: int = 0,
    progress: bool = False,
    **overrides,
) -> Inversion:
    """Reconstruct images from the model's per-example gradients, without and with an ATS policy.

    With a policy, the attack runs on the clean and on the transformed images at once (as ATS's
    Fig. 4 compares them), labels recovered by the attack.

    Args:
        model: the attacked model (eval mode for BatchNorm models).
        images: images ``[N, C, H, W]`` in [0, 1] and their labels ``[N]``.
        policy: an ATS policy such as ``"3-1-7+43-18-18"``, or None.
        preset: a reconstruction preset (:data:`privfast.attacks.PRESETS`).
        iterations: optimizer steps of the attack.
        seed: seeds the policy's draws and the attack's starts.
        progress: show the attack's progress bar.
        **overrides: :class:`~privfast.attacks.AttackConfig` fields, e.g. ``tv=1e-4``.

    Returns:
        An :class:`Inversion`.
    """
    x, y = Split(*images)
    generator = torch.Generator().manual_seed(seed)
    shared = torch.cat([x, Policy(policy)(x, generator=generator)]) if policy else x
    repeats = len(shared) // len(x)
    labels = y.repeat(repeats)
    result = reconstruct(
        model,
        per_example_gradients(model, shared, labels),
        shape=tuple(x.shape[1:]),
        config=preset,
        iterations=iterations,
        generator=generator,
        progress=progress,
        **overrides,
    )
    clean = x.repeat(repeats, 1, 1, 1)
    return Inversion(
        preset,
        iterations,
        policy,
        x,
        shared,
        result.images,
        int((result.labels == labels).sum()),
        psnr(result.images, shared),
        ssim(result.images, shared),
        psnr(result.images, clean),
        ssim(result.images, clean),
    )
