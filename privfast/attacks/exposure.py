"""Canary exposure (the Secret Sharer, Carlini et al., USENIX Security 2019) and canary builders.

A canary is a random secret inserted into the training data ``r`` times. Its *exposure* compares
the model's loss (log-perplexity) on it with the losses of the other candidates the secret could
have been: ``exposure = log2 |candidates| - log2 rank(canary)``, from 0 (the canary looks like any
candidate... or worse) up to ``log2 |candidates|`` (it has the lowest loss of all). When the
candidate space is too large to enumerate, :func:`exposure_extrapolated` fits a skew-normal to a
sample of candidates (to their log-odds, which rank them as their losses do).

Builders: :func:`image_canaries` (random-pattern images with random labels, for classifiers) and
:func:`token_canary` (the Secret Sharer's format with random slots, e.g. "my number is _ _ _ _").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from torch import Tensor

from privfast.data import Split

__all__ = [
    "TokenCanary",
    "exposure",
    "exposure_extrapolated",
    "image_canaries",
    "insert_canaries",
    "log_perplexity",
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
    rank is 1 + the number of references with a strictly lower loss (ties favour the canary).

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
        raise ValueError(f"the skew-normal fit of the reference losses failed: shape={shape}, loc={loc}, "
                         f"scale={scale}")
    if abs(shape) > _COLLAPSED_SHAPE:
        warnings.warn(f"the skew-normal fit of the reference losses collapsed to a half-normal (shape {shape:.3g}) "
                      "whose edge is the most extreme reference: canaries near or beyond it get arbitrarily "
                      "large (up to inf) exposures", RuntimeWarning, stacklevel=3)
    # Where at least _TAIL_CHECK_MIN_BELOW references lie below a point, their share is a sound
    # Pr[loss <= point]; an extrapolation that misses it there cannot be trusted further out.
    ordered = np.sort(sample)
    below = np.arange(_TAIL_CHECK_MIN_BELOW, len(ordered) // 2 + 1)
    if len(below):
        empirical = np.log2(len(ordered) / below)
        fitted = -scipy.stats.skewnorm.logcdf(ordered[below - 1], shape, loc, scale) / math.log(2)
        worst = np.argmax(np.abs(fitted - empirical))
        if abs(fitted[worst] - empirical[worst]) > _TAIL_CHECK_TOLERANCE_BITS:
            warnings.warn(f"the skew-normal fit does not follow the reference losses' lower tail: at the "
                          f"{below[worst]}-th smallest of {len(ordered)} references it gives {fitted[worst]:.2f} "
                          f"bits where their rank gives {empirical[worst]:.2f}; extrapolated exposures are "
                          "unreliable (compare the rank-based exposure)", RuntimeWarning, stacklevel=3)
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
        raise ValueError("losses are -log p: canary losses must be >= 0 and reference losses > 0 (a reference "
                         "of loss 0, probability 1 to float precision, has log-odds -inf)")
    shape, loc, scale = _fit_skewnorm(_log_odds(references))
    log_cdf = scipy.stats.skewnorm.logcdf(_log_odds(canaries).numpy(), shape, loc, scale)
    return torch.from_numpy(-log_cdf / math.log(2))


def image_canaries(n: int, *, shape: Sequence[int], num_classes: int,
                   generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32) -> Split:
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
    return Split(torch.cat([data.x, canaries.x.repeat(repeats, *[1] * (canaries.x.dim() - 1)).to(data.x.dtype)]),
                 torch.cat([data.y, canaries.y.repeat(repeats)]))


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


def token_canary(prefix: Union[Sequence[int], Tensor], *, slots: int, alphabet: Union[Sequence[int], Tensor],
                 generator: Optional[torch.Generator] = None) -> TokenCanary:
    """A Secret Sharer canary: ``prefix`` followed by ``slots`` tokens drawn uniformly from ``alphabet``.

    Example: ``token_canary(encode("my number is"), slots=6, alphabet=encode("0123456789"))``.
    """
    prefix = torch.as_tensor(prefix, dtype=torch.int64).flatten()
    alphabet = torch.as_tensor(alphabet, dtype=torch.int64).flatten()
    if slots < 1 or len(alphabet) < 2 or len(alphabet.unique()) != len(alphabet):
        raise ValueError(f"need slots >= 1 and an alphabet of >= 2 distinct tokens, got slots={slots}, "
                         f"alphabet of {len(alphabet)} ({len(alphabet.unique())} distinct)")
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
        raise ValueError(f"logits must be [N, L, V] and tokens [N, L]; got {tuple(logits.shape)} and "
                         f"{tuple(tokens.shape)}")
    if not 0 <= start < tokens.shape[1]:
        raise ValueError(f"start must be in [0, {tokens.shape[1]}), got {start}")
    nll = F.cross_entropy(logits[:, start:].transpose(1, 2), tokens[:, start:], reduction="none")
    return nll.sum(1)
