"""privfast's fused ops against the same computation composed from eager torch ops.

The eager side is written the way Opacus does it (per-tensor norms, stack, clamp, einsum, a
``torch.normal`` noise tensor per parameter). Sizes: B in {64, 256} per-example gradients totalling
1M and 8M float32 elements, spread over 8 tensors shaped like a small CNN's (4 weights, 4 biases).

    python -m pytest benchmarks/bench_ops.py --benchmark-only --benchmark-json=bench_ops.json
    python benchmarks/report.py bench_ops.json
"""

import pytest
import torch
import torch.nn.functional as F

from privfast import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCHES = [64, 256]
TOTALS = {"1M": 1 << 20, "8M": 8 << 20}
# Share of each weight in the parameter count, then the bias widths (a conv/linear stack).
WEIGHT_SHARES = [0.02, 0.28, 0.55, 0.15]
BIASES = [64, 128, 256, 10]


def make_grads(batch, total, device):
    params = total // batch
    weights = [max(1, int(share * (params - sum(BIASES)))) for share in WEIGHT_SHARES]
    gen = torch.Generator().manual_seed(0)
    grads = []
    for w, b in zip(weights, BIASES):
        grads += [torch.randn(batch, w, generator=gen), torch.randn(batch, b, generator=gen)]
    return [g.to(device) for g in grads]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run(benchmark, device, fn, *, bytes_moved, rounds=10):
    """Benchmark fn; record the bytes it must move so the report can give GB/s."""
    benchmark.extra_info["bytes"] = bytes_moved
    benchmark.extra_info["device"] = device

    def call():
        out = fn()
        sync(device)
        return out

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=2, iterations=1)


# ----------------------------------------------------------------------------------------
# The eager compositions
# ----------------------------------------------------------------------------------------


def eager_norms(grads):
    batch = grads[0].shape[0]
    return torch.stack([g.reshape(batch, -1).norm(2, dim=-1) for g in grads], dim=1).norm(2, dim=1)


def eager_clip_accumulate_noise(grads, max_grad_norm, noise_std, scale, generator):
    factors = (max_grad_norm / (eager_norms(grads) + 1e-6)).clamp(max=1.0)
    out = []
    for g in grads:
        summed = torch.einsum("i,i...", factors, g)
        noise = torch.normal(0.0, noise_std, summed.shape, generator=generator, device=summed.device)
        out.append((summed + noise) * scale)
    return out


def eager_gradsim(grads, refs, index):
    rows = grads[0].shape[0]
    cos = [F.cosine_similarity(g.reshape(rows, -1), r[index].reshape(rows, -1), dim=1) for g, r in zip(grads, refs)]
    return torch.stack(cos).mean(0)


def eager_augment(x, params, padding):
    """Crops and flips by one gather from the padded batch, then mixups by indexing: all batched."""
    batch, channels, height, width = x.shape
    k = params.flips.shape[1]
    padded = F.pad(x, (padding,) * 4, mode="reflect")
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    oy, ox = params.crop_offsets[..., 0], params.crop_offsets[..., 1]
    src_rows = oy[..., None] + rows  # [B, k, H]
    src_cols = torch.where(params.flips[..., None], width - 1 - cols, cols) + ox[..., None]  # [B, k, W]
    flat = (src_rows[..., :, None] * padded.shape[-1] + src_cols[..., None, :]).reshape(batch, 1, -1)
    crops = padded.reshape(batch, channels, -1).gather(2, flat.expand(-1, channels, -1))
    crops = crops.reshape(batch, channels, k, height, width).transpose(1, 2)
    p, q = params.mix_pairs[..., 0], params.mix_pairs[..., 1]
    gather = lambda idx: crops[torch.arange(batch, device=x.device)[:, None], idx]  # noqa: E731
    lam = params.mix_lambda[..., None, None, None]
    mixes = lam * gather(p) + (1 - lam) * gather(q)
    return torch.cat([crops, mixes], dim=1).reshape(-1, channels, height, width)


# ----------------------------------------------------------------------------------------
# Benchmarks: one group per (op, device, size), fused and eager side by side
# ----------------------------------------------------------------------------------------

CASES = [(d, b, t) for d in DEVICES for b in BATCHES for t in TOTALS]
IDS = [f"{d}-B{b}-{t}" for d, b, t in CASES]


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("device,batch,total", CASES, ids=IDS)
def test_clip_accumulate_noise(benchmark, impl, device, batch, total):
    grads = make_grads(batch, TOTALS[total], device)
    benchmark.group = f"clip_accumulate_noise {device} B={batch} {total}"
    gen = torch.Generator(device=device).manual_seed(0)
    if impl == "fused":
        fn = lambda: ops.clip_accumulate_noise(grads, 1.0, 1.0, 1 / batch, gen)  # noqa: E731
    else:
        fn = lambda: eager_clip_accumulate_noise(grads, 1.0, 1.0, 1 / batch, gen)  # noqa: E731
    run(benchmark, device, fn, bytes_moved=2 * 4 * TOTALS[total])


# Large per-example rows (a 1M-parameter model: 4 MB a row): a thread's share of a row no longer fits its L2
# between the norm pass and the accumulate pass. "one read" is a single pass over the same gradients
# (per_sample_norms), the floor the fused op is compared with; sigma = 0 leaves the noise out.
LARGE = [(d, b) for d in DEVICES for b in (64, 256)]


@pytest.mark.parametrize("impl", ["fused", "fused-sigma0", "eager", "one read"])
@pytest.mark.parametrize("device,batch", LARGE, ids=[f"{d}-B{b}" for d, b in LARGE])
def test_clip_large_rows(benchmark, impl, device, batch):
    per_row = 1 << 20
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(batch, n, generator=gen).to(device) for n in (per_row // 2, per_row // 4, per_row // 4)]
    benchmark.group = f"clip_accumulate_noise {device} B={batch} 4 MB rows"
    noise = torch.Generator(device=device).manual_seed(0)
    fn = {
        "fused": lambda: ops.clip_accumulate_noise(grads, 1.0, 1.0, 1 / batch, noise),
        "fused-sigma0": lambda: ops.clip_accumulate_noise(grads, 1.0, 0.0, 1 / batch),
        "eager": lambda: eager_clip_accumulate_noise(grads, 1.0, 1.0, 1 / batch, noise),
        "one read": lambda: ops.per_sample_norms(grads),
    }[impl]
    run(benchmark, device, fn, bytes_moved=4 * batch * per_row, rounds=5)


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("device,batch,total", CASES, ids=IDS)
def test_per_sample_norms(benchmark, impl, device, batch, total):
    grads = make_grads(batch, TOTALS[total], device)
    benchmark.group = f"per_sample_norms {device} B={batch} {total}"
    fn = (lambda: ops.per_sample_norms(grads)) if impl == "fused" else (lambda: eager_norms(grads))
    run(benchmark, device, fn, bytes_moved=4 * TOTALS[total])


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("device,batch,total", CASES, ids=IDS)
def test_gradsim(benchmark, impl, device, batch, total):
    grads = make_grads(batch, TOTALS[total], device)
    refs = [g[:8].clone() for g in grads]
    index = torch.arange(batch, device=device) % 8
    benchmark.group = f"gradsim {device} B={batch} {total}"
    if impl == "fused":
        fn = lambda: ops.gradsim(grads, refs, index, per_layer=True)  # noqa: E731
    else:
        fn = lambda: eager_gradsim(grads, refs, index)  # noqa: E731
    run(benchmark, device, fn, bytes_moved=2 * 4 * TOTALS[total])


@pytest.mark.parametrize("impl", ["fused", "eager"])
@pytest.mark.parametrize("device,batch", [(d, b) for d in DEVICES for b in BATCHES], ids=lambda v: str(v))
def test_augment_batch(benchmark, impl, device, batch):
    k, mixups = 8, 8
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    params = ops.draw_augment_params(batch, k, mixups=mixups, generator=torch.Generator().manual_seed(1), device=device)
    benchmark.group = f"augment_batch {device} B={batch} K={k}+{mixups}"
    if impl == "fused":
        fn = lambda: ops.augment_batch(x, k, params=params)  # noqa: E731
    else:
        fn = lambda: eager_augment(x, params, 4)  # noqa: E731
    run(benchmark, device, fn, bytes_moved=4 * x.numel() * (k + mixups + 1))


def test_eager_augment_is_the_same_computation():
    """The eager composition must compute what the op does, or the comparison means nothing."""
    x = torch.rand(5, 3, 8, 8)
    params = ops.draw_augment_params(5, 3, mixups=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(eager_augment(x, params, 4), ops.augment_batch(x, 3, params=params))


def test_eager_clip_is_the_same_computation():
    grads = make_grads(8, 1 << 12, "cpu")
    want = eager_clip_accumulate_noise(grads, 1.0, 0.0, 0.5, None)
    for a, b in zip(ops.clip_accumulate_noise(grads, 1.0, 0.0, 0.5), want):
        torch.testing.assert_close(a, b)
