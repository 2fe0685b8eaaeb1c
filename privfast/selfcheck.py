"""A short self-check: every op on CPU (and CUDA when present) against its reference, with timings.

Run with ``python -m privfast.selfcheck``. Exits non-zero if a kernel disagrees with its reference.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable

import torch

import privfast
from privfast import _reference, _torch_ops, ops


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def _max_diff(got, want) -> float:
    got = got if isinstance(got, (list, tuple)) else [got]
    want = want if isinstance(want, (list, tuple)) else [want]
    return max((a.cpu().double() - b.double()).abs().max().item() if a.numel() else 0.0 for a, b in zip(got, want))


def _cases(device: torch.device):
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 3, 3), (64,), (128, 64, 3, 3), (128,), (10, 2048), (10,)]
    grads = [torch.randn(64, *s, generator=gen).to(device) for s in shapes]
    cpu_grads = [g.cpu() for g in grads]
    refs = [g[:8].clone() for g in grads]
    index = torch.arange(64, device=device) % 8
    images = torch.rand(64, 3, 32, 32, generator=gen).to(device)
    numel = sum(math.prod(g.shape[1:]) for g in grads)
    seed, offset = ops._noise_key(torch.Generator().manual_seed(1), _torch_ops.philox_counters(numel), False)
    aug_params = ops.draw_augment_params(64, 4, mixups=4, generator=gen, device=device)
    cpu_params = type(aug_params)(*(p.cpu() for p in aug_params))
    yield (
        "per_sample_norms",
        lambda: ops.per_sample_norms(grads),
        lambda: _reference.per_sample_norms(cpu_grads),
        1e-4,
    )
    yield (
        "clip_accumulate_noise",
        lambda: ops.clip_accumulate_noise(grads, 1.0, 1.0, 1 / 64, torch.Generator().manual_seed(1)),
        lambda: _reference.clip_accumulate_noise(cpu_grads, 1.0, 1.0, 1 / 64, seed, offset),
        1e-5,
    )
    yield (
        "gradsim",
        lambda: ops.gradsim(grads, [r.to(device) for r in refs], index, per_layer=True),
        lambda: _reference.gradsim(cpu_grads, [r.cpu() for r in refs], index.cpu(), True),
        1e-5,
    )
    yield (
        "augment_batch",
        lambda: ops.augment_batch(images, 4, mixups=4, params=aug_params),
        lambda: _reference.augment_batch(images.cpu(), cpu_params, 4, None),
        1e-5,
    )


def main() -> int:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(
        f"privfast {privfast.__version__}, torch {torch.__version__}, compiled kernels: "
        f"{'yes' if privfast.has_extension() else 'NO (reference path)'}, "
        f"devices: {', '.join(d.type for d in devices)}, threads: {torch.get_num_threads()}"
    )
    print(f"{'op':<24}{'device':<8}{'kernel ms':>11}{'reference ms':>14}{'max |diff|':>12}  ok")
    failures = 0
    for device in devices:
        for name, kernel, reference, tolerance in _cases(device):
            diff = _max_diff(kernel(), reference())
            ok = diff <= tolerance
            failures += not ok
            print(
                f"{name:<24}{device.type:<8}{_time_ms(kernel, device):>11.3f}"
                f"{_time_ms(reference, torch.device('cpu'), repeats=1):>14.1f}{diff:>12.2e}  {'yes' if ok else 'NO'}"
            )
    print("self-check passed" if not failures else f"self-check FAILED: {failures} op(s) disagree with the reference")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
