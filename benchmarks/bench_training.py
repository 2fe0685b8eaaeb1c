"""One DP training step on a B*K augmented batch: privfast (each mode) vs Opacus vs non-private.

Opacus has no augmentation multiplicity, so it runs the way DP-Mix is run on it today: the batch
expanded to B*K rows, each row clipped on its own ([B*K, params] per-example gradients). privfast
folds the K rows of an example into one per-example gradient ([B, params]).

Time: the variants of one K run interleaved, round by round, inside one pytest-benchmark test, so
that a shared machine's changing load hits them alike; the table uses each variant's fastest
round (the least disturbed). Memory: the peak resident memory one step adds (Linux VmHWM, see
``privfast.throughput.peak_bytes``). Both are stored in the benchmark's extra_info.

Run:  python -m pytest benchmarks/bench_training.py --benchmark-only --benchmark-json=bench_training.json
Then: python benchmarks/bench_training.py bench_training.json   (prints the RESULTS.md table)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings

import pytest
import torch

from privfast.throughput import VARIANTS, peak_bytes, training_step

BATCH = 16
# One intra-op thread by default: on a shared 2-core machine, OpenMP threads that wait for a
# descheduled peer turn a 30 ms step into 500 ms at random, which no ratio survives.
THREADS = int(os.environ.get("PRIVFAST_BENCH_THREADS", "1"))
KS = (1, 4, 16)
# Ghost norms need [B, G, (K*T)^2] Gram matrices: at 32x32 positions that is 1 GB at K = 4 and
# 17 GB at K = 16 for one conv layer, so ghost (forced on every layer) runs at K = 1 only;
# auto and bk pick materialized norms for those layers instead.
GHOST_KS = (1,)


def _model():
    from privfast.models import ConvNet

    torch.manual_seed(0)
    return ConvNet(in_channels=3, num_classes=10, width=32, image_size=32, groups=8)


def _batch(k):
    g = torch.Generator().manual_seed(0)
    return torch.rand(BATCH * k, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH * k,), generator=g)


def _runnable(variant: str, k: int) -> bool:
    return variant != "privfast-ghost" or k in GHOST_KS


@pytest.mark.parametrize("k", KS)
def test_training_step(benchmark, k):
    """All variants at one K, interleaved round by round so that the machine's load hits them alike.

    pytest-benchmark times one round (every variant once); each variant's own step times and peak
    memory go to ``extra_info``, from which :func:`_table` computes the ratios.
    """
    warnings.filterwarnings("ignore")
    torch.set_num_threads(THREADS)
    steps = {v: training_step(v, _model(), *_batch(k), augmult=k) for v in VARIANTS if _runnable(v, k)}
    peaks = {}
    for variant, step in steps.items():
        step()  # warm-up: lazy init, allocator, the extension's first call
        peaks[variant] = peak_bytes(step)
    times: dict[str, list[float]] = {v: [] for v in steps}

    def one_round():
        for variant, step in steps.items():
            start = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=8 if k == 16 else 15, iterations=1)  # steps already warm
    benchmark.extra_info.update(
        k=k,
        batch=BATCH,
        threads=THREADS,
        peak_bytes=peaks,
        min_s={v: min(t) for v, t in times.items()},
        median_s={v: statistics.median(t) for v, t in times.items()},
    )


def _table(path: str) -> str:
    """Markdown table of step time (fastest round) and peak memory, as ratios to non-private and Opacus."""
    lines = [
        "| K | variant | min step (ms) | median (ms) | x non-private | Opacus / this | peak MB | peak / non-private |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bench in sorted(json.load(open(path))["benchmarks"], key=lambda b: b["extra_info"]["k"]):
        info = bench["extra_info"]
        fastest, median, peaks = info["min_s"], info["median_s"], info["peak_bytes"]
        for variant in fastest:
            t, peak = fastest[variant], peaks[variant]
            lines.append(
                f"| {info['k']} | {variant} | {1e3 * t:.1f} | {1e3 * median[variant]:.1f} | "
                f"{t / fastest['non-private']:.2f} | {fastest['opacus'] / t:.2f} | {peak / 2**20:.1f} | "
                f"{peak / peaks['non-private']:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(_table(sys.argv[1]))
