"""Canary exposure (the Secret Sharer, Carlini et al., USENIX Security 2019) and canary builders.

A canary is a random secret inserted into the training data ``r`` times. Its *exposure* compares
the model's loss (log-perplexity) on it with the losses of the other candidates the secret could
have been: ``exposure = log2 |candidates| - log2 rank(canary)``, from 0 (the canary looks like any
candidate... or worse) up to ``log2 |candidates|`` (it has the lowest loss of all). When the
candidate space is too large to enumerate, :func:`exposure_extrapolated` fits a skew-normal to a
sample of candidates (to their log-odds, which rank them as their losses do).

Builders: :func:`image_canaries` (random-pattern images with random labels, for classifiers) and
:func:`token_canary` (the Secret Sharer's format with random slots, e.g. "my number is _ _ _ _").

Language models: :func:`enumerate_log_perplexities` scores every candidate of a token canary at
once (as a tree over the slots: 10^6 candidates from about 1.1e5 model steps), so that
:func:`exposure` ranks the secret among all of them; :func:`score_candidates` scores a sample for
:func:`exposure_extrapolated` where the space is too large; :func:`extract` is the Secret Sharer's
extraction attack (shortest-path search for the most likely slot fillings, exact order).
"""

from __future__ import annotations

import collections
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from torch import Tensor

from privfast.attacks.common import eval_mode
from privfast.data import Split

__all__ = [
    "ENUMERATION_LIMIT",
    "Extraction",
    "TokenCanary",
    "candidate_index",
    "enumerate_log_perplexities",
    "exposure",
    "exposure_extrapolated",
    "extract",
    "image_canaries",
    "insert_canaries",
    "log_perplexity",
    "score_candidates",
    "token_canary",
]


def _losses(values, name: str) -> Tensor:
    values = torch.as_tensor(values).detach().cpu().double()
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of losses, got shape {tuple(values.shape)}")
    if torch.isnan(values).any():
        raise ValueError(f"{name} holds NaN losses")
    return values


def exposure(canary_losses: Tensor, reference_losses: Tensor) -> Tensor:
    """Rank-based exposure of each canary among the candidates.

    The candidates are the canary and the R references, so ``|candidates| = R + 1``; the canary's
    rank is 1 + the number of references with a strictly lower loss (ties favour the canary, so a
    tie reports more exposure, never less). TF Privacy's ``compute_exposure_interpolation`` counts
    ``|R|`` candidates and ranks ties by an unstable sort: ``log2((R + 1) / R)`` bits lower without
    ties, and with ``t`` references tied up to ``log2((rank + t) / rank)`` bits lower still.

    Args:
        canary_losses: ``[M]`` losses (log-perplexities) of the inserted canaries.
        reference_losses: ``[R]`` losses of the other candidates, none of them inserted.

    Returns:
        ``[M]`` exposures in bits (float64), in ``[0, log2(R + 1)]``.
    """
    canaries = _losses(canary_losses, "canary_losses")
    references = _losses(reference_losses, "reference_losses").sort().values
    rank = 1 + torch.searchsorted(references, canaries, right=False)
    return math.log2(len(references) + 1) - rank.double().log2()


_COLLAPSED_SHAPE = 100.0
"""A fitted skew-normal shape beyond this is a half-normal in all but name: the MLE of the shape
diverged, and the fit's lower edge sits at the smallest reference."""
_TAIL_CHECK_MIN_BELOW = 16
"""Fewest references below a point at which the fit is checked against their empirical CDF (the
binomial error of log2 k/R is then about 0.36 bits)."""
_TAIL_CHECK_TOLERANCE_BITS = 1.0
"""Largest gap between the fit and the references' own ranks that passes (about three binomial errors)."""


def _log_odds(losses: Tensor) -> Tensor:
    """``log((1 - p) / p)`` of the candidates' probabilities ``p = exp(-loss)``, increasing in the loss.

    A classifier's per-example loss piles up against its floor 0 (every candidate whose random
    label is the predicted class), a shape no skew-normal has, while its log-odds are unbounded
    (LiRA's logit scaling, seen to be near-Gaussian). For a sequence's log-perplexity ``p`` is tiny
    and the log-odds equal the loss up to ``exp(-loss)``, as in the Secret Sharer's fits.
    """
    return losses + torch.log(-torch.expm1(-losses))  # -expm1(-loss) is 1 - p without cancellation


def _fit_skewnorm(values: Tensor) -> tuple[float, float, float]:
    """Maximum-likelihood skew-normal ``(shape, loc, scale)`` of ``values [R]``; raises if the fit fails
    and warns if it does not describe the lower tail, the part exposure extrapolates."""
    sample = values.numpy()
    try:
        shape, loc, scale = scipy.stats.skewnorm.fit(sample)
    except scipy.stats.FitError as error:
        raise ValueError(f"the skew-normal fit of the reference losses failed: {error}") from error
    if not all(map(math.isfinite, (shape, loc, scale))) or scale <= 0:
        raise ValueError(f"the skew-normal fit of the reference losses failed: shape={shape}, loc={loc}, scale={scale}")
    if abs(shape) > _COLLAPSED_SHAPE:
        warnings.warn(
            f"the skew-normal fit of the reference losses collapsed to a half-normal (shape {shape:.3g}) "
            "whose edge is the most extreme reference: canaries near or beyond it get arbitrarily "
            "large (up to inf) exposures",
            RuntimeWarning,
            stacklevel=3,
        )
    # Where at least _TAIL_CHECK_MIN_BELOW references lie below a point, their share is a sound
    # Pr[loss <= point]; an extrapolation that misses it there cannot be trusted further out.
    ordered = np.sort(sample)
    below = np.arange(_TAIL_CHECK_MIN_BELOW, len(ordered) // 2 + 1)
    if len(below):
        empirical = np.log2(len(ordered) / below)
        fitted = -scipy.stats.skewnorm.logcdf(ordered[below - 1], shape, loc, scale) / math.log(2)
        worst = np.argmax(np.abs(fitted - empirical))
        if abs(fitted[worst] - empirical[worst]) > _TAIL_CHECK_TOLERANCE_BITS:
            warnings.warn(
                f"the skew-normal fit does not follow the reference losses' lower tail: at the "
                f"{below[worst]}-th smallest of {len(ordered)} references it gives {fitted[worst]:.2f} "
                f"bits where their rank gives {empirical[worst]:.2f}; extrapolated exposures are "
                "unreliable (compare the rank-based exposure)",
                RuntimeWarning,
                stacklevel=3,
            )
    return shape, loc, scale


def exposure_extrapolated(canary_losses: Tensor, reference_losses: Tensor) -> Tensor:
    """Exposure from a skew-normal fit of the candidates: ``-log2 Pr_r[loss(r) <= loss(canary)]``.

    For candidate spaces too large to rank; ``reference_losses`` is then a random sample of
    candidates (a few thousand are enough for the fit). The skew-normal is fitted to the
    candidates' log-odds ``log(exp(loss) - 1)``, not to their losses: being increasing, the map
    leaves the probability unchanged, and it removes the floor at loss 0 against which a
    classifier's candidates pile up. Fitted to such losses, the skew-normal either spread a
    Gaussian tail over impossible negative losses (the same ~4 bits for every canary) or collapsed
    to a half-normal cut off at the smallest reference (inf beyond it).
    A failed fit raises; a collapsed fit, or one that misses the references' own lower-tail ranks
    by more than a bit, warns (``RuntimeWarning``): the extrapolation is then not to be trusted.

    Args:
        canary_losses: ``[M]`` losses (``-log p`` >= 0) of the inserted canaries.
        reference_losses: ``[R]`` losses of sampled candidates, R >= 3, all finite and > 0.

    Returns:
        ``[M]`` exposures in bits (float64), >= 0; can exceed ``log2(R)``, and is ``inf`` where the
        fitted CDF underflows (a canary far below every candidate, or of loss 0).

    Raises:
        ValueError: bad losses, or the fit failed.
    """
    canaries = _losses(canary_losses, "canary_losses")
    references = _losses(reference_losses, "reference_losses")
    if len(references) < 3 or not torch.isfinite(references).all():
        raise ValueError("a skew-normal fit needs at least 3 finite reference losses")
    if (canaries < 0).any() or (references <= 0).any():
        raise ValueError(
            "losses are -log p: canary losses must be >= 0 and reference losses > 0 (a reference "
            "of loss 0, probability 1 to float precision, has log-odds -inf)"
        )
    shape, loc, scale = _fit_skewnorm(_log_odds(references))
    log_cdf = scipy.stats.skewnorm.logcdf(_log_odds(canaries).numpy(), shape, loc, scale)
    return torch.from_numpy(-log_cdf / math.log(2))


def image_canaries(
    n: int,
    *,
    shape: Sequence[int],
    num_classes: int,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
) -> Split:
    """``n`` random-pattern images (pixels uniform in [0, 1]) with uniformly random labels.

    Draw the canaries to insert and, from the same generator, the reference candidates to rank
    them against: both come from this distribution, so a model that did not memorize the
    canaries cannot tell them apart (exposure about 1 bit on average).

    Args:
        n: number of images.
        shape: image shape, e.g. ``(1, 8, 8)``.
        num_classes: labels are drawn from ``[0, num_classes)``.
        generator: source of the patterns and labels.
        dtype: image dtype.

    Returns:
        :class:`privfast.data.Split` with ``x [n, *shape]`` and ``y [n]``.
    """
    if n < 0 or num_classes < 1:
        raise ValueError(f"n must be >= 0 and num_classes >= 1, got n={n}, num_classes={num_classes}")
    x = torch.rand((n, *shape), generator=generator, dtype=dtype)
    return Split(x, torch.randint(0, num_classes, (n,), generator=generator))


def insert_canaries(data: Split, canaries: Split, *, repeats: int) -> Split:
    """``data`` with each canary appended ``repeats`` times (the Secret Sharer's insertion count r).

    Training shuffles, so appending is as good as inserting at random places.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if canaries.x.shape[1:] != data.x.shape[1:]:
        raise ValueError(f"canaries are {tuple(canaries.x.shape[1:])} but the data is {tuple(data.x.shape[1:])}")
    return Split(
        torch.cat([data.x, canaries.x.repeat(repeats, *[1] * (canaries.x.dim() - 1)).to(data.x.dtype)]),
        torch.cat([data.y, canaries.y.repeat(repeats)]),
    )


@dataclass
class TokenCanary:
    """A Secret Sharer canary: fixed format tokens followed by random secret slots.

    Attributes:
        prefix: int64 ``[P]``, the format's fixed tokens ("my number is").
        secret: int64 ``[s]``, the inserted slot values.
        alphabet: int64 ``[A]``, the tokens a slot can take (the randomness space is ``A^s``).
    """

    prefix: Tensor
    secret: Tensor
    alphabet: Tensor

    @property
    def sequence(self) -> Tensor:
        """The inserted sequence ``[P + s]``."""
        return torch.cat([self.prefix, self.secret])

    @property
    def space_size(self) -> int:
        """Number of candidates, ``A^s``."""
        return len(self.alphabet) ** len(self.secret)

    def references(self, *, limit: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """The other candidate sequences ``[R, P + s]``, the secret excluded.

        Args:
            limit: None enumerates all ``A^s - 1`` others (in lexicographic order of slot
                indices); an int draws that many uniformly at random, with replacement, for
                :func:`exposure_extrapolated`.
            generator: source of the random draws.
        """
        alphabet_size, slots = len(self.alphabet), len(self.secret)
        if limit is None:
            if self.space_size > 2**24:
                raise ValueError(f"the space has {self.space_size} candidates, too many to enumerate; pass limit=")
            place = alphabet_size ** torch.arange(slots - 1, -1, -1)
            digits = torch.arange(self.space_size)[:, None] // place % alphabet_size  # [A^s, s] slot indices
        else:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            digits = torch.randint(0, alphabet_size, (limit, slots), generator=generator)
        secrets = self.alphabet[digits]
        secrets = secrets[(secrets != self.secret).any(1)]
        return torch.cat([self.prefix.expand(len(secrets), -1), secrets], 1)


def token_canary(
    prefix: Union[Sequence[int], Tensor],
    *,
    slots: int,
    alphabet: Union[Sequence[int], Tensor],
    generator: Optional[torch.Generator] = None,
) -> TokenCanary:
    """A Secret Sharer canary: ``prefix`` followed by ``slots`` tokens drawn uniformly from ``alphabet``.

    Example: ``token_canary(encode("my number is"), slots=6, alphabet=encode("0123456789"))``.
    """
    prefix = torch.as_tensor(prefix, dtype=torch.int64).flatten()
    alphabet = torch.as_tensor(alphabet, dtype=torch.int64).flatten()
    if slots < 1 or len(alphabet) < 2 or len(alphabet.unique()) != len(alphabet):
        raise ValueError(
            f"need slots >= 1 and an alphabet of >= 2 distinct tokens, got slots={slots}, "
            f"alphabet of {len(alphabet)} ({len(alphabet.unique())} distinct)"
        )
    secret = alphabet[torch.randint(0, len(alphabet), (slots,), generator=generator)]
    return TokenCanary(prefix, secret, alphabet)


def log_perplexity(logits: Tensor, tokens: Tensor, *, start: int = 0) -> Tensor:
    """The Secret Sharer's log-perplexity ``-sum_{i >= start} log Pr(tokens[i] | tokens[:i])`` per sequence (nats).

    Args:
        logits: ``[N, L, V]``, where ``logits[:, i]`` is the model's prediction of ``tokens[:, i]``
            (a language model's outputs shifted by one position).
        tokens: int64 ``[N, L]``.
        start: first position scored (the canary's first slot, to score the secret only).

    Returns:
        ``[N]``, to be used as the losses of :func:`exposure`.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [N, L, V] and tokens [N, L]; got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    if not 0 <= start < tokens.shape[1]:
        raise ValueError(f"start must be in [0, {tokens.shape[1]}), got {start}")
    nll = F.cross_entropy(logits[:, start:].transpose(1, 2), tokens[:, start:], reduction="none")
    return nll.sum(1)


# -- language models: every candidate's log-perplexity, and extraction --------------------------
# A model is scored either incrementally, through its ``step(ids [N, t], state) -> (logits
# [N, t, V], state)`` method (state: tensors holding the rows in dimension 1, as torch's RNN states
# do; see privfast.models.LSTMLanguageModel), or, lacking one, on whole sequences: its state is
# then the token rows themselves. The canary's prefix is the context: its first token is never
# predicted, and only the slots are scored (the Secret Sharer's log-perplexity of the secret).

ENUMERATION_LIMIT = 2**24
"""Largest candidate space that :func:`enumerate_log_perplexities` ranks whole by default."""


class _Stepper:
    """Runs a language model on from a batch of states (see the comment above)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.incremental = callable(getattr(model, "step", None))
        self.device = next(model.parameters()).device

    def run(self, ids: Tensor, state) -> tuple[Tensor, object]:
        """``(log-probabilities [N, t, V] float32 of the token after each of ids [N, t], state after them)``."""
        ids = ids.to(self.device)
        if self.incremental:
            logits, state = self.model.step(ids, state)
        else:
            state = ids if state is None else torch.cat([state, ids], 1)
            logits = self.model(state)[:, -ids.shape[1] :]
        return logits.float().log_softmax(-1), state

    def select(self, state, index: Tensor):
        """The states of rows ``index [M]`` (rows may repeat)."""
        index = index.to(self.device)
        dim = 1 if self.incremental else 0
        return torch.utils._pytree.tree_map(lambda s: s.index_select(dim, index), state)

    def cat(self, states: list):
        dim = 1 if self.incremental else 0
        return torch.utils._pytree.tree_map(lambda *s: torch.cat(s, dim), *states)


def _check_canary(canary: TokenCanary, vocab_size: Optional[int] = None) -> None:
    if len(canary.prefix) < 1:
        raise ValueError(
            "the canary needs a prefix of at least one token: the context its first slot is predicted from"
        )
    if vocab_size is not None:
        tokens = torch.cat([canary.prefix, canary.alphabet])
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise ValueError(
                f"the canary's tokens must be ids in [0, {vocab_size}), got ids from {int(tokens.min())} "
                f"to {int(tokens.max())}"
            )


def _vocab_size(model: torch.nn.Module) -> Optional[int]:
    return getattr(model, "vocab_size", None)


def enumerate_log_perplexities(
    model: torch.nn.Module,
    canary: TokenCanary,
    *,
    chunk_size: int = 8192,
    limit: int = ENUMERATION_LIMIT,
    progress: bool = False,
) -> Tensor:
    """The log-perplexity of the slots of every candidate ``prefix + s`` for all ``s`` in ``alphabet^slots``.

    Candidates share their prefixes, so they are scored as a tree: one model step per node of
    depth ``0 .. slots - 1`` (about ``A^(slots-1) * A / (A - 1)`` steps, not ``A^slots`` sequences),
    each node's next-token distribution giving its ``A`` children's costs. A 10^6-candidate space
    (6 digit slots) takes about 1.1e5 steps, in chunks of ``chunk_size`` rows.

    Args:
        model: a language model, ids ``[N, T]`` -> logits ``[N, T, V]`` (with a ``step`` method
            it is run incrementally; see the comment above this function).
        canary: gives the prefix (context), the alphabet and the number of slots; its secret is
            one of the candidates like any other.
        chunk_size: rows per model call.
        limit: refuse spaces larger than this.
        progress: a progress bar over the chunks.

    Returns:
        float64 ``[A^slots]`` log-perplexities (nats), candidate ``i`` having slot indices the
        base-``A`` digits of ``i``, most significant first (the order of
        :meth:`TokenCanary.references` with ``limit=None``, the secret included).

    Raises:
        ValueError: a space larger than ``limit``, or a canary that does not fit the model.
    """
    from tqdm.auto import tqdm

    _check_canary(canary, _vocab_size(model))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if canary.space_size > limit:
        raise ValueError(
            f"the canary has {canary.space_size} candidates, more than limit={limit}: use "
            "exposure_extrapolated on a sample (score_candidates)"
        )
    stepper, alphabet = _Stepper(model), canary.alphabet.to(torch.int64)
    size, slots = len(alphabet), len(canary.secret)
    nodes = sum(size**d for d in range(1, slots))
    with eval_mode(model), tqdm(total=nodes, desc="candidates", unit="node", disable=not progress, leave=False) as bar:
        log_probs, state = stepper.run(canary.prefix[None], None)
        next_nll = -log_probs[:, -1, alphabet.to(log_probs.device)].double().cpu()  # [A^d, A] at depth d
        costs = torch.zeros(1, dtype=torch.float64)
        for depth in range(slots - 1):
            costs = (costs[:, None] + next_nll).reshape(-1)  # the A^(depth+1) nodes of the next depth
            parents = torch.arange(size**depth).repeat_interleave(size)
            tokens = alphabet.repeat(size**depth)
            keep = depth + 1 < slots - 1  # the last depth's states are never stepped from
            nll, states = [], []
            for start in range(0, len(costs), chunk_size):
                rows = slice(start, start + chunk_size)
                log_probs, child = stepper.run(tokens[rows, None], stepper.select(state, parents[rows]))
                nll.append(-log_probs[:, -1, alphabet.to(log_probs.device)].double().cpu())
                if keep:
                    states.append(child)
                bar.update(len(nll[-1]))
            next_nll = torch.cat(nll)
            state = stepper.cat(states) if keep else None
        return (costs[:, None] + next_nll).reshape(-1)


def candidate_index(canary: TokenCanary, slots: Optional[Tensor] = None) -> Tensor:
    """Position of candidates (slot tokens ``[R, s]``; default: the secret) in the enumeration order.

    Returns:
        int64 ``[R]`` (a 0-d tensor for the secret).

    Raises:
        ValueError: a slot token outside the alphabet.
    """
    values = canary.secret if slots is None else torch.as_tensor(slots, dtype=torch.int64)
    order = canary.alphabet.argsort()
    found = torch.searchsorted(canary.alphabet[order], values.contiguous()).clamp(max=len(order) - 1)
    if (canary.alphabet[order][found] != values).any():
        raise ValueError("a candidate holds a token outside the canary's alphabet")
    digits = order[found]
    place = len(canary.alphabet) ** torch.arange(values.shape[-1] - 1, -1, -1)
    return (digits * place).sum(-1)


def score_candidates(
    model: torch.nn.Module, canary: TokenCanary, slots: Tensor, *, batch_size: int = 4096, progress: bool = False
) -> Tensor:
    """Log-perplexities of the slots of given candidates ``prefix + slots[i]`` (for spaces too large to enumerate).

    Args:
        model: a language model (see :func:`enumerate_log_perplexities`).
        canary: gives the prefix.
        slots: int64 ``[R, s]`` slot tokens (e.g. the secret, and a random sample of the space).
        batch_size: candidates per model call.
        progress: a progress bar over the batches.

    Returns:
        float64 ``[R]`` log-perplexities (nats), as :func:`log_perplexity` of the whole sequences from the first slot.
    """
    from tqdm.auto import tqdm

    _check_canary(canary, _vocab_size(model))
    slots = torch.as_tensor(slots, dtype=torch.int64)
    if slots.dim() != 2 or slots.shape[1] != len(canary.secret):
        raise ValueError(f"slots must be [R, {len(canary.secret)}], got {tuple(slots.shape)}")
    stepper, out = _Stepper(model), []
    with eval_mode(model):
        log_probs, state = stepper.run(canary.prefix[None], None)
        first = -log_probs[0, -1].double().cpu()  # [V], the first slot's cost
        for start in tqdm(range(0, len(slots), batch_size), desc="candidates", disable=not progress, leave=False):
            rows = slots[start : start + batch_size]
            cost = first[rows[:, 0]]
            if rows.shape[1] > 1:
                start = stepper.select(state, torch.zeros(len(rows), dtype=torch.int64))
                log_probs, _ = stepper.run(rows[:, :-1], start)
                cost = cost - log_probs.double().cpu().gather(2, rows[:, 1:, None]).squeeze(2).sum(1)
            out.append(cost)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class Extraction:
    """Result of :func:`extract`.

    Attributes:
        candidates: int64 ``[K, s]`` slot tokens, most likely first (exactly the K candidates of
            smallest log-perplexity, in order).
        log_perplexities: float64 ``[K]``, non-decreasing.
        secret_rank: 1-based rank of the inserted secret among them, None if it is not among them
            (only the evaluation looks at the secret, never the search).
        expansions: tree nodes the search ran the model on.
        exhausted: the search stopped at ``max_expansions`` before listing ``max_candidates``.
    """

    candidates: Tensor
    log_perplexities: Tensor
    secret_rank: Optional[int]
    expansions: int
    exhausted: bool

    @property
    def extracted(self) -> bool:
        """Whether the search's first answer is the secret."""
        return self.secret_rank == 1


def extract(
    model: torch.nn.Module,
    canary: TokenCanary,
    *,
    max_candidates: int = 1000,
    max_expansions: int = 20000,
    batch_size: int = 512,
    progress: bool = False,
) -> Extraction:
    """The Secret Sharer's extraction attack: the most likely slot fillings, in order, by shortest-path search.

    The candidates form a tree of depth ``slots`` whose edges cost ``-log Pr(slot | prefix, earlier
    slots)`` >= 0; a candidate's log-perplexity is its path cost. Dijkstra's search (best-first
    from the prefix) therefore completes candidates in increasing log-perplexity, expanding only
    the nodes cheaper than its answers: a memorized secret comes out first after a handful of
    expansions, where ranking it by enumeration scores all ``A^slots`` candidates. Against a
    model that memorized nothing every inner node is about as cheap as the answers, and the search
    degenerates into enumerating the tree: ``max_expansions`` bounds it. Up to ``batch_size`` of the
    cheapest open nodes are run per model call, one step each from their parent's kept state; a
    complete candidate is only listed once it is the cheapest node left, so the order stays exact.

    Args:
        model: a language model (see :func:`enumerate_log_perplexities`).
        canary: the attacker's knowledge: the prefix, the alphabet and the number of slots (the
            secret is used only to report its rank).
        max_candidates: stop after listing this many complete candidates (K).
        max_expansions: stop after running the model on this many tree nodes.
        batch_size: open nodes run per model call.
        progress: a progress bar over the expansions.

    Returns:
        :class:`Extraction`.
    """
    import heapq
    import itertools

    from tqdm.auto import tqdm

    _check_canary(canary, _vocab_size(model))
    if min(max_candidates, max_expansions, batch_size) < 1:
        raise ValueError(
            f"max_candidates, max_expansions and batch_size must be >= 1, got {max_candidates}, "
            f"{max_expansions}, {batch_size}"
        )
    stepper, alphabet = _Stepper(model), canary.alphabet.to(torch.int64)
    slots = len(canary.secret)
    order = itertools.count()  # breaks cost ties by insertion, never comparing the tuples
    found: list[tuple[float, tuple]] = []
    expansions = 0
    with (
        eval_mode(model),
        tqdm(total=max_expansions, desc="extraction", unit="node", disable=not progress, leave=False) as bar,
    ):
        log_probs, state = stepper.run(canary.prefix[None], None)
        bank = [state]  # states of the nodes run so far, one entry per model call; a node points at (entry, row)
        root = (-log_probs[0, -1, alphabet.to(log_probs.device)].double().cpu()).tolist()
        heap = [(cost, next(order), (a,), (0, 0)) for a, cost in enumerate(root)]
        heapq.heapify(heap)
        while heap and len(found) < max_candidates and expansions < max_expansions:
            batch = []
            while heap and len(batch) < min(batch_size, max_expansions - expansions) and len(found) < max_candidates:
                if len(heap[0][2]) == slots:
                    if batch:  # open nodes cheaper than this candidate may have cheaper children
                        break
                    cost, _, path, _ = heapq.heappop(heap)
                    found.append((cost, path))
                    continue
                batch.append(heapq.heappop(heap))
            if not batch:
                continue
            # Each node's state: one step from its parent's state on its own last slot. One model
            # call per depth (whole-sequence models keep token rows of the depth's length as state).
            for depth in sorted({len(node[2]) for node in batch}):
                group = [node for node in batch if len(node[2]) == depth]
                parents = collections.defaultdict(list)
                for node in group:
                    parents[node[3][0]].append(node)
                group = [node for nodes in parents.values() for node in nodes]
                start = stepper.cat(
                    [
                        stepper.select(bank[entry], torch.tensor([node[3][1] for node in nodes]))
                        for entry, nodes in parents.items()
                    ]
                )
                tokens = alphabet[torch.tensor([node[2][-1] for node in group])]
                log_probs, state = stepper.run(tokens[:, None], start)
                bank.append(state)
                nll = (-log_probs[:, -1, alphabet.to(log_probs.device)].double().cpu()).tolist()
                for row, ((cost, _, path, _), edges) in enumerate(zip(group, nll)):
                    for a, edge in enumerate(edges):
                        heapq.heappush(heap, (cost + edge, next(order), path + (a,), (len(bank) - 1, row)))
            expansions += len(batch)
            bar.update(len(batch))
    candidates = alphabet[torch.tensor([path for _, path in found], dtype=torch.int64).reshape(-1, slots)]
    costs = torch.tensor([cost for cost, _ in found], dtype=torch.float64)
    hits = (candidates == canary.secret).all(1).nonzero()
    return Extraction(
        candidates,
        costs,
        int(hits[0]) + 1 if len(hits) else None,
        expansions,
        len(found) < max_candidates and expansions >= max_expansions,
    )
