"""Training-step throughput: privfast's DP step (each per-example gradient mode) against Opacus and
against non-private training, on the same model and batch. The measurement behind ``privfast bench``.

A step is forward, backward, clipping, noise and the optimizer update on a batch of B examples,
each expanded to K augmented rows (``[B*K, ...]``). Opacus has no augmentation multiplicity, so it
runs the way augmented DP training is run on it today: every one of the B*K rows is clipped on
its own. privfast folds an example's K rows into one per-example gradient.

Times are the fastest of several rounds: on a shared machine the fastest round is the least
disturbed one, and the median is reported beside it. The variants of one K run interleaved,
round by round, so that a change in the machine's load hits them alike and their ratios hold.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "FAMILIES",
    "VARIANTS",
    "Family",
    "check_same_update",
    "compare_family",
    "format_markdown",
    "format_rows",
    "measure",
    "peak_bytes",
    "phase_times",
    "format_phases",
    "op_times",
    "format_op_times",
    "format_op_categories",
    "OP_CATEGORIES",
    "OUTSIDE_OPS",
    "run_benchmark",
    "training_step",
]

VARIANTS = (
    "non-private",
    "privfast-auto",
    "privfast-materialize",
    "privfast-bk",
    "privfast-ghost",
    "opacus",
    "opacus-ghost",
)
"""What a step can be: plain SGD, privfast's DPOptimizer with a per-example gradient mode, or Opacus's
(its hooks, or its fast gradient clipping with ghost norms: ``grad_sample_mode="ghost"``)."""


def _loss(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``[N, C]`` logits or ``[N, T, C]`` token logits against ``[N]`` / ``[N, T]`` labels."""
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), y.reshape(-1))


def training_step(
    variant: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    augmult: int = 1,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    lr: float = 0.01,
) -> Callable[[], None]:
    """A closure running one full training step of ``variant`` on the fixed batch ``(x, y)``.

    Args:
        variant: one of :data:`VARIANTS`.
        model: the network (trained in place by the closure).
        x: inputs ``[B*K, ...]`` (batch-first), the K rows of an example contiguous.
        y: int64 labels ``[B*K]``, or ``[B*K, T]`` for per-token logits ``[B*K, T, classes]``.
        augmult: K.
        noise_multiplier: sigma of the private variants.
        max_grad_norm: clipping bound C of the private variants.
        lr: SGD learning rate.

    Returns:
        ``step()``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if x.shape[0] != y.shape[0] or x.shape[0] % augmult:
        raise ValueError(f"x has {x.shape[0]} rows and y {y.shape[0]}; both must be B*K with K={augmult}")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    examples = x.shape[0] // augmult
    loss = _loss
    if variant == "opacus":
        import opacus

        model = opacus.GradSampleModule(model)
        optimizer = opacus.optimizers.DPOptimizer(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, expected_batch_size=x.shape[0]
        )
    elif variant == "opacus-ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        model = GradSampleModuleFastGradientClipping(model, max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        optimizer = DPOptimizerFastGradientClipping(
            optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, expected_batch_size=x.shape[0]
        )
        criterion = DPLossFastGradientClipping(model, optimizer, nn.CrossEntropyLoss(), "mean")

        def loss(output, target):  # per-sequence losses for token logits: Opacus's privacy unit is the row
            shape = output.shape if output.dim() == 3 else None
            return criterion(output.reshape(-1, output.shape[-1]), target.reshape(-1), shape=shape)
    elif variant.startswith("privfast"):
        model, optimizer = _privfast(
            model,
            optimizer,
            mode=variant.split("-", 1)[1],
            augmult=augmult,
            examples=examples,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
        )

    def step() -> None:
        optimizer.zero_grad()
        loss(model(x), y).backward()
        optimizer.step()

    return step


def _privfast(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    mode: str,
    augmult: int,
    examples: int,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int = 0,
):
    """``(GradSampleModule, DPOptimizer)``: privfast's private training of ``model`` with ``optimizer``, the
    noise keyed by ``seed``."""
    from privfast.grad_sample import GradSampleModule
    from privfast.optim import DPOptimizer

    model = GradSampleModule(model, mode=mode, augmult=augmult, batch_first=True)
    optimizer = DPOptimizer(
        optimizer,
        module=model,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=examples,
        generator=torch.Generator().manual_seed(seed),
    )
    return model, optimizer


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def _seeded_step(
    variant: str, make_model: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, *, augmult: int, seed: int
) -> Callable[[], None]:
    """:func:`training_step` on a model built after ``torch.manual_seed(seed)``: every variant starts from
    the same weights (Opacus's construction warnings silenced)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return training_step(variant, make_model(), x, y, augmult=augmult)


def check_same_update(
    make_model: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    augmult: int,
    variants: Sequence[str],
    seed: int = 0,
    rtol: float = 1e-3,
) -> None:
    """Check that the variants compute the same update before their times are compared (sigma = 0).

    privfast's modes must agree with each other at any K; Opacus's (which clips each of the B*K rows
    on its own) with privfast at K = 1; non-private training with privfast when nothing is clipped.

    Raises:
        AssertionError: naming the two variants and the largest relative difference.
    """

    def update(variant: str, max_grad_norm: float) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        model = make_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            training_step(
                variant, model, x, y, augmult=augmult, noise_multiplier=0.0, max_grad_norm=max_grad_norm, lr=0.0
            )()
        return [p.grad.detach().clone() for p in model.parameters()]

    updates: dict[tuple[str, float], list[torch.Tensor]] = {}

    def compare(a: str, b: str, max_grad_norm: float) -> None:
        for key in ((a, max_grad_norm), (b, max_grad_norm)):
            if key not in updates:
                updates[key] = update(*key)
        ua, ub = updates[a, max_grad_norm], updates[b, max_grad_norm]
        worst = max(float((p - q).norm() / q.norm().clamp_min(1e-30)) for p, q in zip(ua, ub))
        assert worst <= rtol, f"{a} and {b} compute different updates (relative difference {worst:.2e})"

    private = [v for v in variants if v.startswith("privfast")]
    reference = private[0] if private else None
    for variant in variants:
        if variant == reference:
            continue
        if variant == "non-private" and reference:
            compare(variant, reference, 1e12)  # no example clipped: the mean gradient
        elif variant.startswith("privfast") or (variant.startswith("opacus") and augmult == 1 and reference):
            compare(variant, reference, 1e-3)  # every example clipped: the clip factors matter


def measure(steps: Mapping[str, Callable[[], None]], *, rounds: int = 5, warmup: int = 1) -> dict[str, dict]:
    """Time several steps interleaved: ``warmup`` untimed calls of each, then ``rounds`` rounds
    that call every step once.

    Args:
        steps: name -> ``step()``.
        rounds: timed calls of each step.
        warmup: untimed calls of each step first (lazy initialization, allocator, first kernel calls).

    Returns:
        name -> ``{"min_s", "median_s", "rounds", "times_s"}``, ``times_s`` every round's time in order
        (round ``r`` of every step ran back to back, for ratios paired by round).
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds} and {warmup}")
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"min_s": min(t), "median_s": statistics.median(t), "rounds": rounds, "times_s": t}
        for name, t in times.items()
    }


def run_benchmark(
    make_model: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    num_classes: int,
    batch_size: int = 16,
    augmults: Iterable[int] = (1, 4),
    variants: Sequence[str] = VARIANTS,
    rounds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Step time of each variant at each K, with ratios to non-private and to Opacus.

    Args:
        make_model: builds the model (every variant starts from the same seeded initialization).
        input_shape: one example's shape, e.g. ``(3, 32, 32)``.
        num_classes: classes of the random labels.
        batch_size: B, examples per step.
        augmults: the K values.
        variants: names from :data:`VARIANTS`.
        rounds: timed steps per measurement.
        seed: seeds the model and the random batch.
        progress: show a progress bar.

    Returns:
        One dict per (K, variant): ``k``, ``variant``, ``min_s``, ``median_s``, ``examples_per_s``
        (B / min_s), ``vs_nonprivate`` (min_s / non-private's, when measured) and
        ``opacus_over_this`` (Opacus's min_s / min_s, when measured).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected names from {VARIANTS}")
    rows = []
    for k in tqdm(list(augmults), desc="bench (K)", disable=not progress):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(batch_size * k, *input_shape, generator=g)
        y = torch.randint(0, num_classes, (batch_size * k,), generator=g)
        steps = {}
        for variant in variants:
            steps[variant] = _seeded_step(variant, make_model, x, y, augmult=k, seed=seed)
        with warnings.catch_warnings():  # Opacus's hooks warn on inputs without gradients, at every step
            warnings.simplefilter("ignore")
            timings = measure(steps, rounds=rounds)
        rows += [{"k": k, "variant": v, **t, "examples_per_s": batch_size / t["min_s"]} for v, t in timings.items()]
    for row in rows:
        same_k = {r["variant"]: r for r in rows if r["k"] == row["k"]}
        if "non-private" in same_k:
            row["vs_nonprivate"] = row["min_s"] / same_k["non-private"]["min_s"]
        if "opacus" in same_k:
            row["opacus_over_this"] = same_k["opacus"]["min_s"] / row["min_s"]
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    """:func:`run_benchmark`'s rows as an aligned text table."""
    header = ("K", "variant", "min ms", "median ms", "examples/s", "x non-private", "Opacus / this")
    body = [
        (
            str(r["k"]),
            r["variant"],
            f"{1e3 * r['min_s']:.1f}",
            f"{1e3 * r['median_s']:.1f}",
            f"{r['examples_per_s']:.0f}",
            _ratio(r.get("vs_nonprivate")),
            _ratio(r.get("opacus_over_this")),
        )
        for r in rows
    ]
    from privfast.reports import table

    return table(header, body, align="rl" + "r" * (len(header) - 2))


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------------------------------- model families
@dataclass(frozen=True)
class Family:
    """A benchmark model with a CPU-sized batch: ``make_model()`` and ``make_batch(k, generator) -> (x, y)``
    with ``x`` ``[B*K, ...]`` batch-first and ``y`` ``[B*K]`` (or ``[B*K, T]`` for token logits)."""

    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    augmults: tuple[int, ...]
    description: str


def _images(batch: int, channels: int, size: int, classes: int):
    def make(k: int, g: torch.Generator):
        return torch.rand(batch * k, channels, size, size, generator=g), torch.randint(
            0, classes, (batch * k,), generator=g
        )

    return make


def _tokens(batch: int, length: int, vocab: int):
    def make(k: int, g: torch.Generator):
        ids = torch.randint(0, vocab, (batch * k, length + 1), generator=g)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # next-token prediction

    return make


def _convnet():
    from privfast.models import ConvNet

    return ConvNet(in_channels=3, num_classes=10, width=32, image_size=32, groups=8)


def _wrn():
    from privfast.models import WideResNet

    return WideResNet(depth=16, widen=4, num_classes=10)


class _LSTMLanguageModel(nn.Module):
    """Embedding, a 2-layer Opacus DPLSTM (batch-first), a Linear over the vocabulary."""

    def __init__(self, vocab: int = 1000, width: int = 128):
        super().__init__()
        from opacus.layers import DPLSTM

        self.embed = nn.Embedding(vocab, width)
        self.rnn = DPLSTM(width, width, num_layers=2, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0])


class _CausalTransformer(nn.Module):
    """A small GPT: token and position embeddings, pre-norm blocks of causal self-attention (Linear
    projections) and an MLP, a Linear over the vocabulary; batch-first ``[N, T]`` ids."""

    def __init__(self, vocab: int = 1000, width: int = 128, heads: int = 4, layers: int = 2, length: int = 64):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Embedding(length, width)
        self.heads = heads
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(width),
                    "qkv": nn.Linear(width, 3 * width),
                    "proj": nn.Linear(width, width),
                    "norm2": nn.LayerNorm(width),
                    "up": nn.Linear(width, 4 * width),
                    "down": nn.Linear(4 * width, width),
                }
            )
            for _ in range(layers)
        )
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, ids):
        n, t = ids.shape
        # Positions as [N, T] rows (each example's own; contiguous, as Opacus's ghost norms need).
        h = self.embed(ids) + self.pos(torch.arange(t, device=ids.device).repeat(n, 1))
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](h)).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, -1)
            h = h + block["proj"](attended)
            h = h + block["down"](F.gelu(block["up"](block["norm2"](h))))
        return self.head(self.norm(h))


FAMILIES: dict[str, Family] = {
    "cnn": Family(_convnet, _images(16, 3, 32, 10), (1, 4, 16), "GroupNorm ConvNet, width 32, 32x32, B = 16"),
    "wrn16-4": Family(_wrn, _images(4, 3, 32, 10), (1, 4), "WRN-16-4 (GroupNorm), 32x32, B = 4"),
    "lstm-lm": Family(
        _LSTMLanguageModel,
        _tokens(32, 64, 1000),
        (1,),
        "LSTM language model (2 x 128, vocabulary 1000), B = 32, 64 tokens",
    ),
    "transformer": Family(
        _CausalTransformer, _tokens(32, 64, 1000), (1,), "causal transformer (2 blocks, width 128), B = 32, 64 tokens"
    ),
}
"""The benchmark's model families (``make bench``, ``privfast bench --family``)."""

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def peak_bytes(step: Callable[[], None]) -> Optional[int]:
    """Peak resident memory of two calls of a step never run before, above the resident memory before
    them (Linux; None elsewhere): what the step allocates for itself, including what it keeps from one
    step to the next (per-example workspaces, ``.grad``).

    glibc is told to serve blocks above 64 KiB by mmap, so that freed tensors leave the resident set
    at once and the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) follows the
    live allocations. That setting stays for the rest of the process and makes every later large
    allocation fault in fresh pages: run this in a process of its own (:func:`compare_family` does),
    not before timing anything.
    """
    if not sys.platform.startswith("linux"):
        return None

    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    libc = ctypes.CDLL(None)
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    gc.collect()
    libc.malloc_trim(0)  # freed memory still resident would hide the step's own peak below the baseline
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    step()
    return status("VmHWM:") - before


def _family_peak(name: str, k: int, variant: str, seed: int, threads: int) -> Optional[int]:
    """:func:`peak_bytes` of one variant's step on one family and K (run in a process of its own)."""
    torch.set_num_threads(threads)
    family = FAMILIES[name]
    x, y = family.make_batch(k, torch.Generator().manual_seed(seed))
    step = _seeded_step(variant, family.make_model, x, y, augmult=k, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peak_bytes(step)


def _peaks_in_child(name: str, k: int, variants: Sequence[str], seed: int) -> dict[str, Optional[int]]:
    """The peaks, each variant's measured in a fresh process of its own: the allocator setting they need
    must not reach the timings, and what one variant leaves behind in a process (memory the allocator
    kept, kernels and plans initialized once per process) must not lower or raise the next one's."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    threads = torch.get_num_threads()
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        return {v: pool.submit(_family_peak, name, k, v, seed, threads).result() for v in variants}


def compare_family(
    name: str,
    *,
    augmults: Optional[Iterable[int]] = None,
    variants: Sequence[str] = VARIANTS,
    rounds: int = 5,
    seed: int = 0,
    memory: bool = True,
    progress: bool = True,
) -> list[dict]:
    """Step time (and peak memory) of every applicable variant on one family, after checking at sigma = 0
    that they compute the same update.

    A variant that cannot run the model (e.g. Opacus's ghost clipping on a layer it does not support)
    is reported with its error instead of a time.

    Returns:
        One dict per (K, variant) as :func:`run_benchmark`'s rows, plus ``family``, ``peak_bytes``,
        ``paired_vs_nonprivate`` (the median over rounds of the time over non-private's in the same round)
        and ``opacus_best_over_this`` (the faster Opacus mode's time over this one), or ``error``.
    """
    family = _family(name)
    rows = []
    for k in tqdm(list(augmults or family.augmults), desc=f"bench {name} (K)", disable=not progress):
        x, y = family.make_batch(k, torch.Generator().manual_seed(seed))
        steps, failed = {}, {}
        for variant in variants:
            try:
                step = _seeded_step(variant, family.make_model, x, y, augmult=k, seed=seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    step()  # a variant that cannot run this model fails here, before anything is timed
                steps[variant] = step
            except Exception as error:  # noqa: BLE001 (reported in the table, not hidden)
                failed[variant] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        check_same_update(family.make_model, x, y, augmult=k, variants=list(steps), seed=seed)
        peaks = _peaks_in_child(name, k, list(steps), seed) if memory else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timings = measure(steps, rounds=rounds)
        examples = x.shape[0] // k
        rows += [
            {
                "family": name,
                "k": k,
                "variant": v,
                **t,
                "examples_per_s": examples / t["min_s"],
                "peak_bytes": peaks.get(v),
            }
            for v, t in timings.items()
        ]
        rows += [{"family": name, "k": k, "variant": v, "error": e} for v, e in failed.items()]
    _add_ratios(rows)
    return rows


def _paired_ratio(row: dict, base: dict) -> float:
    """Median over rounds of this variant's time over ``base``'s in the same round.

    A shared machine's speed drifts by tens of percent over minutes; the fastest rounds of two variants
    can come from different moments, while the two steps of one round ran seconds apart.
    """
    return statistics.median(a / b for a, b in zip(row["times_s"], base["times_s"]))


def _add_ratios(rows: list[dict]) -> None:
    for row in rows:
        if "min_s" not in row:
            continue
        same = {
            r["variant"]: r
            for r in rows
            if r["k"] == row["k"] and r.get("family") == row.get("family") and "min_s" in r
        }
        if "non-private" in same:
            row["vs_nonprivate"] = row["min_s"] / same["non-private"]["min_s"]
            row["paired_vs_nonprivate"] = _paired_ratio(row, same["non-private"])
            if row.get("peak_bytes") is not None and same["non-private"].get("peak_bytes"):
                row["peak_vs_nonprivate"] = row["peak_bytes"] / same["non-private"]["peak_bytes"]
        if "opacus" in same:
            row["opacus_over_this"] = same["opacus"]["min_s"] / row["min_s"]
        opacus = [same[v]["min_s"] for v in ("opacus", "opacus-ghost") if v in same]
        if opacus:
            row["opacus_best_over_this"] = min(opacus) / row["min_s"]


def format_markdown(rows: Sequence[dict]) -> str:
    """Rows of :func:`compare_family` as a Markdown table."""
    from privfast.reports import table

    header = [
        "family",
        "K",
        "variant",
        "min ms",
        "median ms",
        "x non-private",
        "x non-private, paired",
        "fastest Opacus / this",
        "peak MB",
        "peak / non-private",
    ]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["family"], r["k"], r["variant"], f"n/a: {r['error']}", *[""] * 6])
            continue
        peak = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.1f}"
        body.append(
            [
                r["family"],
                r["k"],
                r["variant"],
                f"{1e3 * r['min_s']:.1f}",
                f"{1e3 * r['median_s']:.1f}",
                _ratio(r.get("vs_nonprivate")),
                _ratio(r.get("paired_vs_nonprivate")),
                _ratio(r.get("opacus_best_over_this")),
                peak,
                _ratio(r.get("peak_vs_nonprivate")),
            ]
        )
    return table(header, body, markdown=True, align="lrl" + "r" * 7)


PHASES = ("forward", "backward", "clip", "noise", "update")
"""A step's phases in :func:`phase_times`: the forward pass and loss (with the engine's capture hooks), the
backward pass (per-example gradients built there where planned), the norms, clipping and sum
(``clipped_sum``), the noise (``add_noise``) and the optimizer's update."""


def _paired(name: str, *, augmult: int, mode: str, seed: int) -> tuple:
    """``(x, y, plain, sgd, private, dp)``: a family's batch, its model with plain SGD, and the same initial
    model wrapped for privfast's private step in ``mode`` (sigma 1, C 1)."""
    family = _family(name)
    x, y = family.make_batch(augmult, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    plain = family.make_model()
    torch.manual_seed(seed)
    model = family.make_model()
    sgd = torch.optim.SGD(plain.parameters(), lr=0.01)
    private, dp = _privfast(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        mode=mode,
        augmult=augmult,
        examples=x.shape[0] // augmult,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        seed=seed,
    )
    return x, y, plain, sgd, private, dp


def phase_times(name: str, *, augmult: int = 1, mode: str = "auto", rounds: int = 5, seed: int = 0) -> dict:
    """Where the time of a private step goes, phase by phase, beside the non-private step's.

    Both steps run interleaved, round by round, on the family's model and batch (see :data:`FAMILIES`);
    each phase's time is its fastest round (so the phases of one step need not add up to its
    fastest total). The non-private step has no clip and no noise phase.

    Args:
        name: a family of :data:`FAMILIES`.
        augmult: K.
        mode: the private step's per-example gradient mode (``GradSampleModule``'s ``mode``).
        rounds: timed rounds after one untimed warm-up.
        seed: seeds the models (the same initial weights) and the batch.

    Returns:
        ``{"non-private": {phase: seconds}, "privfast-<mode>": {phase: seconds}}`` over :data:`PHASES`.
    """
    if rounds < 1:
        raise ValueError(f"need rounds >= 1, got {rounds}")
    x, y, plain, sgd, private, dp = _paired(name, augmult=augmult, mode=mode, seed=seed)

    def marks(model: nn.Module, zero_grad: Callable[[], None], after: Sequence[Callable[[], object]]) -> list[float]:
        """Clock readings around the forward (with the loss), the backward and each of ``after``."""
        zero_grad()
        clock = [time.perf_counter()]
        loss = _loss(model(x), y)
        clock.append(time.perf_counter())
        loss.backward()
        clock.append(time.perf_counter())
        for part in after:
            part()
            clock.append(time.perf_counter())
        return clock

    runs = {
        "non-private": (lambda: marks(plain, sgd.zero_grad, [sgd.step]), ("forward", "backward", "update")),
        f"privfast-{mode}": (
            lambda: marks(private, dp.zero_grad, [dp.clip_and_accumulate, dp.add_noise, dp.original_optimizer.step]),
            PHASES,
        ),
    }
    best: dict[str, dict[str, float]] = {variant: {} for variant in runs}
    for round_ in range(rounds + 1):
        for variant, (step, phases) in runs.items():
            clock = step()
            if round_ == 0:
                continue  # warm-up: lazy initialization, auto's timing of each layer's strategies
            for phase, start, end in zip(phases, clock, clock[1:]):
                best[variant][phase] = min(best[variant].get(phase, math.inf), end - start)
    return best


def _extra_row(label: str, plain: float, private: float) -> list[str]:
    """A table row: seconds of the non-private and the private step in ms, and the private step's extra."""
    return [label, f"{1e3 * plain:.2f}", f"{1e3 * private:.2f}", f"{1e3 * (private - plain):+.2f}"]


def format_phases(times: Mapping[str, Mapping[str, float]]) -> str:
    """:func:`phase_times`' result as a Markdown table: ms per phase and the private step's extra time."""
    from privfast.reports import table

    (plain, plain_times), (private, private_times) = times.items()
    body = []
    for phase in (*PHASES, "total"):
        a = sum(plain_times.values()) if phase == "total" else plain_times.get(phase, 0.0)
        b = sum(private_times.values()) if phase == "total" else private_times[phase]
        body.append(_extra_row(phase, a, b))
    return table(["phase", f"{plain} ms", f"{private} ms", "extra ms"], body, markdown=True, align="lrrr")


OUTSIDE_OPS = "(outside any op)"
""":func:`op_times`' name for a step's time that no operator accounts for: Python in the model, in the
engine's forward hooks and in the optimizer, between the operators."""


def op_times(name: str, *, augmult: int = 1, mode: str = "auto", rounds: int = 5, seed: int = 0) -> dict:
    """Where a private step's time goes, operator by operator, beside the non-private step's.

    Each step runs under ``torch.profiler`` (CPU activities), the two interleaved round by round on the
    family's model and batch. An operator's time is its self time (without the operators it calls), summed
    over its calls in a step and averaged over the rounds. ``autograd::engine::evaluate_function: <node>``
    entries hold what autograd runs around a node besides its operators: the engine's backward hooks,
    in Python, are there. :data:`OUTSIDE_OPS` is the step's wall time less all self times: Python between
    operators, forward hooks included. The profiler adds a little time to every operator, so the totals are
    above :func:`phase_times`'; the differences between the steps are what this is for.

    Args:
        name: a family of :data:`FAMILIES`.
        augmult: K.
        mode: the private step's per-example gradient mode (``GradSampleModule``'s ``mode``).
        rounds: profiled rounds after one unprofiled warm-up.
        seed: seeds the models (the same initial weights) and the batch.

    Returns:
        ``{"non-private": {op: seconds per step}, "privfast-<mode>": {op: seconds per step}}``, each with the
        key ``"step"`` (wall seconds per step) and :data:`OUTSIDE_OPS`.
    """
    from torch.profiler import ProfilerActivity, profile

    if rounds < 1:
        raise ValueError(f"need rounds >= 1, got {rounds}")
    x, y, plain, sgd, private, dp = _paired(name, augmult=augmult, mode=mode, seed=seed)

    def run(model: nn.Module, optimizer) -> None:
        optimizer.zero_grad()
        _loss(model(x), y).backward()
        optimizer.step()

    steps = {"non-private": lambda: run(plain, sgd), f"privfast-{mode}": lambda: run(private, dp)}
    totals: dict[str, dict[str, float]] = {variant: {} for variant in steps}
    for step in steps.values():
        step()  # warm-up: lazy initialization, auto's timing of each layer's strategies
    for _ in range(rounds):
        for variant, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                step()
                wall = time.perf_counter() - start
            ops = totals[variant]
            for event in prof.key_averages():
                ops[event.key] = ops.get(event.key, 0.0) + event.self_cpu_time_total * 1e-6
            ops["step"] = ops.get("step", 0.0) + wall
    out = {}
    for variant, ops in totals.items():
        per_step = {op: t / rounds for op, t in ops.items()}
        per_step[OUTSIDE_OPS] = per_step["step"] - sum(t for op, t in per_step.items() if op != "step")
        out[variant] = per_step
    return out


def format_op_times(times: Mapping[str, Mapping[str, float]], *, top: int = 15) -> str:
    """:func:`op_times`' result as a Markdown table: the ``top`` operators by the private step's extra time
    (either sign), then the rest summed, :data:`OUTSIDE_OPS` and the whole step."""
    from privfast.reports import table

    (plain, plain_ops), (private, private_ops) = times.items()
    names = (set(plain_ops) | set(private_ops)) - {"step", OUTSIDE_OPS}

    def extra(op: str) -> float:
        return private_ops.get(op, 0.0) - plain_ops.get(op, 0.0)

    ranked = sorted(names, key=lambda op: -abs(extra(op)))
    shown, rest = ranked[:top], ranked[top:]

    body = [_extra_row(op, plain_ops.get(op, 0.0), private_ops.get(op, 0.0)) for op in shown]
    body.append(
        _extra_row(
            f"other operators ({len(rest)})",
            sum(plain_ops.get(op, 0.0) for op in rest),
            sum(private_ops.get(op, 0.0) for op in rest),
        )
    )
    body.append(_extra_row(OUTSIDE_OPS, plain_ops[OUTSIDE_OPS], private_ops[OUTSIDE_OPS]))
    body.append(_extra_row("step", plain_ops["step"], private_ops["step"]))
    return table(["operator", f"{plain} ms", f"{private} ms", "extra ms"], body, markdown=True, align="lrrr")


OP_CATEGORIES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("clip and noise (privfast's ops)", lambda op: op.startswith("privfast::")),
    (
        "matrix products: the weight gradients, per-example or not, Gram matrices, contractions",
        lambda op: op in {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution_backward"},
    ),
    ("joins and copies", lambda op: op in {"aten::cat", "aten::copy_", "aten::stack", "aten::clone"}),
    (
        "Python and autograd around the operators (hooks, rules, planning)",
        lambda op: op == OUTSIDE_OPS or op.startswith("autograd::engine::evaluate_function") or op.startswith("_"),
    ),
    ("the model's other operators", lambda op: True),
)
""":func:`format_op_categories`' categories, each operator in the first whose test it passes. A custom
autograd Function (the engine's ``_Tap``) appears under its own name, which starts with an underscore."""


def format_op_categories(times: Mapping[str, Mapping[str, float]]) -> str:
    """:func:`op_times`' result summed by :data:`OP_CATEGORIES` as a Markdown table (ms per step)."""
    from privfast.reports import table

    (plain, plain_ops), (private, private_ops) = times.items()
    sums = {label: [0.0, 0.0] for label, _ in OP_CATEGORIES}
    for op in (set(plain_ops) | set(private_ops)) - {"step"}:
        label = next(label for label, test in OP_CATEGORIES if test(op))
        sums[label][0] += plain_ops.get(op, 0.0)
        sums[label][1] += private_ops.get(op, 0.0)
    body = [_extra_row(label, a, b) for label, (a, b) in sums.items()]
    body.append(_extra_row("step", plain_ops["step"], private_ops["step"]))
    return table(["category", f"{plain} ms", f"{private} ms", "extra ms"], body, markdown=True, align="lrrr")
