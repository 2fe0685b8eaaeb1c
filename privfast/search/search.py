"""ATS's random policy search (Gao et al., CVPR 2021, Algorithm 1) and its hybrid policy."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from privfast.attacks.common import eval_mode
from privfast.augment.ats_library import LIBRARY, Policy, random_policy
from privfast.data import Split
from privfast.search.scores import Stats, accuracy_score, crop_and_flip, gradsim_curve_area, normalize

__all__ = ["PolicyScore", "SearchResult", "ats_search", "describe_policy", "search"]


def describe_policy(policy: Union[Policy, str]) -> str:
    """The transforms of a policy by name, e.g. ``"3-1+7"`` -> ``"translate_x 0.4532 > contrast 0.3333 |
    translate_y 0.1007"`` (``>``: applied in turn; ``|``: one sub-policy drawn per image)."""
    policy = Policy(policy) if isinstance(policy, str) else policy

    def entry(i: int) -> str:
        transform = LIBRARY[i]
        return f"{transform.op} {transform.magnitude:g}" if transform.magnitude else transform.op

    return " | ".join(" > ".join(map(entry, sub)) or "identity" for sub in policy.sub_policies)


class PolicyScore(NamedTuple):
    """One row of the search table. ``privacy`` is NaN for policies the accuracy filter dropped."""

    policy: Policy
    privacy: float
    accuracy: float


@dataclass
class SearchResult:
    """What :func:`search` found.

    Attributes:
        table: every candidate with its S_pri (NaN when filtered out) and S_acc, in sampling order.
        selected: the top policies by S_pri among those passing the accuracy filter, no two
            sharing a library entry (best first).
        hybrid: the hybrid of ``selected`` (one of them drawn per image).
        threshold: the S_acc filter the search used, when :func:`ats_search` chose it.
    """

    table: list[PolicyScore]
    selected: list[Policy]
    hybrid: Policy
    threshold: Optional[float] = None

    def format_table(self, limit: Optional[int] = 20, *, markdown: bool = False) -> str:
        """The kept candidates ranked by S_pri (then the filtered ones, S_pri "-"), each policy's
        library indices beside its transforms' names, then the hybrid."""
        from privfast.reports import table

        ranked = sorted(self.table, key=lambda r: (math.isnan(r.privacy), r.privacy))
        rows = [
            [
                str(r.policy),
                describe_policy(r.policy),
                "-" if math.isnan(r.privacy) else f"{r.privacy:.4f}",
                "-" if math.isnan(r.accuracy) else f"{r.accuracy:.3f}",
            ]
            for r in ranked[:limit]
        ]
        text = table(["policy", "transforms", "S_pri", "S_acc"], rows, markdown=markdown, align="llrr")
        hybrid = f"hybrid: {self.hybrid} ({describe_policy(self.hybrid)})"
        return "\n".join([text, "", f"**{hybrid}**" if markdown else hybrid])

    def to_dict(self) -> dict:
        """JSON-ready: the S_acc threshold, the selected policies, the hybrid and every candidate's scores."""
        return {
            "threshold": self.threshold,
            "selected": [str(p) for p in self.selected],
            "hybrid": str(self.hybrid),
            "transforms": {str(p): describe_policy(p) for p in [*self.selected, self.hybrid]},
            "table": [
                {
                    "policy": str(r.policy),
                    "transforms": describe_policy(r.policy),
                    "s_pri": r.privacy,
                    "s_acc": r.accuracy,
                }
                for r in self.table
            ],
        }

    def write(self, out: str | os.PathLike) -> list[Path]:
        """Write ``search.json`` and the ranked table ``search.md`` into ``out``; returns the paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "search.json").write_text(json.dumps(self.to_dict(), indent=1))
        threshold = "" if self.threshold is None else f"S_acc threshold {self.threshold:.3f}; "
        (out / "search.md").write_text(
            "\n".join(
                [
                    "## ATS policy search",
                    "",
                    f"{threshold}lower S_pri is more private; policies are indices of the "
                    "ATS transformation library (Gao et al., CVPR 2021), named beside them.",
                    "",
                    self.format_table(None, markdown=True),
                    "",
                ]
            )
        )
        return [out / "search.json", out / "search.md"]

    def __str__(self) -> str:
        return self.format_table()

    @classmethod
    def from_table(cls, table: list[PolicyScore], top_n: int) -> "SearchResult":
        """The result of a scored ``table``: its ``top_n`` disjoint best policies and their hybrid.

        Also merges shards of a search (see ``search(shard=...)``): concatenated tables, each
        candidate scored on one shard, select as the whole search would.
        """
        selected = _select_disjoint(table, top_n)
        return cls(table, selected, Policy([sub for p in selected for sub in p.sub_policies] or [[]]))


def _select_disjoint(rows: Sequence[PolicyScore], top_n: int) -> list[Policy]:
    """Best rows by S_pri whose policies share no library entry (ATS's condition for a hybrid)."""
    chosen: list[Policy] = []
    used: set[int] = set()
    for row in sorted((r for r in rows if not math.isnan(r.privacy)), key=lambda r: r.privacy):
        if len(chosen) == top_n:
            break
        if not row.policy.transforms & used:
            chosen.append(row.policy)
            used |= row.policy.transforms
    return chosen


def search(
    model_semi_trained: nn.Module,
    model_init: nn.Module,
    data: Split,
    *,
    candidates: int = 1500,
    max_len: int = 3,
    acc_threshold: float,
    top_n: int = 2,
    images: int = 100,
    bins: int = 20,
    batches: int = 10,
    policies_per_pass: int = 8,
    mean: Stats = None,
    std: Stats = None,
    chunk_size: int = 512,
    seed: int = 0,
    augment: bool = False,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> SearchResult:
    """Random search for privacy-preserving transformation policies (ATS Algorithm 1).

    Samples ``candidates`` distinct random policies of 1 to ``max_len`` library entries, scores each
    with S_acc on ``model_init`` and drops those below ``acc_threshold``, scores the rest with
    S_pri on ``model_semi_trained``, and keeps the ``top_n`` lowest-S_pri policies that share no
    entry. Every policy is scored on the same ``images`` images and the same random starts, so
    scores compare policies and not draws; ``policies_per_pass`` kept policies are scored in one
    batched gradient pass.

    Args:
        model_semi_trained: network trained for a few epochs (S_pri).
        model_init: the same architecture at random initialization (S_acc).
        data: ``(x, y)``: images ``[N, C, H, W]`` in [0, 1] and int64 labels ``[N]`` (e.g. a
            :class:`privfast.data.Split`).
        candidates: number of policies sampled (C_max; 1,500 in ATS).
        max_len: most entries per policy (3 in ATS).
        acc_threshold: S_acc below which a policy is discarded (T_acc; its scale depends on the
            number of classes and the model, see :func:`accuracy_score`).
        top_n: policies kept for the hybrid (2 in ATS).
        images: images S_pri is averaged over (100 in ATS).
        bins: S_pri path intervals.
        batches: S_acc batches.
        policies_per_pass: policies whose S_pri share one batched pass.
        mean, std: data normalization.
        chunk_size: per-example gradients per batched pass.
        seed: seed of every random draw (policies, images, starts, signs).
        augment: score the policies on :func:`~privfast.search.scores.crop_and_flip` of the images
            (the reference's augmented evaluation: RandomCrop(32, padding 4) and a random flip
            before the policy), one draw per image shared by every policy.
        shard: ``(rank, world_size)``: score only candidates ``i`` with ``i % world_size == rank``
            and leave the others' scores NaN, for processes that split the search
            (:func:`privfast.launch.launch_search`); each candidate's draws are its own, so
            its scores do not depend on the shard.
        progress: show a progress bar.

    Returns:
        A :class:`SearchResult`. ``selected`` holds fewer than ``top_n`` policies when not enough
        disjoint ones passed the filter; ``hybrid`` is then the identity if none did.
    """
    x, y = Split(*data)
    rank, world_size = shard
    if not 0 <= rank < world_size:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    if candidates < 1 or top_n < 1 or policies_per_pass < 1:
        raise ValueError(
            f"candidates, top_n and policies_per_pass must be >= 1, got {candidates}, {top_n}, {policies_per_pass}"
        )
    search_space = sum(50**k for k in range(1, max_len + 1))
    if candidates > search_space:
        raise ValueError(f"candidates={candidates} exceeds the {search_space} policies of at most {max_len} entries")
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(x.shape[0], generator=generator)[:images]
    x_pri, y_pri = x[subset], y[subset]
    start = normalize(torch.rand(x_pri.shape, generator=generator, dtype=x.dtype).to(x.device), mean, std)
    if augment:  # one crop and flip per image, shared by every policy; its own stream leaves the candidates as they are
        x_pri = crop_and_flip(x_pri, generator=torch.Generator().manual_seed(seed + 1))

    policies: list[Policy] = []
    seen: set[Policy] = set()
    while len(policies) < candidates:
        policy = random_policy(max_len, generator=generator)
        if policy not in seen:
            seen.add(policy)
            policies.append(policy)

    accuracy: list[float] = []
    privacy = [math.nan] * candidates
    pending: list[int] = []

    def draws(i: int, stage: int) -> torch.Generator:
        # Each candidate's random signs and batches come from its own stream, so its scores do
        # not depend on which other candidates passed the filter.
        return torch.Generator().manual_seed((seed * candidates + i) * 2 + stage)

    def score_pending() -> None:
        transformed = torch.cat([policies[i](x_pri, generator=draws(i, 1)) for i in pending])
        repeats = len(pending)
        with eval_mode(model_semi_trained, no_grad=False):
            area = gradsim_curve_area(
                model_semi_trained,
                normalize(transformed, mean, std),
                y_pri.repeat(repeats),
                start.repeat(repeats, 1, 1, 1),
                bins=bins,
                chunk_size=chunk_size,
            )
        for i, value in zip(pending, area.view(repeats, -1).mean(1).tolist()):
            privacy[i] = value
        pending.clear()

    for i, policy in enumerate(tqdm(policies, desc="ATS search", disable=not progress)):
        if i % world_size != rank:  # another shard's candidate
            accuracy.append(math.nan)
            continue
        accuracy.append(
            accuracy_score(model_init, x, y, policy=policy, batches=batches, mean=mean, std=std, generator=draws(i, 0))
        )
        if accuracy[-1] >= acc_threshold:
            pending.append(i)
        if len(pending) == policies_per_pass:
            score_pending()
    if pending:
        score_pending()

    table = [PolicyScore(p, s_pri, s_acc) for p, s_pri, s_acc in zip(policies, privacy, accuracy)]
    return SearchResult.from_table(table, top_n)


def ats_search(
    make_model: Callable[[], nn.Module],
    data: Split,
    *,
    candidates: int = 1500,
    images: int = 100,
    acc_threshold: Optional[float] = None,
    top_n: int = 2,
    semi_fraction: float = 0.1,
    semi_epochs: int = 50,
    seed: int = 0,
    nproc: int = 1,
    progress: bool = True,
) -> SearchResult:
    """ATS's search from scratch: train ``M^s``, choose the S_acc filter, search (ATS Algorithm 1).

    1. ``M^s``: a model trained on ``semi_fraction`` of ``data`` for ``semi_epochs`` epochs (ATS:
       10% for 50 epochs; Adam, lr 1e-3, batch 64); ``M^r``: the same architecture at random
       initialization.
    2. :func:`search` over ``candidates`` random policies, on ``nproc`` processes (or the ranks of
       a torchrun launch).

    Args:
        make_model: builds a freshly initialized model.
        data: the training images ``[N, C, H, W]`` in [0, 1] and labels ``[N]``.
        candidates, images, top_n: search settings (see :func:`search`).
        acc_threshold: S_acc filter; default the S_acc of no transformation on ``M^r``, i.e. keep
            the policies that score at least as well as the raw data (the absolute -85 of ATS's
            CIFAR-100 runs depends on the number of classes and the model).
        semi_fraction, semi_epochs: how ``M^s`` is trained.
        seed: seed of every draw.
        nproc: processes the candidates are sharded across.
        progress: show progress bars.

    Returns:
        The :class:`SearchResult`, with ``threshold`` set.
    """
    from privfast import launch
    from privfast.attacks.training import train_classifier

    x, y = Split(*data)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    semi = make_model()
    subset = torch.randperm(x.shape[0], generator=generator)[: max(1, int(semi_fraction * x.shape[0]))]
    train_classifier(semi, x[subset], y[subset], epochs=semi_epochs, generator=generator, progress=progress)
    init = make_model()
    if acc_threshold is None:
        acc_threshold = accuracy_score(init, x, y, generator=torch.Generator().manual_seed(seed))
    options = dict(candidates=candidates, acc_threshold=acc_threshold, top_n=top_n, images=images, seed=seed)
    if launch.is_distributed(nproc):  # --nproc N, or started by torchrun
        found = launch.launch_search(semi, init, Split(x, y), nproc=nproc, **options)
    else:
        found = search(semi, init, Split(x, y), progress=progress, **options)
    if found is not None:  # None on the ranks of a torchrun launch other than 0
        found.threshold = acc_threshold
    return found
