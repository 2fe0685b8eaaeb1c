"""Text corpora for language models: tokenization, vocabularies, fixed splits, training windows.

The default corpus needs no download: every CPython ships the text of its documentation topics
in :mod:`pydoc_data.topics` (about 465 KB, 65,000 words of English prose and Python code). The
standard Penn Treebank (Mikolov's ``ptb.{train,valid,test}.txt``) and WikiText-2
(``wiki.{train,valid,test}.tokens``) load from a directory for users who have them; nothing is
ever downloaded.

A corpus is three int64 token streams (train, valid, test) over one :class:`Vocabulary`. A
language model trains on :func:`windows` of the stream: each window of ``length + 1`` tokens is
one example (input its first ``length`` tokens, target the next token at each position), which
is also the unit that DP-SGD clips and Poisson-samples. :func:`plant` writes sequences (the
Secret Sharer's canaries) into randomly chosen windows, each occurrence in a window of its own.

    corpus = load_corpus("pydoc", level="word")
    corpus.vocab.encode(corpus.tokenize("the first number is 4 2"))   # int64 [6]
    rows = windows(corpus.train, length=32)                           # int64 [N, 33]
"""

from __future__ import annotations

import collections
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "CORPORA",
    "EOS",
    "LEVELS",
    "UNK",
    "TextCorpus",
    "Tokenizer",
    "Vocabulary",
    "load_corpus",
    "plant",
    "pydoc_text",
    "windows",
]

UNK = "<unk>"
EOS = "<eos>"
LEVELS = ("word", "char")
CORPORA = ("pydoc", "ptb", "wikitext-2")
# Files of the file-based corpora, per split; the first name found in the root or its listed
# sub-directories is used (PTB as unpacked from Mikolov's simple-examples, WikiText-2 as released).
_FILES = {
    "ptb": {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"},
    "wikitext-2": {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"},
}
_SUBDIRS = {"ptb": ("", "ptb", "simple-examples/data", "data"), "wikitext-2": ("", "wikitext-2", "wikitext-2-v1")}
# pydoc's prose and code as words: lower-case identifiers, one token per digit (so that a number is
# spelled digit by digit, as the Secret Sharer's canaries are), runs of one punctuation character
# ("------" under a heading) as one token.
_WORD = re.compile(r"[^\W\d]+|\d|([^\w\s])\1*")


@dataclass(frozen=True)
class Tokenizer:
    """Splits text into tokens, the same way for the corpus and for the canaries inserted into it.

    Attributes:
        level: ``"word"`` or ``"char"``.
        scheme: ``"pydoc"`` (word level: lower-cased, digits and punctuation runs split off) or
            ``"whitespace"`` (word level: the text is already tokenized, as PTB and WikiText are).
            At character level every character is a token and the scheme is ignored.

    Lines end in an end-of-sentence token: :data:`EOS` at word level, ``"\\n"`` at character
    level; blank lines (word level) give none.
    """

    level: str = "word"
    scheme: str = "pydoc"

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {self.level!r}")
        if self.scheme not in ("pydoc", "whitespace"):
            raise ValueError(f"scheme must be 'pydoc' or 'whitespace', got {self.scheme!r}")

    @property
    def eos(self) -> str:
        """The end-of-line token."""
        return EOS if self.level == "word" else "\n"

    def __call__(self, text: str) -> list[str]:
        """The tokens of ``text``; a trailing end-of-line token only where ``text`` ends a line."""
        if self.level == "char":
            return list(text)
        tokens: list[str] = []
        lines = text.split("\n")
        for i, line in enumerate(lines):
            if self.scheme == "whitespace":
                words = line.split()
            else:
                words = [m.group(0) for m in _WORD.finditer(line.lower())]
            tokens += words
            if words and i < len(lines) - 1:
                tokens.append(EOS)
        return tokens

    def join(self, tokens: Iterable[str]) -> str:
        """Text from tokens (word level: spaces between words, :data:`EOS` as a line break)."""
        if self.level == "char":
            return "".join(tokens)
        lines, words = [], []
        for token in tokens:
            if token == EOS:
                lines.append(" ".join(words) + "\n")
                words = []
            else:
                words.append(token)
        return "".join(lines) + " ".join(words)


@dataclass(frozen=True)
class Vocabulary:
    """Tokens and their ids; tokens not in it encode as :data:`UNK`.

    Attributes:
        tokens: ``tokens[i]`` is the token of id ``i``; :data:`UNK` is id 0.
    """

    tokens: tuple[str, ...]
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.tokens or self.tokens[0] != UNK:
            raise ValueError(f"a vocabulary starts with {UNK!r} (id 0)")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("a vocabulary's tokens must be distinct")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def build(
        cls, tokens: Iterable[str], *, min_count: int = 1, max_size: Optional[int] = None, keep: Sequence[str] = ()
    ) -> "Vocabulary":
        """The tokens seen at least ``min_count`` times, most frequent first (ties alphabetical).

        Args:
            tokens: the training split's tokens.
            min_count: rarer tokens become :data:`UNK`.
            max_size: keep at most this many tokens, :data:`UNK` included (None: no limit).
            keep: tokens always included (the end-of-line token), whatever their count.
        """
        if min_count < 1 or (max_size is not None and max_size < 2 + len(keep)):
            raise ValueError(
                f"need min_count >= 1 and max_size >= {2 + len(keep)} (or None); got {min_count}, {max_size}"
            )
        counts = collections.Counter(tokens)
        counts.pop(UNK, None)  # a corpus's own <unk> (PTB's) is the vocabulary's
        frequent = sorted(
            (t for t, n in counts.items() if n >= min_count and t not in keep), key=lambda t: (-counts[t], t)
        )
        chosen = [UNK, *keep, *frequent]
        return cls(tuple(chosen if max_size is None else chosen[:max_size]))

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    @property
    def unk_id(self) -> int:
        return 0

    def id(self, token: str) -> int:
        """The id of ``token`` (:data:`UNK`'s if it is not in the vocabulary)."""
        return self._index.get(token, 0)

    def encode(self, tokens: Sequence[str]) -> Tensor:
        """int64 ``[len(tokens)]`` ids."""
        return torch.tensor([self._index.get(t, 0) for t in tokens], dtype=torch.int64)

    def decode(self, ids: Union[Tensor, Sequence[int]]) -> list[str]:
        """The tokens of ids ``[L]``."""
        return [self.tokens[int(i)] for i in ids]


@dataclass
class TextCorpus:
    """Three token streams over one vocabulary.

    Attributes:
        name: ``"pydoc"``, ``"ptb"`` or ``"wikitext-2"``.
        tokenizer: how the text was split (use it for text inserted into the corpus).
        vocab: built from the training split only.
        train, valid, test: int64 ``[L]`` token streams.
    """

    name: str
    tokenizer: Tokenizer
    vocab: Vocabulary
    train: Tensor
    valid: Tensor
    test: Tensor

    @property
    def level(self) -> str:
        return self.tokenizer.level

    def encode(self, text: str) -> Tensor:
        """int64 ``[L]`` ids of ``text`` tokenized as the corpus was."""
        return self.vocab.encode(self.tokenizer(text))

    def decode(self, ids: Union[Tensor, Sequence[int]]) -> str:
        """Text of ids ``[L]``."""
        return self.tokenizer.join(self.vocab.decode(ids))

    def missing(self, text: str) -> list[str]:
        """The tokens of ``text`` that the vocabulary lacks (they would encode as :data:`UNK`)."""
        return [t for t in dict.fromkeys(self.tokenizer(text)) if t not in self.vocab]

    def summary(self) -> dict:
        return {
            "corpus": self.name,
            "level": self.level,
            "vocabulary": len(self.vocab),
            "train_tokens": len(self.train),
            "valid_tokens": len(self.valid),
            "test_tokens": len(self.test),
        }


def pydoc_text() -> str:
    """The documentation topics of this Python (:mod:`pydoc_data.topics`), in sorted topic order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip("\n") for k in sorted(topics))


def _pydoc_splits() -> dict[str, str]:
    """Paragraphs (blocks between blank lines) dealt out 8:1:1 to train, valid and test by their index.

    Dealing paragraphs in turn (not cutting the text in three) gives each split every topic,
    prose and code alike, so validation perplexity measures the same distribution as training.
    """
    paragraphs = [p for p in re.split(r"\n\s*\n", pydoc_text()) if p.strip()]
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for i, paragraph in enumerate(paragraphs):
        splits["valid" if i % 10 == 8 else "test" if i % 10 == 9 else "train"].append(paragraph)
    return {name: "\n".join(parts) + "\n" for name, parts in splits.items()}


def _file_splits(name: str, root: Union[str, os.PathLike, None]) -> dict[str, str]:
    expected = _FILES[name]
    if root is None:
        raise FileNotFoundError(
            f"the {name} corpus is read from files that privfast does not download: pass "
            f"--data-root DIR (data_root=) holding {', '.join(expected.values())}"
        )
    root = Path(root)
    for sub in _SUBDIRS[name]:
        paths = {split: root / sub / file for split, file in expected.items()}
        if all(p.is_file() for p in paths.values()):
            return {split: p.read_text(encoding="utf-8") for split, p in paths.items()}
    places = ", ".join(str(root / sub) if sub else str(root) for sub in _SUBDIRS[name])
    raise FileNotFoundError(
        f"the {name} corpus needs the files {', '.join(expected.values())} in one of: {places} (nothing is downloaded)"
    )


def load_corpus(
    name: str = "pydoc",
    *,
    level: str = "word",
    root: Union[str, os.PathLike, None] = None,
    min_count: int = 2,
    max_vocab: Optional[int] = None,
) -> TextCorpus:
    """A corpus as train/valid/test token streams with a vocabulary from its training split.

    Args:
        name: ``"pydoc"`` (embedded, the default), ``"ptb"`` or ``"wikitext-2"`` (files under ``root``).
        level: ``"word"`` or ``"char"``.
        root: directory of the file-based corpora.
        min_count: tokens seen fewer times in the training split become :data:`UNK` (PTB and
            WikiText-2 already map rare words to ``<unk>``; 1 keeps their vocabularies whole).
        max_vocab: at most this many tokens, :data:`UNK` included.

    Returns:
        :class:`TextCorpus`.

    Raises:
        ValueError: an unknown name or level.
        FileNotFoundError: a file-based corpus whose files are not under ``root`` (the message lists them).
    """
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {name!r}")
    tokenizer = Tokenizer(level, "pydoc" if name == "pydoc" else "whitespace")
    texts = _pydoc_splits() if name == "pydoc" else _file_splits(name, root)
    tokens = {split: tokenizer(text) for split, text in texts.items()}
    vocab = Vocabulary.build(tokens["train"], min_count=min_count, max_size=max_vocab, keep=(tokenizer.eos,))
    streams = {split: vocab.encode(t) for split, t in tokens.items()}
    return TextCorpus(name, tokenizer, vocab, streams["train"], streams["valid"], streams["test"])


def windows(stream: Tensor, *, length: int) -> Tensor:
    """Consecutive windows of ``length + 1`` tokens, one language-model example each.

    Window ``i`` is ``stream[i*length : (i+1)*length + 1]``: its first ``length`` tokens are the
    input and its last ``length`` the targets, so every token of the stream (but the first) is a
    target exactly once. The tail that does not fill a window is dropped.

    Args:
        stream: int64 ``[L]``.
        length: tokens per input, >= 1.

    Returns:
        int64 ``[N, length + 1]``, ``N = (L - 1) // length``, a copy (rows can be written).

    Raises:
        ValueError: a stream shorter than one window.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if stream.dim() != 1:
        raise ValueError(f"stream must be 1-D token ids, got shape {tuple(stream.shape)}")
    count = (len(stream) - 1) // length
    if count < 1:
        raise ValueError(f"a stream of {len(stream)} tokens holds no window of {length + 1} tokens")
    return stream.unfold(0, length + 1, length)[:count].clone()


def plant(
    rows: Tensor, sequences: Sequence[Tensor], counts: Sequence[int], *, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, list[Tensor]]:
    """Write ``sequences[j]`` into ``counts[j]`` windows, each occurrence in a window of its own.

    Every occurrence gets a distinct window (drawn uniformly without replacement) and a uniformly
    random offset in it, and overwrites that many tokens there (the stream keeps its length, so no
    window shifts). As a window is one example, a sequence planted ``r`` times is in exactly ``r``
    examples, the count the privacy guarantee's group size refers to.

    Args:
        rows: int64 ``[N, W]`` windows (:func:`windows`).
        sequences: int64 ``[L_j]`` each, ``L_j <= W``.
        counts: occurrences of each sequence, >= 1.
        generator: source of the windows and offsets.

    Returns:
        ``(rows with the sequences written [N, W], [where_j int64 [counts[j], 2] (window, offset)])``.

    Raises:
        ValueError: a sequence longer than a window, or more occurrences than windows.
    """
    if len(sequences) != len(counts):
        raise ValueError(f"got {len(sequences)} sequences but {len(counts)} counts")
    if any(c < 1 for c in counts):
        raise ValueError(f"counts must be >= 1, got {list(counts)}")
    n, width = rows.shape
    too_long = [len(s) for s in sequences if len(s) > width]
    if too_long:
        raise ValueError(
            f"a sequence of {max(too_long)} tokens does not fit in a window of {width} tokens (a window's "
            f"{width - 1} inputs and its last target): use windows of at least {max(too_long) - 1} tokens"
        )
    total = sum(counts)
    if total > n:
        raise ValueError(
            f"the training stream holds {n} windows of {width} tokens but the canaries need {total} "
            f"distinct windows ({' + '.join(map(str, counts))}): use a larger corpus, shorter windows, "
            "or fewer repeats"
        )
    rows = rows.clone()
    chosen = torch.randperm(n, generator=generator)[:total]
    placements, start = [], 0
    for sequence, count in zip(sequences, counts):
        where = chosen[start : start + count]
        start += count
        offsets = torch.randint(0, width - len(sequence) + 1, (count,), generator=generator)
        for w, o in zip(where.tolist(), offsets.tolist()):
            rows[w, o : o + len(sequence)] = sequence
        placements.append(torch.stack([where, offsets], 1))
    return rows, placements
