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

import statistics
import time
import warnings
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["VARIANTS", "format_rows", "measure", "run_benchmark", "training_step"]

VARIANTS = ("non-private", "privfast-auto", "privfast-materialize", "privfast-bk", "privfast-ghost", "opacus")
"""What a step can be: plain SGD, privfast's DPOptimizer with a per-example gradient mode, or Opacus's."""


def training_step(variant: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, augmult: int = 1,
                  noise_multiplier: float = 1.0, max_grad_norm: float = 1.0, lr: float = 0.01) -> Callable[[], None]:
    """A closure running one full training step of ``variant`` on the fixed batch ``(x, y)``.

    Args:
        variant: one of :data:`VARIANTS`.
        model: the network (trained in place by the closure).
        x: inputs ``[B*K, ...]``, the K rows of an example contiguous.
        y: int64 labels ``[B*K]``.
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
    if variant == "opacus":
        import opacus

        model = opacus.GradSampleModule(model)
        optimizer = opacus.optimizers.DPOptimizer(optimizer, noise_multiplier=noise_multiplier,
                                                  max_grad_norm=max_grad_norm, expected_batch_size=x.shape[0])
    elif variant.startswith("privfast"):
        from privfast.grad_sample import GradSampleModule
        from privfast.optim import DPOptimizer

        model = GradSampleModule(model, mode=variant.split("-", 1)[1], augmult=augmult)
        optimizer = DPOptimizer(optimizer, module=model, noise_multiplier=noise_multiplier,
                                max_grad_norm=max_grad_norm, expected_batch_size=examples,
                                generator=torch.Generator().manual_seed(0))

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def measure(steps: Mapping[str, Callable[[], None]], *, rounds: int = 5, warmup: int = 1) -> dict[str, dict]:
    """Time several steps interleaved: ``warmup`` untimed calls of each, then ``rounds`` rounds
    that call every step once.

    Args:
        steps: name -> ``step()``.
        rounds: timed calls of each step.
        warmup: untimed calls of each step first (lazy initialization, allocator, first kernel calls).

    Returns:
        name -> ``{"min_s", "median_s", "rounds"}``.
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
    return {name: {"min_s": min(t), "median_s": statistics.median(t), "rounds": rounds} for name, t in times.items()}


def run_benchmark(make_model: Callable[[], nn.Module], input_shape: Sequence[int], *, num_classes: int,
                  batch_size: int = 16, augmults: Iterable[int] = (1, 4), variants: Sequence[str] = VARIANTS,
                  rounds: int = 5, seed: int = 0, progress: bool = True) -> list[dict]:
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
            torch.manual_seed(seed)
            steps[variant] = training_step(variant, make_model(), x, y, augmult=k)
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
    body = [(str(r["k"]), r["variant"], f"{1e3 * r['min_s']:.1f}", f"{1e3 * r['median_s']:.1f}",
             f"{r['examples_per_s']:.0f}", _ratio(r.get("vs_nonprivate")), _ratio(r.get("opacus_over_this")))
            for r in rows]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in (header, *body))


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"
