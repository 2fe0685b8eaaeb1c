"""Tokens per second of one training step of the Secret Sharer's language models (privfast.models
LSTMLanguageModel and TransformerLanguageModel): non-private vs privfast's private step vs Opacus's
hooks vs Opacus's ghost clipping, on the same model, batch and optimizer (SGD).

A step is forward, backward, per-example (per-window) clipping, noise and the update on B windows
of T tokens of the pydoc corpus (its word vocabulary, 2,373 tokens: the output layer is most of the
work, as in any word-level model). Before timing, every variant's update is checked against
privfast's at sigma = 0 (privfast.throughput.check_same_update), so that the times compare the same
computation. The variants run interleaved round by round (privfast.throughput.measure) and each is
reported by its fastest round, the least disturbed on a shared machine.

Run:  python -m pytest benchmarks/bench_language.py --benchmark-only --benchmark-json=bench_language.json
Then: python benchmarks/bench_language.py bench_language.json      (prints the RESULTS.md table)
Environment: PRIVFAST_BENCH_THREADS (default 1: on a shared 2-core machine, two OpenMP threads
that wait for a descheduled peer made a 0.2 s LSTM step take 5 s), PRIVFAST_BENCH_ROUNDS (default 7).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch

from privfast.models import LSTMLanguageModel, TransformerLanguageModel
from privfast.text import load_corpus, windows
from privfast.throughput import check_same_update, measure, training_step

THREADS = int(os.environ.get("PRIVFAST_BENCH_THREADS", "1"))
ROUNDS = int(os.environ.get("PRIVFAST_BENCH_ROUNDS", "7"))
BATCH, LENGTH = 64, 32  # windows per step, tokens per window
VARIANTS = ("non-private", "privfast-auto", "privfast-ghost", "opacus", "opacus-ghost")


def _models(vocab: int) -> dict:
    return {
        "lstm": lambda: LSTMLanguageModel(vocab, embed_dim=128, hidden_size=128, num_layers=2),
        "transformer": lambda: TransformerLanguageModel(vocab, dim=128, heads=4, layers=2, context=LENGTH),
    }


def _batch():
    corpus = load_corpus("pydoc", level="word")
    rows = windows(corpus.train, length=LENGTH)[:BATCH]
    return len(corpus.vocab), rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


@pytest.mark.parametrize("model", ["lstm", "transformer"])
def test_language_model_step(benchmark, model):
    """All variants on one model, interleaved; per-variant tokens/s and ratios go to extra_info."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    vocab, x, y = _batch()
    make = _models(vocab)[model]

    def seeded():
        torch.manual_seed(0)
        return make()

    steps, errors = {}, {}
    for variant in VARIANTS:
        try:
            steps[variant] = training_step(variant, seeded(), x, y)
            steps[variant]()  # a variant that cannot run the model fails here, before anything is timed
        except Exception as error:  # noqa: BLE001 (reported in the table)
            steps.pop(variant, None)
            errors[variant] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    check_same_update(seeded, x, y, augmult=1, variants=list(steps))
    timings = {}

    def run():
        timings.update(measure(steps, rounds=ROUNDS))

    benchmark.pedantic(run, rounds=1, iterations=1)
    tokens = x.numel()
    base = timings["non-private"]["min_s"]
    rows = {
        v: {**t, "tokens_per_s": tokens / t["min_s"], "vs_nonprivate": t["min_s"] / base} for v, t in timings.items()
    }
    for opacus in ("opacus", "opacus-ghost"):
        for row in rows.values():
            if opacus in timings:
                row[f"{opacus}_over_this"] = timings[opacus]["min_s"] / row["min_s"]
    benchmark.extra_info.update(
        model=model, batch=BATCH, length=LENGTH, vocab=vocab, threads=THREADS, rows=rows, errors=errors
    )
    assert {"non-private", "privfast-auto"} <= set(rows)


def _table(path: str) -> str:
    lines = [
        "| model | variant | min step (ms) | median (ms) | tokens/s | x non-private | Opacus hooks / this | "
        "Opacus ghost / this |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for bench in json.load(open(path))["benchmarks"]:
        info = bench["extra_info"]
        for variant, row in info["rows"].items():
            cells = [f"{row[k]:.2f}" if k in row else "-" for k in ("opacus_over_this", "opacus-ghost_over_this")]
            lines.append(
                f"| {info['model']} | {variant} | {1e3 * row['min_s']:.0f} | {1e3 * row['median_s']:.0f} | "
                f"{row['tokens_per_s']:,.0f} | {row['vs_nonprivate']:.2f} | {cells[0]} | {cells[1]} |"
            )
        for variant, error in info["errors"].items():
            lines.append(f"| {info['model']} | {variant} | fails: {error} | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table(sys.argv[1]))
