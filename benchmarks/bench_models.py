"""The comparison behind the README's performance claims: one private training step on every model family
(GroupNorm CNN, WRN-16-4, an LSTM language model, a causal transformer) against non-private training,
Opacus's hooks (the batch expanded by K for K > 1) and Opacus's ghost clipping, with privfast in every
mode. Each case first checks, at sigma = 0, that the variants compute the same update.

Run:  make bench     (or: python -m pytest benchmarks/bench_models.py --benchmark-only)
The table is printed at the end and written to benchmarks/results-models.json (see benchmarks/conftest.py).
PRIVFAST_BENCH_QUICK=1: one timed round, no memory measurement (the CI smoke run).
"""

from __future__ import annotations

import os

import pytest
import torch

from privfast.throughput import FAMILIES, compare_family

QUICK = os.environ.get("PRIVFAST_BENCH_QUICK", "0") == "1"
THREADS = int(os.environ.get("PRIVFAST_BENCH_THREADS", "2"))
CASES = [pytest.param(name, k, id=f"{name}-k{k}") for name, family in FAMILIES.items() for k in family.augmults]


@pytest.mark.parametrize("family,k", CASES)
def test_private_step(benchmark, family, k, model_rows):
    """Every variant on one family and K, interleaved round by round (see privfast.throughput.measure);
    pytest-benchmark times the whole comparison, the per-variant figures go to extra_info."""
    torch.set_num_threads(THREADS)
    rows = []

    def run():
        rows[:] = compare_family(family, augmults=[k], rounds=1 if QUICK else 5, memory=not QUICK, progress=False)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(rows=rows, threads=THREADS)
    model_rows.extend(rows)
    timed = [r for r in rows if "min_s" in r]
    assert {"non-private", "privfast-auto"} <= {r["variant"] for r in timed}
