"""The Secret Sharer experiment end to end: language models trained with and without differential
privacy on text holding inserted secrets, and how exposed each secret is afterwards.

Carlini, Liu, Erlingsson, Kos and Song, "The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks" (USENIX Security 2019), Section 9 and Table 3: a canary such as
"the random number is 281265017" is inserted r times into the training text; its *exposure* is
``log2 |R| - log2 rank``, its rank among all |R| candidates by the model's log-perplexity; models
trained with DP-RMSProp show exposure falling to about 1 bit (the secret no likelier than any
other candidate) as epsilon falls, while the non-private model's is high.

:func:`run_secret_sharer` does all of it (the ``privfast secret-sharer`` command is a thin layer
over it)::

    from privfast.secret_sharer import SecretSharerConfig, run_secret_sharer
    result = run_secret_sharer(config=SecretSharerConfig(epsilons=(math.inf, 8, 1)), out="runs/secret")
    print(result.table)                     # the Table 3 form; result.records hold every number

Per run directory: ``exposure.json`` (everything measured), ``report.md`` (the table), two plots
(exposure against r for each epsilon, and against epsilon for each r), and ``runs/eps-*/``
with each model's per-epoch checkpoint (a stopped run resumes there) and its ``result.json``.

Design choices (each says why):

- One example is one window of ``window + 1`` tokens of the training stream; DP-SGD clips per
  window and Poisson-samples windows. Each occurrence of a canary is written into a window of its
  own (:func:`privfast.text.plant`), so a canary inserted r times is in exactly r examples.
- Several canaries per model, one per (format, r): two formats ("the <tag> number is" + 6
  digits, "the <tag> key is" + 5 hexadecimal symbols), one tag word per repeat count so that
  canaries of one format do not share a prefix (a canary seen 64 times would otherwise set what
  the model expects after the prefix of the one seen once).
- The vocabulary comes from the clean training split, never from the text with canaries: a
  vocabulary built from private text would itself reveal a rare secret's tokens, outside any
  DP guarantee. So a canary's tokens must already be in it; the error says which are not.
- Exposure: exact, by scoring every candidate (10^5 for 5 digits), beside the paper's skew-normal
  extrapolation from a random sample of candidates; privfast's rank counts a tied candidate in
  the canary's favour (TF Privacy's counts it against; ties are rare with float losses).
- epsilon = inf is non-private training (no clipping, no noise), with an optimizer of its own
  (``baseline_optimizer``), as the paper's Table 3 compares optimizers across rows: on this corpus
  DP-SGD trains the private models best (RMSProp scales every coordinate by its noise-dominated
  second moment, so its private steps are mostly noise), while plain SGD at DP-SGD's learning
  rate is unstable without clipping (perplexities: benchmarks/RESULTS.md, "Notes moved from
  docstrings").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from privfast._io import atomic_save, nested_progress
from privfast.attacks.exposure import (
    ENUMERATION_LIMIT,
    TokenCanary,
    candidate_index,
    enumerate_log_perplexities,
    exposure,
    exposure_extrapolated,
    extract,
    score_candidates,
    token_canary,
)
from privfast.models import LSTMLanguageModel, TransformerLanguageModel
from privfast.privacy_engine import PrivacyEngine
from privfast.text import CORPORA, LEVELS, TextCorpus, load_corpus, plant, windows

__all__ = [
    "CANARY_FORMATS",
    "LM_MODELS",
    "OPTIMIZERS",
    "CanaryFormat",
    "SecretSharerConfig",
    "SecretSharerResult",
    "build_language_model",
    "fit_language_model",
    "canary_exposure",
    "make_canaries",
    "perplexity",
    "run_secret_sharer",
    "secret_canaries",
    "train_language_model",
    "training_recipe",
]

LM_MODELS = ("lstm", "transformer")
OPTIMIZERS = ("rmsprop", "adam", "sgd")
_OPTIMIZER_CLASSES = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
_OPTIMIZER_NAMES = {"rmsprop": "RMSProp", "adam": "Adam", "sgd": "SGD"}
RESULT_FORMAT = 1


@dataclass(frozen=True)
class CanaryFormat:
    """A secret's format: ``text`` (with ``{tag}`` where a canary's own word goes) then ``slots``
    symbols drawn uniformly from ``alphabet``; at character level the symbols follow a space."""

    text: str
    alphabet: tuple[str, ...]
    slots: int


CANARY_FORMATS = {
    "digits": CanaryFormat("the {tag} number is", tuple("0123456789"), 5),
    "hex": CanaryFormat("the {tag} key is", tuple("0123456789abcdef"), 4),
    "digits6": CanaryFormat("the {tag} number is", tuple("0123456789"), 6),
    "digits9": CanaryFormat("the {tag} number is", tuple("0123456789"), 9),
}
"""The formats a run can insert, by name. The defaults ``digits`` (10^5 candidates) and ``hex``
(16^4 = 65,536) are ranked exactly in about a second each on a CPU; ``digits6`` (10^6) in several
seconds; ``digits9`` is the paper's "the random number is 281265017" (10^9 candidates: the
skew-normal extrapolation only)."""
TAGS = ("first", "second", "third", "last", "next", "same", "other", "new")
"""One word per repeat count, so that the canaries of one format have distinct prefixes."""


@dataclass
class SecretSharerConfig:
    """Everything that defines a Secret Sharer run (stored in ``exposure.json``).

    Attributes:
        epsilons: one model per value; ``inf`` trains without privacy. Finite values are spent at ``delta``.
        repeats: insertion counts r; each format gets one canary per r.
        formats: canary formats, names from :data:`CANARY_FORMATS`.
        corpus: ``pydoc`` (embedded, no download), ``ptb`` or ``wikitext-2`` (files in ``data_root``).
        data_root: directory of the PTB / WikiText-2 files.
        level: ``word`` or ``char`` tokens.
        min_count: training-split count below which a token becomes <unk>.
        model: ``lstm`` (Embedding, stacked DPLSTM, Linear) or ``transformer`` (causal, GPT-style).
        width: embedding and hidden width (LSTM), model width (transformer).
        layers: LSTM layers / transformer blocks.
        heads: attention heads of the transformer.
        window: tokens per training example (one window of the stream).
        epochs: passes over the training windows.
        batch_size: expected (Poisson) windows per step of private runs; batch size otherwise.
        optimizer: optimizer of the private runs: ``sgd`` (DP-SGD), ``rmsprop`` (the paper's
            DP-RMSProp) or ``adam``.
        lr: learning rate of the private runs at noise multiplier sigma <= 1; noisier runs take lr / sigma.
        baseline_optimizer: optimizer of the non-private run (epsilon inf).
        baseline_lr: its learning rate.
        max_grad_norm: clipping bound C of private runs, on the gradient of a window's mean token loss.
        delta: the delta epsilon is spent at (the seed: 1e-9).
        references: random candidates the skew-normal extrapolation is fitted to.
        extraction_candidates: most likely candidates the extraction search lists.
        extraction_expansions: tree nodes the extraction search may run the model on (its budget).
        exact_limit: rank exactly by scoring all candidates up to this space size; above, the
            extrapolation only.
        seed: seeds the canaries, the windows they go into, the models, the data order and the noise.
    """

    epsilons: tuple[float, ...] = (math.inf, 8.0, 2.0, 1.0)
    repeats: tuple[int, ...] = (1, 4, 16, 64)
    formats: tuple[str, ...] = ("digits", "hex")
    corpus: str = "pydoc"
    data_root: Optional[str] = None
    level: str = "word"
    min_count: int = 5
    model: str = "lstm"
    width: int = 64
    layers: int = 2
    heads: int = 4
    window: int = 16
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 4.0
    baseline_optimizer: str = "rmsprop"
    baseline_lr: float = 0.003
    max_grad_norm: float = 1.0
    delta: float = 1e-9
    references: int = 4096
    extraction_candidates: int = 1000
    extraction_expansions: int = 5000
    exact_limit: int = 2**20
    seed: int = 0

    def __post_init__(self):
        self.epsilons = tuple(float(e) for e in self.epsilons)
        self.repeats = tuple(int(r) for r in self.repeats)
        self.formats = tuple(self.formats)
        problems = []
        if not self.epsilons or any(not e > 0 for e in self.epsilons):
            problems.append(f"epsilons must be > 0 (inf: non-private), got {list(self.epsilons)}")
        if len(set(self.epsilons)) != len(self.epsilons):
            problems.append(f"epsilons must be distinct, got {list(self.epsilons)}")
        if not self.repeats or any(r < 1 for r in self.repeats) or len(set(self.repeats)) != len(self.repeats):
            problems.append(f"repeats must be distinct and >= 1, got {list(self.repeats)}")
        if len(self.repeats) > len(TAGS):
            problems.append(f"at most {len(TAGS)} repeat counts (one prefix word each), got {len(self.repeats)}")
        unknown = [f for f in self.formats if f not in CANARY_FORMATS]
        if not self.formats or unknown or len(set(self.formats)) != len(self.formats):
            problems.append(f"formats must be distinct names from {sorted(CANARY_FORMATS)}, got {list(self.formats)}")
        for name, value, choices in (
            ("corpus", self.corpus, CORPORA),
            ("level", self.level, LEVELS),
            ("model", self.model, LM_MODELS),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("baseline_optimizer", self.baseline_optimizer, OPTIMIZERS),
        ):
            if value not in choices:
                problems.append(f"{name} must be one of {choices}, got {value!r}")
        if min(self.width, self.layers, self.heads, self.window, self.epochs, self.batch_size, self.min_count) < 1:
            problems.append("width, layers, heads, window, epochs, batch_size and min_count must be >= 1")
        if self.model == "transformer" and self.width % self.heads:
            problems.append(f"the transformer's width ({self.width}) must be divisible by heads ({self.heads})")
        if not (self.lr > 0 and self.baseline_lr > 0 and 0 < self.max_grad_norm < math.inf):
            problems.append(
                f"lr, baseline_lr and max_grad_norm must be > 0 and finite, got {self.lr}, "
                f"{self.baseline_lr}, {self.max_grad_norm}"
            )
        if not 0 < self.delta < 1:
            problems.append(f"delta must be in (0, 1), got {self.delta}")
        if self.references < 3 or min(self.extraction_candidates, self.extraction_expansions, self.exact_limit) < 1:
            problems.append(
                f"need references >= 3, extraction_candidates, extraction_expansions, exact_limit >= 1; "
                f"got {self.references}, {self.extraction_candidates}, {self.extraction_expansions}, "
                f"{self.exact_limit}"
            )
        if problems:
            raise ValueError("invalid secret-sharer configuration:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["epsilons"] = [_epsilon_label(e) for e in self.epsilons]  # JSON has no inf
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "SecretSharerConfig":
        values = dict(values)
        values["epsilons"] = tuple(float(e) for e in values["epsilons"])
        return cls(**values)


def _epsilon_label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


# -- data --------------------------------------------------------------------------------------
def make_canaries(
    corpus: TextCorpus, *, formats: Sequence[str], repeats: Sequence[int], generator: Optional[torch.Generator] = None
) -> list[dict]:
    """One canary per (format, repeat count), with random secrets, checked against the vocabulary.

    Args:
        corpus: gives the tokenizer and the vocabulary the canaries are written in.
        formats: names from :data:`CANARY_FORMATS`.
        repeats: the insertion counts; the i-th gets the prefix word ``TAGS[i]``.
        generator: source of the secrets.

    Returns:
        One dict per canary: ``format``, ``repeats``, ``canary`` (a
        :class:`~privfast.attacks.exposure.TokenCanary` whose prefix starts with the end-of-line
        token, the context the secret is scored in), ``sequence`` (int64 ``[L]``, what is written
        into the training windows: prefix, secret, end of line) and ``text``.

    Raises:
        ValueError: a format whose words or alphabet symbols are not in the vocabulary (each would
            be <unk>), or a symbol that is not one token.
    """
    from privfast.attacks.exposure import token_canary

    vocab, tokenizer = corpus.vocab, corpus.tokenizer
    eos = vocab.id(tokenizer.eos)
    out, missing = [], {}
    for name in formats:
        spec = CANARY_FORMATS[name]
        texts = [spec.text.format(tag=TAGS[i]) + (" " if corpus.level == "char" else "") for i in range(len(repeats))]
        absent = [t for text in texts for t in corpus.missing(text)]
        split = [s for s in spec.alphabet if tokenizer(s) != [s]]
        absent += [s for s in spec.alphabet if s not in vocab and s not in split]
        if absent or split:
            missing[name] = sorted(set(absent)) + [f"{s!r} (not one token)" for s in split]
            continue
        alphabet = vocab.encode(list(spec.alphabet))
        for i, r in enumerate(repeats):
            prefix = torch.cat([torch.tensor([eos]), corpus.encode(texts[i])])
            canary = token_canary(prefix, slots=spec.slots, alphabet=alphabet, generator=generator)
            sequence = torch.cat([canary.sequence, torch.tensor([eos])])
            out.append(
                {
                    "format": name,
                    "repeats": r,
                    "canary": canary,
                    "sequence": sequence,
                    "text": corpus.decode(canary.sequence).strip("\n"),
                }
            )
    if missing:
        listed = "; ".join(f"{name}: {', '.join(tokens)}" for name, tokens in missing.items())
        raise ValueError(
            f"the canary formats use tokens that the {corpus.name} {corpus.level}-level vocabulary lacks "
            f"(they would all read as <unk>): {listed}. Use other formats, the other level, or a lower "
            "min_count"
        )
    return out


def secret_canaries(
    corpus: TextCorpus, *, format: str, count: int, context_tokens: int = 2, generator: Optional[torch.Generator] = None
) -> list[TokenCanary]:
    """``count`` canaries of one format, each with a context of its own and a random secret.

    The canaries of an audit (:func:`privfast.auditing.audit_one_run_language_model`): the format's
    text with its ``{tag}`` replaced by ``context_tokens`` random vocabulary tokens ("the <w1> <w2>
    number is"), then the secret. A context of its own is what lets a model tie one secret, seen in
    one window, to it: canaries sharing a context compete for the same continuation.

    Args:
        corpus: gives the tokenizer and vocabulary (checked as :func:`make_canaries` checks them).
        format: a name from :data:`CANARY_FORMATS`.
        count: m >= 1 canaries.
        context_tokens: random tokens in each canary's context (>= 1; the vocabulary's tokens other
            than <unk> and end of line, uniformly).
        generator: source of the contexts and the secrets.

    Returns:
        ``count`` :class:`~privfast.attacks.exposure.TokenCanary` whose prefixes start with the
        end-of-line token; a training window holds ``canary.sequence`` then end of line.
    """
    if count < 1 or context_tokens < 1:
        raise ValueError(f"count and context_tokens must be >= 1, got {count} and {context_tokens}")
    checked = make_canaries(corpus, formats=[format], repeats=[1], generator=generator)[0]["canary"]
    spec = CANARY_FORMATS[format]
    before, after = spec.text.split("{tag}")
    eos = corpus.vocab.id(corpus.tokenizer.eos)
    pool = torch.tensor([i for i in range(len(corpus.vocab)) if i not in (eos, corpus.vocab.unk_id)])
    head = torch.cat([torch.tensor([eos]), corpus.encode(before)])
    tail = corpus.encode(after + (" " if corpus.level == "char" else ""))
    slots, alphabet = len(checked.secret), checked.alphabet
    return [
        token_canary(
            torch.cat([head, pool[torch.randint(0, len(pool), (context_tokens,), generator=generator)], tail]),
            slots=slots,
            alphabet=alphabet,
            generator=generator,
        )
        for _ in range(count)
    ]


def _training_rows(corpus: TextCorpus, canaries: list[dict], *, window: int, generator: torch.Generator) -> Tensor:
    rows = windows(corpus.train, length=window)
    rows, _ = plant(rows, [c["sequence"] for c in canaries], [c["repeats"] for c in canaries], generator=generator)
    return rows


# -- models and training ---------------------------------------------------------------------
def build_language_model(config: SecretSharerConfig, *, vocab_size: int) -> nn.Module:
    """The language model of ``config`` over ``vocab_size`` tokens (input ``[N, T]`` ids, output ``[N, T, V]``)."""
    if config.model == "lstm":
        return LSTMLanguageModel(vocab_size, embed_dim=config.width, hidden_size=config.width, num_layers=config.layers)
    return TransformerLanguageModel(
        vocab_size, dim=config.width, heads=config.heads, layers=config.layers, context=config.window
    )


def training_recipe(config: SecretSharerConfig, epsilon: float) -> tuple[str, float]:
    """``(optimizer, lr)`` a model of ``config`` trains with at ``epsilon``: the baseline's when it is inf."""
    if math.isfinite(epsilon):
        return config.optimizer, config.lr
    return config.baseline_optimizer, config.baseline_lr


def fit_language_model(
    config: SecretSharerConfig,
    rows: Tensor,
    *,
    vocab_size: int,
    epsilon: float,
    seed: int,
    checkpoint: Optional[str | os.PathLike] = None,
    progress: bool = True,
) -> tuple[nn.Module, dict]:
    """The model of ``config`` built from ``config.seed`` and trained on ``rows`` at ``epsilon`` with its recipe:
    ``config.optimizer`` and ``lr`` when private, the baseline's when ``epsilon`` is inf.

    Returns:
        ``(model, what :func:`train_language_model` returned)``.
    """
    optimizer, lr = training_recipe(config, epsilon)
    torch.manual_seed(config.seed)  # the same initial model for every epsilon
    model = build_language_model(config, vocab_size=vocab_size)
    trained = train_language_model(
        model,
        rows,
        epsilon=epsilon,
        delta=config.delta,
        epochs=config.epochs,
        batch_size=config.batch_size,
        optimizer=optimizer,
        lr=lr,
        max_grad_norm=config.max_grad_norm,
        noise_scaled_lr=True,
        seed=seed,
        checkpoint=checkpoint,
        progress=progress,
    )
    return model, trained


def _lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    # Mean over all target tokens = mean over windows of each window's mean (equal lengths); an
    # empty Poisson batch still steps (pure noise), and its mean would be NaN.
    if not len(targets):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def perplexity(model: nn.Module, rows: Tensor, *, batch_size: int = 256) -> float:
    """``exp`` of the mean next-token loss over windows ``rows [N, T + 1]`` (inputs ``[:, :-1]``, targets
    ``[:, 1:]``)."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: no sync a batch
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size].to(device)
            logits = model(batch[:, :-1])
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            ).double()
            count += batch[:, 1:].numel()
    model.train(training)
    total = float(total)
    return math.exp(total / count)


@contextlib.contextmanager
def _quiet_accountant():
    """Silence Opacus's RDP note that the best order is its largest (63): at delta = 1e-9 and epsilon >= 8
    it is, so the accounted epsilon (and the noise calibrated to reach it) errs on the safe side."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def train_language_model(
    model: nn.Module,
    rows: Tensor,
    *,
    epsilon: float = math.inf,
    delta: float = 1e-9,
    epochs: int = 1,
    batch_size: int = 256,
    optimizer: str = "rmsprop",
    lr: float = 0.003,
    max_grad_norm: float = 1.0,
    noise_scaled_lr: bool = False,
    seed: int = 0,
    checkpoint: Optional[str | os.PathLike] = None,
    progress: bool = True,
    grad_sample_mode: str = "auto",
) -> dict:
    """Train a language model on windows, privately (DP-SGD / DP-Adam / DP-RMSProp) unless ``epsilon`` is inf.

    Private runs go through :class:`~privfast.privacy_engine.PrivacyEngine`: one example is one
    window (its mean token loss clipped to ``max_grad_norm``), windows are Poisson-sampled with
    rate ``batch_size / N``, and the noise is the one that spends ``(epsilon, delta)`` in
    ``epochs`` epochs (RDP accountant, the moments accountant of the seed). Non-private runs
    shuffle the windows into batches of ``batch_size``.

    With ``checkpoint``, the state (model, optimizer, accountant, noise and sampling generators)
    is written after every epoch and a later call with the same path goes on from it, making the
    same updates as a run never stopped.

    Args:
        model: ids ``[N, T]`` -> logits ``[N, T, V]``, batch-first (trained in place).
        rows: int64 ``[N, T + 1]`` windows (:func:`privfast.text.windows`).
        epsilon: the privacy budget; ``inf`` trains without clipping or noise.
        delta: the budget's delta.
        epochs: passes over the windows.
        batch_size: expected windows per step.
        optimizer: ``"rmsprop"``, ``"adam"`` or ``"sgd"`` (made private by the engine).
        lr: learning rate.
        max_grad_norm: clipping bound C (private runs).
        noise_scaled_lr: a private run whose noise multiplier sigma exceeds 1 trains at ``lr / sigma``,
            which keeps the noise of each update (``lr * sigma * C / batch_size`` per coordinate) at
            its sigma = 1 level: one ``lr`` then serves every epsilon (with DP-SGD at a fixed lr, the
            sigma = 4 of epsilon = 1 sent the pydoc LSTM to test perplexity 800, against 170 at lr / sigma).
        seed: seeds the data order and the noise.
        checkpoint: file to write after each epoch and resume from.
        progress: progress bars over epochs and steps.
        grad_sample_mode: the engine's per-example strategy (see :class:`~privfast.grad_sample.GradSampleModule`).

    Returns:
        ``{"history": [{"epoch", "train_loss", "steps", "epsilon"?}], "noise_multiplier": sigma or None,
        "lr": the learning rate used, "epsilon": spent (inf if non-private), "seconds": training time this call}``.

    Raises:
        ValueError: bad arguments, or a checkpoint of another configuration.
    """
    if rows.dim() != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must be windows [N, T + 1] with T >= 1, got shape {tuple(rows.shape)}")
    if not epsilon > 0 or optimizer not in OPTIMIZERS or epochs < 1 or batch_size < 1:
        raise ValueError(
            f"need epsilon > 0, optimizer in {OPTIMIZERS}, epochs >= 1, batch_size >= 1; got {epsilon}, "
            f"{optimizer!r}, {epochs}, {batch_size}"
        )
    private = math.isfinite(epsilon)
    if private and batch_size > len(rows):
        raise ValueError(f"batch_size={batch_size} is more than the {len(rows)} windows")
    torch.manual_seed(seed)
    opt = _OPTIMIZER_CLASSES[optimizer](model.parameters(), lr=lr)
    dataset = TensorDataset(rows[:, :-1], rows[:, 1:])
    engine = None
    if private:
        engine = PrivacyEngine(accountant="rdp")
        with _quiet_accountant():
            trained, opt, loader = engine.make_private_with_epsilon(
                module=model,
                optimizer=opt,
                data_loader=DataLoader(dataset, batch_size=batch_size),
                target_epsilon=epsilon,
                target_delta=delta,
                epochs=epochs,
                max_grad_norm=max_grad_norm,
                batch_first=True,
                grad_sample_mode=grad_sample_mode,
                noise_generator=torch.Generator(device=next(model.parameters()).device).manual_seed(seed),
            )
        if noise_scaled_lr and opt.noise_multiplier > 1:
            lr = lr / opt.noise_multiplier
            for group in opt.param_groups:
                group["lr"] = lr
    else:
        trained, loader = model, DataLoader(dataset, batch_size=batch_size, shuffle=True)
    key = {
        "epsilon": _epsilon_label(epsilon),
        "delta": delta,
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "lr": lr,
        "max_grad_norm": max_grad_norm,
        "seed": seed,
        "windows": list(rows.shape),
    }
    history: list[dict] = []
    if checkpoint is not None and os.path.isfile(checkpoint):
        state = torch.load(checkpoint, weights_only=False)
        if state.get("key") != key:
            raise ValueError(
                f"{checkpoint} belongs to another training run ({state.get('key')} != {key}); remove it "
                "or use another directory"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if engine is not None:
            engine.load_state_dict(state["engine"])
        torch.set_rng_state(state["rng"])
        history = state["history"]
    started = time.perf_counter()
    device = next(model.parameters()).device
    for epoch in tqdm(
        range(len(history), epochs), desc=f"train eps={_epsilon_label(epsilon)}", disable=not progress, leave=False
    ):
        model.train()
        # The epoch's loss is summed on the device and read once: a float() per step would stall a GPU step.
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for x, y in tqdm(loader, desc=f"epoch {epoch + 1}", disable=not nested_progress(progress), leave=False):
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = _lm_loss(trained(x), y)
            loss.backward()
            opt.step()
            total += loss.detach().double() * len(y)
            count += len(y)
        total = float(total)
        record = {
            "epoch": epoch + 1,
            "train_loss": total / count if count else math.nan,
            "steps": (epoch + 1) * len(loader),
        }
        if engine is not None:
            with _quiet_accountant():
                record["epsilon"] = engine.get_epsilon(delta)
        history.append(record)
        if checkpoint is not None:
            atomic_save(
                {
                    "key": key,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "engine": engine.state_dict() if engine is not None else None,
                    "rng": torch.get_rng_state(),
                    "history": history,
                },
                checkpoint,
            )
    return {
        "history": history,
        "noise_multiplier": opt.noise_multiplier if engine is not None else None,
        "lr": lr,
        "epsilon": history[-1]["epsilon"] if engine is not None else math.inf,
        "seconds": time.perf_counter() - started,
    }


# -- exposure ---------------------------------------------------------------------------------
def canary_exposure(
    model: nn.Module,
    canary: TokenCanary,
    *,
    references: int = 4096,
    extraction_candidates: int = 1000,
    extraction_expansions: int = 5000,
    exact_limit: int = ENUMERATION_LIMIT,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
) -> dict:
    """Exposure of one inserted canary: exact rank, skew-normal extrapolation and the extraction attack.

    Args:
        model: the trained language model.
        canary: the inserted canary (prefix, secret, alphabet).
        references: candidates sampled (uniformly, the secret excluded) for the skew-normal fit.
        extraction_candidates: the extraction search lists this many most likely candidates.
        extraction_expansions: the extraction search runs the model on at most this many tree nodes.
        exact_limit: rank among all candidates when the space is at most this large (scoring
            them all); otherwise ``exposure`` is None and the extrapolation stands alone.
        generator: source of the sampled references.
        progress: progress bars.

    Returns:
        ``space`` (|R|), ``log_perplexity`` (the secret's, nats), ``exposure`` (exact, bits, or
        None), ``exposure_extrapolated`` (bits; NaN where the fit failed), ``extrapolation_note``
        (the fit's warning or error, None if it passed its checks), ``extraction_rank`` (1-based
        rank of the secret in the search's list, None if not in it), ``extracted`` (rank 1),
        ``extraction_top`` (slot tokens of the search's first answer), ``seconds``.
    """
    started = time.perf_counter()
    space = canary.space_size
    if space <= exact_limit:
        every = enumerate_log_perplexities(model, canary, progress=progress)
        index = int(candidate_index(canary))
        secret = every[index : index + 1]
        others = torch.cat([every[:index], every[index + 1 :]])
        exact = float(exposure(secret, others)[0])
        sample = others[torch.randint(0, len(others), (references,), generator=generator)]
    else:
        exact = None
        prefix = len(canary.prefix)
        secret = score_candidates(model, canary, canary.secret[None])
        sample = score_candidates(
            model, canary, canary.references(limit=references, generator=generator)[:, prefix:], progress=progress
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            extrapolated, note = float(exposure_extrapolated(secret, sample)[0]), None
        except ValueError as error:
            extrapolated, note = math.nan, f"not extrapolated: {error}"
    notes = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    note = "; ".join(filter(None, [note, *notes])) or None
    found = extract(
        model, canary, max_candidates=extraction_candidates, max_expansions=extraction_expansions, progress=progress
    )
    return {
        "space": space,
        "log_perplexity": float(secret[0]),
        "exposure": exact,
        "max_exposure": math.log2(space),
        "exposure_extrapolated": extrapolated,
        "extrapolation_note": note,
        "extraction_rank": found.secret_rank,
        "extracted": found.extracted,
        "extraction_expansions": found.expansions,
        "extraction_exhausted": found.exhausted,
        "extraction_top": found.candidates[0].tolist() if len(found.candidates) else None,
        "seconds": time.perf_counter() - started,
    }


# -- the experiment ---------------------------------------------------------------------------
@dataclass
class SecretSharerResult:
    """What :func:`run_secret_sharer` measured.

    Attributes:
        records: one dict per epsilon (the ``runs`` of ``exposure.json``).
        table: the Table 3 form as aligned text (Markdown in ``report.md``).
        paths: the files written (``exposure.json``, ``report.md``, plots).
    """

    records: list[dict]
    table: str
    paths: dict[str, Path]


def run_secret_sharer(
    *, config: Optional[SecretSharerConfig] = None, out: str | os.PathLike, resume: bool = False, progress: bool = True
) -> SecretSharerResult:
    """Train one language model per epsilon on text with inserted canaries, measure their exposure, report.

    Every input is checked before any training: the configuration, the corpus (its files, its size
    against the canaries' windows) and the canaries (their tokens in the vocabulary).

    Args:
        config: the run (default: :class:`SecretSharerConfig`'s defaults, a few minutes on 2 CPU cores).
        out: the run directory.
        resume: go on with the run in ``out`` (models trained or measured there are reused; new
            epsilons are added). Without it, a directory holding a run is refused.
        progress: progress bars.

    Returns:
        :class:`SecretSharerResult`.

    Raises:
        ValueError: a bad configuration, a corpus too small for the canaries' windows, canary tokens
            missing from the vocabulary, or an ``out`` holding another run.
        FileNotFoundError: a file-based corpus without its files.
    """
    config = config or SecretSharerConfig()
    out = Path(out)
    stored_config = out / "config.json"
    if stored_config.is_file():
        if not resume:
            raise ValueError(
                f"{out} holds a secret-sharer run: pass resume=True (--resume) to go on with it, or "
                "choose another directory"
            )
        stored = json.loads(stored_config.read_text())
        current = json.loads(json.dumps(config.to_dict()))  # tuples as the stored lists
        changed = sorted(k for k in current if k != "epsilons" and stored.get(k) != current[k])
        if changed:
            diff = ", ".join(f"{k}: {stored.get(k)!r} -> {current[k]!r}" for k in changed)
            raise ValueError(f"{out} holds a run of another configuration ({diff}); only epsilons may change on resume")
    corpus = load_corpus(config.corpus, level=config.level, root=config.data_root, min_count=config.min_count)
    generator = torch.Generator().manual_seed(config.seed)
    canaries = make_canaries(corpus, formats=config.formats, repeats=config.repeats, generator=generator)
    rows = _training_rows(corpus, canaries, window=config.window, generator=generator)
    valid, test = windows(corpus.valid, length=config.window), windows(corpus.test, length=config.window)
    out.mkdir(parents=True, exist_ok=True)
    stored_config.write_text(json.dumps(config.to_dict(), indent=1))

    records = []
    for epsilon in tqdm(config.epsilons, desc="epsilons", disable=not progress):
        run_dir = out / "runs" / f"eps-{_epsilon_label(epsilon)}"
        result_path = run_dir / "result.json"
        if result_path.is_file():
            records.append(json.loads(result_path.read_text()))
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        model, trained = fit_language_model(
            config,
            rows,
            vocab_size=len(corpus.vocab),
            epsilon=epsilon,
            seed=config.seed + zlib.crc32(run_dir.name.encode()),  # by epsilon, not position: order-free resume
            checkpoint=run_dir / "checkpoint.pt",
            progress=nested_progress(progress),  # inside the bar over epsilons
        )
        started = time.perf_counter()
        measure_generator = torch.Generator().manual_seed(config.seed)
        measured = []
        for c in tqdm(canaries, desc="exposure", disable=not nested_progress(progress), leave=False):
            result = canary_exposure(
                model,
                c["canary"],
                references=config.references,
                extraction_candidates=config.extraction_candidates,
                extraction_expansions=config.extraction_expansions,
                exact_limit=config.exact_limit,
                generator=measure_generator,
                progress=nested_progress(progress),
            )
            top = result.pop("extraction_top")
            result["extraction_top"] = None if top is None else corpus.decode(torch.tensor(top))
            measured.append({"format": c["format"], "repeats": c["repeats"], "text": c["text"], **result})
        test_ppl, valid_ppl = perplexity(model, test), perplexity(model, valid)
        record = {
            "format": RESULT_FORMAT,
            "epsilon": _epsilon_label(epsilon),
            "epsilon_spent": trained["epsilon"],
            "delta": config.delta if math.isfinite(epsilon) else None,
            "noise_multiplier": trained["noise_multiplier"],
            "optimizer": training_recipe(config, epsilon)[0],
            "lr": trained["lr"],
            "private": math.isfinite(epsilon),
            "test_loss": math.log(test_ppl),
            "test_perplexity": test_ppl,
            "valid_perplexity": valid_ppl,
            "history": trained["history"],
            "train_seconds": trained["seconds"],
            "measure_seconds": time.perf_counter() - started,
            "canaries": measured,
        }
        result_path.write_text(json.dumps(record, indent=1))
        records.append(record)
    return _write_outputs(out, config, corpus, canaries, rows, records)


# -- reports ----------------------------------------------------------------------------------
def _mean_exposure(record: dict, r: int, key: str) -> float:
    values = [c[key] for c in record["canaries"] if c["repeats"] == r and c[key] is not None]
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _table(config: SecretSharerConfig, records: list[dict], *, markdown: bool) -> str:
    header = ["optimizer", "epsilon", "test loss", "test ppl"] + [f"exposure r={r}" for r in config.repeats]
    body = []
    for record in records:
        name = ("DP-" if record["private"] else "") + _OPTIMIZER_NAMES[record["optimizer"]]
        cells = [name, record["epsilon"], f"{record['test_loss']:.3f}", f"{record['test_perplexity']:.1f}"]
        for r in config.repeats:
            exact, fitted = _mean_exposure(record, r, "exposure"), _mean_exposure(record, r, "exposure_extrapolated")
            cells.append(f"{exact:.1f} ({fitted:.1f})" if not math.isnan(exact) else f"({fitted:.1f})")
        body.append(cells)
    from privfast.reports import table

    return table(header, body, markdown=markdown, align="ll" + "r" * (len(header) - 2))


def _plots(out: Path, config: SecretSharerConfig, records: list[dict]) -> dict[str, Path]:
    from matplotlib.figure import Figure

    paths = {}
    canaries = records[0]["canaries"]
    top = sum(c["max_exposure"] for c in canaries) / len(canaries)
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    for record in records:
        ax.plot(
            config.repeats,
            [_mean_exposure(record, r, "exposure") for r in config.repeats],
            "o-",
            label=f"epsilon = {record['epsilon']}",
        )
    ax.set(
        xscale="log",
        xlabel="insertions r",
        ylabel="exposure (bits, mean over formats)",
        title="exposure against insertions",
    )
    ax.set_xticks(config.repeats, [str(r) for r in config.repeats])
    ax.axhline(1 / math.log(2), color="gray", ls=":", label="not memorized (1/ln 2)")
    ax.axhline(top, color="gray", ls="--", label="rank 1 (the most likely candidate)")
    ax.legend(fontsize="small")
    paths["exposure_vs_repeats"] = out / "exposure_vs_repeats.png"
    fig.savefig(paths["exposure_vs_repeats"], dpi=110)

    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    finite = [float(r["epsilon"]) for r in records if r["private"]]
    # Non-private models sit to the right of the largest epsilon, on a tick of their own.
    inf_x = 4 * max(finite) if finite else 1.0
    order = sorted(records, key=lambda r: float(r["epsilon"]))
    xs = [float(r["epsilon"]) if r["private"] else inf_x for r in order]
    for r in config.repeats:
        ax.plot(xs, [_mean_exposure(record, r, "exposure") for record in order], "o-", label=f"r = {r}")
    ax.set(
        xscale="log", xlabel="epsilon", ylabel="exposure (bits, mean over formats)", title="exposure against epsilon"
    )
    ax.set_xticks(xs, [r["epsilon"] if r["private"] else "inf" for r in order])
    ax.axhline(1 / math.log(2), color="gray", ls=":")
    ax.axhline(top, color="gray", ls="--")
    ax.legend(fontsize="small")
    paths["exposure_vs_epsilon"] = out / "exposure_vs_epsilon.png"
    fig.savefig(paths["exposure_vs_epsilon"], dpi=110)
    return paths


def _write_outputs(
    out: Path, config: SecretSharerConfig, corpus: TextCorpus, canaries: list[dict], rows: Tensor, records: list[dict]
) -> SecretSharerResult:
    summary = {
        "config": config.to_dict(),
        "corpus": {**corpus.summary(), "training_windows": len(rows)},
        "canaries": [
            {"format": c["format"], "repeats": c["repeats"], "text": c["text"], "space": c["canary"].space_size}
            for c in canaries
        ],
        "runs": records,
    }
    paths = {"exposure.json": out / "exposure.json", "report.md": out / "report.md"}
    paths["exposure.json"].write_text(json.dumps(summary, indent=1))
    paths.update(_plots(out, config, records))
    spaces = ", ".join(
        f"{name}: {CANARY_FORMATS[name].slots} slots over {len(CANARY_FORMATS[name].alphabet)} symbols "
        f"({len(CANARY_FORMATS[name].alphabet) ** CANARY_FORMATS[name].slots:,} candidates, at most "
        f"{CANARY_FORMATS[name].slots * math.log2(len(CANARY_FORMATS[name].alphabet)):.1f} bits)"
        for name in config.formats
    )
    lines = [
        "# The Secret Sharer: exposure of inserted canaries against epsilon",
        "",
        f"{config.model.upper() if config.model == 'lstm' else 'Transformer'} language model ({config.layers} layers, "
        f"width {config.width}) on the {corpus.name} corpus at {corpus.level} level ({len(corpus.vocab):,} tokens of "
        f"vocabulary, {len(rows):,} training windows of {config.window} tokens), {config.epochs} epochs, "
        f"non-private: {config.baseline_optimizer}, lr {config.baseline_lr}; private: {config.optimizer}, lr "
        f"{config.lr}, each window's gradient clipped to {config.max_grad_norm}, epsilon spent at delta = "
        f"{config.delta:g}.",
        "",
        f"Canaries ({spaces}): one per format and insertion count r. Exposure in bits, exact (rank among all "
        "candidates), with the skew-normal extrapolation in parentheses; mean over the formats. About 1.4 bits "
        "(1/ln 2) is what a model that never saw the secret gives on average.",
        "",
        _table(config, records, markdown=True),
        "",
        "| epsilon | canary | r | exposure | extrapolated | extraction rank | log-perplexity |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for record in records:
        for c in record["canaries"]:
            exact = "-" if c["exposure"] is None else f"{c['exposure']:.2f}"
            rank = "-" if c["extraction_rank"] is None else str(c["extraction_rank"])
            lines.append(
                f"| {record['epsilon']} | `{c['text']}` | {c['repeats']} | {exact} | "
                f"{c['exposure_extrapolated']:.2f} | {rank} | {c['log_perplexity']:.2f} |"
            )
    notes = sorted({c["extrapolation_note"] for r in records for c in r["canaries"] if c["extrapolation_note"]})
    lines += [
        "",
        f"Extraction: shortest-path search listing the {config.extraction_candidates} most likely "
        "candidates; '-' means the secret is not among them.",
        "",
    ]
    if notes:
        lines += ["Extrapolation warnings:", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["![exposure against r](exposure_vs_repeats.png) ![exposure against epsilon](exposure_vs_epsilon.png)", ""]
    paths["report.md"].write_text("\n".join(lines))
    return SecretSharerResult(records, _table(config, records, markdown=False), paths)
