"""privfast.ops against the pure-torch references, on every device and float dtype."""

import ast
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import CUDA, DEVICES

import privfast
from privfast import _reference, _torch_ops, ops

needs_extension = pytest.mark.skipif(not privfast.has_extension(), reason="privfast._C is not built")

SHAPES = [(3, 5), (7,), (2, 3, 4), (40000,)]  # the last one spans several kernel segments


def make_grads(batch, dtype, device, *, strided=False, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for shape in shapes:
        if strided:  # every other column of a wider tensor: same values, non-contiguous
            wide = torch.randn(batch, *shape[:-1], 2 * shape[-1], generator=gen, dtype=dtype)
            grads.append(wide[..., ::2].to(device))
        else:
            grads.append(torch.randn(batch, *shape, generator=gen, dtype=dtype).to(device))
    return grads


def as_cpu(tensors):
    return [t.cpu() for t in tensors]


LAYOUTS = [pytest.param(False, id="contiguous"), pytest.param(True, id="strided")]
BATCHES = [0, 1, 7]


# ----------------------------------------------------------------------------------------
# per_sample_norms
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("strided", LAYOUTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_per_sample_norms_matches_reference(device, dtype, tol, strided, batch):
    grads = make_grads(batch, dtype, device, strided=strided)
    if strided and batch:
        assert not grads[0].is_contiguous()
    got = ops.per_sample_norms(grads)
    want = _reference.per_sample_norms(as_cpu(grads))
    assert got.shape == (batch,) and got.dtype == dtype and got.device.type == device.type
    torch.testing.assert_close(got.cpu(), want, rtol=tol[0], atol=tol[1])


def test_per_sample_norms_is_the_norm_of_the_concatenation(device):
    grads = make_grads(5, torch.float64, device)
    flat = torch.cat([g.reshape(5, -1) for g in grads], dim=1)
    torch.testing.assert_close(ops.per_sample_norms(grads), flat.norm(dim=1))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(device, half):
    # 300^2 * 4096 overflows float16 (max 65504) if squares were summed in float16.
    grads = [torch.full((2, 4096), 300.0, dtype=half, device=device)]
    got = ops.per_sample_norms(grads)
    assert got.dtype == half
    torch.testing.assert_close(got.float().cpu(), torch.full((2,), 300.0 * 64), rtol=1e-2, atol=0)
    out = ops.clip_accumulate_noise(grads, 1.0)
    torch.testing.assert_close(out[0].float().cpu(), torch.full((4096,), 2 / 64), rtol=1e-2, atol=1e-4)


def test_zero_size_tensors_in_the_list(device):
    grads = [torch.zeros(3, 0, device=device), torch.ones(3, 4, device=device)]
    torch.testing.assert_close(ops.per_sample_norms(grads).cpu(), torch.full((3,), 2.0))
    out = ops.clip_accumulate_noise(grads, 10.0, noise_std=1.0, generator=torch.Generator().manual_seed(0))
    assert out[0].shape == (0,) and out[1].shape == (4,)


# ----------------------------------------------------------------------------------------
# clip_accumulate_noise
# ----------------------------------------------------------------------------------------


def key_of(seed, numel):
    """The noise key a generator seeded with `seed` hands to the next call drawing `numel` normals."""
    return ops._noise_key(torch.Generator().manual_seed(seed), _torch_ops.philox_counters(numel), False)


@pytest.mark.parametrize("strided", LAYOUTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("noise_std", [0.0, 0.7])
def test_clip_accumulate_noise_matches_reference(device, dtype, tol, strided, batch, noise_std):
    grads = make_grads(batch, dtype, device, strided=strided)
    max_grad_norm, scale = 3.0, 1 / 8
    got = ops.clip_accumulate_noise(grads, max_grad_norm, noise_std, scale, torch.Generator().manual_seed(11))
    numel = sum(math.prod(g.shape[1:]) for g in grads)
    seed, offset = key_of(11, numel)
    want = _reference.clip_accumulate_noise(as_cpu(grads), max_grad_norm, noise_std, scale, seed, offset)
    assert len(got) == len(grads)
    for g, out, ref in zip(grads, got, want):
        assert out.shape == g.shape[1:] and out.dtype == dtype
        torch.testing.assert_close(out.cpu(), ref, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_clip_accumulate_noise_matches_reference(device, half):
    """float16 and bfloat16 sum in a float32 buffer, not in the output: with 7 rows and a 40000-wide
    tensor the kernel takes several row blocks, the noise going in before the first and the output
    written after the last."""
    grads = make_grads(7, half, device)
    got = ops.clip_accumulate_noise(grads, 3.0, 0.7, 1 / 8, torch.Generator().manual_seed(12))
    seed, offset = key_of(12, sum(math.prod(g.shape[1:]) for g in grads))
    want = _reference.clip_accumulate_noise(as_cpu(grads), 3.0, 0.7, 1 / 8, seed, offset)
    for out, ref in zip(got, want):
        assert out.dtype == half
        torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=2e-2, atol=1e-2)


def test_an_infinite_bound_without_the_finite_check_reads_no_norms(device):
    """With no bound every clip factor is 1, so the kernel skips the norms unless it must check them:
    the same bits either way, and a NaN example, refused by the check, makes only its tensor's sum NaN."""
    grads = make_grads(3, torch.float32, device)

    def call(check):
        return ops.clip_accumulate_noise(
            grads, math.inf, 0.5, 0.25, torch.Generator().manual_seed(4), check_finite=check
        )

    assert all(torch.equal(a, b) for a, b in zip(call(True), call(False)))
    grads[1][1, 0] = float("nan")
    with pytest.raises(ValueError):
        call(True)
    unchecked = call(False)
    assert torch.isnan(unchecked[1]).any() and not torch.isnan(unchecked[0]).any()


def test_clip_accumulate_noise_equals_naive_clipping(device):
    """Independent of the reference: clip each example by hand, sum, scale."""
    grads = make_grads(6, torch.float64, device)
    for g in grads:  # one example far below the bound: left unclipped
        g[2] *= 1e-3
    flat = torch.cat([g.reshape(6, -1) for g in grads], dim=1)
    factors = (2.0 / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    assert factors[2] == 1.0 and (factors < 1).sum() >= 4
    want = 0.25 * (factors[:, None] * flat).sum(0)
    got = torch.cat([o.reshape(-1) for o in ops.clip_accumulate_noise(grads, 2.0, 0.0, 0.25)])
    torch.testing.assert_close(got, want)


def test_infinite_bound_adds_noise_to_a_precomputed_sum(device):
    summed = make_grads(1, torch.float64, device)
    out = ops.clip_accumulate_noise(summed, math.inf, 0.0, 1.0)
    for s, o in zip(summed, out):
        torch.testing.assert_close(o, s[0])


@pytest.mark.parametrize("out_dtype", [torch.float64, torch.float32])
def test_noise_is_bit_identical_to_the_reference_generator(device, out_dtype):
    numel = 3001
    seed, offset = key_of(5, numel)
    zero_grads = [
        torch.zeros(0, 1000, dtype=out_dtype, device=device),
        torch.zeros(0, 2001, dtype=out_dtype, device=device),
    ]
    got = ops.clip_accumulate_noise(zero_grads, 1.0, 1.0, 1.0, torch.Generator().manual_seed(5))
    want = _torch_ops.philox_normal(seed, offset, numel).to(out_dtype)
    assert torch.equal(torch.cat([o.cpu() for o in got]), want)


_NARROWER_PATH_CHECK = """
import torch
from privfast import _torch_ops, ops
numel = 5001  # 2501 counters: whole 8- and 16-lane blocks and a tail
zeros = [torch.zeros(0, numel, dtype=torch.float64)]
got = ops.clip_accumulate_noise(zeros, 1.0, 1.0, 1.0, torch.Generator().manual_seed(7))[0]
key = ops._noise_key(torch.Generator().manual_seed(7), _torch_ops.philox_counters(numel), False)
assert torch.equal(got, _torch_ops.philox_normal(*key, numel)), "noise differs from the reference"
"""


@needs_extension
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_every_cpu_philox_path_gives_the_reference_noise(isa):
    # The kernel takes the widest Philox path the CPU has; PRIVFAST_CPU_ISA, read at load, caps it, so
    # that the narrower paths are checked on machines where they would otherwise never run.
    env = {**os.environ, "PRIVFAST_CPU_ISA": isa}
    result = subprocess.run([sys.executable, "-c", _NARROWER_PATH_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@CUDA
def test_noise_and_sums_agree_between_cpu_and_cuda():
    grads = make_grads(9, torch.float32, "cpu")
    cpu = ops.clip_accumulate_noise(grads, 1.0, 1.0, 0.5, torch.Generator().manual_seed(3))
    gpu = ops.clip_accumulate_noise([g.cuda() for g in grads], 1.0, 1.0, 0.5, torch.Generator().manual_seed(3))
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-6)
    zeros = [torch.zeros(0, 100_001, dtype=torch.float64)]
    noise_cpu = ops.clip_accumulate_noise(zeros, 1.0, 1.0, 1.0, torch.Generator().manual_seed(4))[0]
    noise_gpu = ops.clip_accumulate_noise([zeros[0].cuda()], 1.0, 1.0, 1.0, torch.Generator().manual_seed(4))[0]
    assert torch.equal(noise_cpu, noise_gpu.cpu())


@pytest.mark.parametrize("op_name", ["per_sample_norms", "clip_accumulate_noise", "gradsim"])
def test_cpu_results_do_not_depend_on_the_thread_count(op_name):
    grads = make_grads(37, torch.float32, "cpu", shapes=[(70_000,), (3, 5), (9000,)])
    call = {
        "per_sample_norms": lambda: [ops.per_sample_norms(grads)],
        "clip_accumulate_noise": lambda: ops.clip_accumulate_noise(
            grads, 1.0, 1.0, 0.5, torch.Generator().manual_seed(0)
        ),
        "gradsim": lambda: [ops.gradsim(grads, [g[:3] for g in grads], torch.arange(37) % 3, per_layer=True)],
    }[op_name]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call()
        torch.set_num_threads(2)
        two = call()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_philox_matches_random123_known_answers():
    zeros = np.zeros((1, 4), np.uint64)
    ones = np.full((1, 4), 0xFFFFFFFF, np.uint64)
    pi = np.array([[0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]], np.uint64)
    assert _torch_ops.philox4x32_10(zeros, (0, 0))[0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _torch_ops.philox4x32_10(ones, (0xFFFFFFFF,) * 2)[0].tolist() == [
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    ]
    assert _torch_ops.philox4x32_10(pi, (0xA4093822, 0x299F31D0))[0].tolist() == [
        0xD16CFE09,
        0x94FDCCEB,
        0x5001E420,
        0x24126EA1,
    ]


def test_noise_statistics_over_a_million_draws(device):
    zeros = [torch.zeros(0, 1_000_000, dtype=torch.float64, device=device)]
    z = ops.clip_accumulate_noise(zeros, 1.0, 1.0, 1.0, torch.Generator().manual_seed(2024))[0].cpu().numpy()
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1.0) < 0.01
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    assert scipy.stats.normaltest(z).pvalue > 1e-3
    # The tails reach past where a 32-bit uniform would stop (6.66 sigma is the 2^-32 limit).
    assert np.abs(z).max() > 4.0


def test_noise_scales_with_noise_std_and_scale(device):
    zeros = [torch.zeros(0, 200_000, dtype=torch.float64, device=device)]
    z = ops.clip_accumulate_noise(zeros, 1.0, 3.0, 0.5, torch.Generator().manual_seed(1))[0]
    assert abs(z.std().item() - 1.5) < 0.02


def test_same_seed_same_noise_successive_calls_differ(device):
    grads = make_grads(4, torch.float32, device)
    gen = torch.Generator().manual_seed(9)
    first = ops.clip_accumulate_noise(grads, 1.0, 1.0, generator=gen)
    second = ops.clip_accumulate_noise(grads, 1.0, 1.0, generator=gen)
    again = ops.clip_accumulate_noise(grads, 1.0, 1.0, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, second) if a.numel() > 1)


@CUDA
@pytest.mark.cuda
def test_cuda_generator_keys_the_noise_and_moves_on():
    """The branch a model on CUDA takes by default: a CUDA generator keys the noise with its seed
    (tagged) and its Philox offset, and moves the offset past the counters used, so successive
    calls draw fresh noise and re-seeding reproduces it; the key does not depend on where the
    tensors live."""
    numel = 3001
    zeros = [
        torch.zeros(0, 1000, dtype=torch.float64, device="cuda"),
        torch.zeros(0, 2001, dtype=torch.float64, device="cuda"),
    ]

    def draw(gen, tensors=zeros):
        return torch.cat([o.cpu() for o in ops.clip_accumulate_noise(tensors, 1.0, 1.0, 1.0, gen)])

    gen = torch.Generator(device="cuda").manual_seed(7)
    first = draw(gen)
    stride = 4 * math.ceil(_torch_ops.philox_counters(numel) / 4)
    assert gen.get_offset() == stride
    second = draw(gen)
    assert gen.get_offset() == 2 * stride
    key = 7 ^ ops._PRIVFAST_KEY_TAG
    assert torch.equal(first, _torch_ops.philox_normal(key, 0, numel))
    assert torch.equal(second, _torch_ops.philox_normal(key, stride, numel))
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.1
    assert torch.equal(draw(torch.Generator(device="cuda").manual_seed(7)), first)
    assert not torch.equal(draw(torch.Generator(device="cuda").manual_seed(8)), first)
    on_cpu = draw(torch.Generator(device="cuda").manual_seed(7), [z.cpu() for z in zeros])
    assert torch.equal(on_cpu, first)


def test_default_generator_follows_torch_manual_seed():
    grads = make_grads(2, torch.float32, "cpu")
    torch.manual_seed(123)
    first = ops.clip_accumulate_noise(grads, 1.0, 1.0)
    torch.manual_seed(123)
    again = ops.clip_accumulate_noise(grads, 1.0, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_secure_mode_ignores_the_generator_and_never_repeats():
    grads = make_grads(2, torch.float32, "cpu")
    draws = [
        ops.clip_accumulate_noise(grads, 1.0, 1.0, generator=torch.Generator().manual_seed(0), secure_mode=True)
        for _ in range(2)
    ]
    assert not torch.equal(draws[0][3], draws[1][3])


def test_noise_free_calls_leave_the_generator_alone():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    ops.clip_accumulate_noise(make_grads(2, torch.float32, "cpu"), 1.0, 0.0, generator=gen)
    assert torch.equal(gen.get_state(), state)


# ----------------------------------------------------------------------------------------
# gradsim
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("strided", LAYOUTS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("per_layer", [False, True])
def test_gradsim_matches_reference(device, dtype, tol, strided, batch, per_layer):
    grads = make_grads(batch, dtype, device, strided=strided, seed=1)
    refs = make_grads(3, dtype, device, strided=strided, seed=2)
    index = torch.randint(0, 3, (batch,), generator=torch.Generator().manual_seed(0)).to(device)
    got = ops.gradsim(grads, refs, index, per_layer=per_layer)
    want = _reference.gradsim(as_cpu(grads), as_cpu(refs), index.cpu(), per_layer)
    assert got.shape == (batch,) and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, rtol=tol[0], atol=tol[1])


def test_gradsim_cosines_by_hand(device):
    grads = make_grads(4, torch.float64, device, seed=3)
    refs = make_grads(1, torch.float64, device, seed=4)
    whole = torch.cat([g.reshape(4, -1) for g in grads], 1)
    ref = torch.cat([r.reshape(1, -1) for r in refs], 1)
    torch.testing.assert_close(ops.gradsim(grads, refs), torch.nn.functional.cosine_similarity(whole, ref))
    per_tensor = torch.stack(
        [torch.nn.functional.cosine_similarity(g.reshape(4, -1), r.reshape(1, -1)) for g, r in zip(grads, refs)]
    ).mean(0)
    torch.testing.assert_close(ops.gradsim(grads, refs, per_layer=True), per_tensor)
    same = ops.gradsim(grads, [g.clone() for g in grads])
    torch.testing.assert_close(same, torch.ones(4, dtype=torch.float64, device=device))


def test_gradsim_of_a_zero_gradient_is_zero(device):
    grads = [torch.zeros(2, 5, device=device)]
    refs = [torch.ones(2, 5, device=device)]
    assert torch.equal(ops.gradsim(grads, refs).cpu(), torch.zeros(2))


# ----------------------------------------------------------------------------------------
# augment_batch
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("k_extra", [0, 2])
def test_augment_batch_matches_reference(device, dtype, batch, k_extra):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 9, 7, generator=gen, dtype=dtype).to(device)
    x_strided = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, channels-last-like strides
    assert batch == 0 or not x_strided.is_contiguous()
    extra = torch.rand(batch, k_extra, 3, 9, 7, generator=gen, dtype=dtype).to(device) if k_extra else None
    out, params = ops.augment_batch(
        x_strided, 4, crop_padding=3, mixups=3, extra=extra, generator=gen, return_params=True
    )
    want = _reference.augment_batch(
        x.cpu(), type(params)(*(p.cpu() for p in params)), 3, extra.cpu() if extra is not None else None
    )
    assert out.shape == (batch * (4 + k_extra + 3), 3, 9, 7)
    torch.testing.assert_close(out.cpu(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_augment_batch_geometry(device):
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32, device=device).reshape(2, 1, 5, 5)
    # No padding and no flip: every crop is the image itself.
    out = ops.augment_batch(x, 3, crop_padding=0, flip=False)
    assert torch.equal(out.cpu(), x.cpu().repeat_interleave(3, dim=0))
    # Offsets (0, 0) with padding 2 shift the image by 2 with reflection; a flip mirrors the crop.
    params = ops.draw_augment_params(2, 2, crop_padding=2, generator=torch.Generator().manual_seed(0), device=device)
    params = params._replace(
        crop_offsets=torch.zeros_like(params.crop_offsets), flips=torch.tensor([[False, True]] * 2, device=device)
    )
    out = ops.augment_batch(x, 2, crop_padding=2, params=params)
    padded = torch.nn.functional.pad(x.cpu(), (2, 2, 2, 2), mode="reflect")[:, :, :5, :5]
    assert torch.equal(out[0::2].cpu(), padded)
    assert torch.equal(out[1::2].cpu(), padded.flip(-1))


def test_augment_batch_mixups(device):
    x = torch.rand(3, 2, 6, 6, device=device)
    extra = torch.rand(3, 1, 2, 6, 6, device=device)
    out, params = ops.augment_batch(
        x, 2, mixups=4, extra=extra, generator=torch.Generator().manual_seed(1), return_params=True
    )
    rows = out.reshape(3, 7, 2, 6, 6)
    assert torch.equal(rows[:, 2], extra[:, 0])  # extras pass through after the crops
    pairs, lam = params.mix_pairs.cpu(), params.mix_lambda.cpu()
    assert (pairs[..., 0] != pairs[..., 1]).all() and pairs.max() < 3
    assert ((lam >= 0) & (lam <= 1)).all()
    for b in range(3):
        for m in range(4):
            p, q = pairs[b, m].tolist()
            want = lam[b, m] * rows[b, p].cpu() + (1 - lam[b, m]) * rows[b, q].cpu()
            torch.testing.assert_close(rows[b, 3 + m].cpu(), want)


def test_crop_offsets_and_flips_are_uniform():
    params = ops.draw_augment_params(2000, 8, crop_padding=4, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(params.crop_offsets.flatten(), minlength=9).double()
    assert scipy.stats.chisquare(counts.numpy()).pvalue > 1e-3
    assert abs(params.flips.double().mean().item() - 0.5) < 0.01


def test_mixup_weights_follow_beta():
    # float64: in float32, 1.7% of Beta(0.2, 0.2) draws round to exactly 1.0, ties a KS test cannot take.
    params = ops.draw_augment_params(
        5000, 2, mixups=4, alpha=0.2, generator=torch.Generator().manual_seed(0), lambda_dtype=torch.float64
    )
    lam = params.mix_lambda.flatten().double().numpy()
    assert scipy.stats.kstest(lam, scipy.stats.beta(0.2, 0.2).cdf).pvalue > 1e-3


# ----------------------------------------------------------------------------------------
# opcheck: schemas, fake kernels, dispatch
# ----------------------------------------------------------------------------------------


@needs_extension
def test_opcheck(device):
    grads = make_grads(3, torch.float32, device)
    refs = make_grads(2, torch.float32, device, seed=5)
    x = torch.rand(2, 3, 8, 8, device=device)
    params = ops.draw_augment_params(2, 3, mixups=2, generator=torch.Generator().manual_seed(0), device=device)
    index = torch.tensor([0, 1, 1], device=device)
    cases = [
        (torch.ops.privfast.per_sample_norms.default, (grads,)),
        (torch.ops.privfast.clip_accumulate_noise.default, (grads, 1.0, 0.5, 0.25, 7, 3, True)),
        (torch.ops.privfast.gradsim.default, (grads, refs, index, True)),
        (torch.ops.privfast.augment_batch.default, (x, *params, None, 4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("op_name", ["per_sample_norms", "clip_accumulate_noise"])
def test_bad_lists_are_refused_with_the_tensor_named(op_name):
    op = getattr(ops, op_name)
    args = (1.0,) if op_name == "clip_accumulate_noise" else ()
    with pytest.raises(ValueError, match=r"grads\[1\] has batch size 3 but grads\[0\] has 4"):
        op([torch.zeros(4, 2), torch.zeros(3, 2)], *args)
    with pytest.raises(ValueError, match=r"grads\[1\] has dtype torch.float64"):
        op([torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.float64)], *args)
    with pytest.raises(ValueError, match=r"grads\[1\] is on meta"):
        op([torch.zeros(4, 2), torch.zeros(4, 2, device="meta")], *args)
    with pytest.raises(ValueError, match=r"grads\[0\] has dtype torch.int64"):
        op([torch.zeros(4, 2, dtype=torch.int64)], *args)
    with pytest.raises(ValueError, match="empty"):
        op([], *args)


@needs_extension
def test_kernels_refuse_bad_lists_themselves():
    """The compiled ops check too, for callers that skip the Python wrapper."""
    with pytest.raises(ValueError, match=r"grads\[1\] has batch size 3"):
        torch.ops.privfast.per_sample_norms([torch.zeros(4, 2), torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        torch.ops.privfast.clip_accumulate_noise([torch.zeros(4, 2)], 0.0, 0.0, 1.0, 0, 0, True)
    with pytest.raises(ValueError, match=r"index\[0\] = 5 is outside \[0, 4\)"):
        torch.ops.privfast.gradsim([torch.zeros(1, 2)], [torch.zeros(4, 2)], torch.tensor([5]), False)
    x = torch.rand(1, 1, 4, 4)
    p = ops.draw_augment_params(1, 1, crop_padding=1)
    with pytest.raises(ValueError, match="crop_offsets must lie in"):
        torch.ops.privfast.augment_batch(x, p.crop_offsets + 5, p.flips, p.mix_pairs, p.mix_lambda, None, 1)
    p = ops.draw_augment_params(1, 2, crop_padding=1, mixups=1)
    with pytest.raises(ValueError, match="mix_pairs must index the k \\+ k_extra = 2 base rows"):
        torch.ops.privfast.augment_batch(x, p.crop_offsets, p.flips, p.mix_pairs + 2, p.mix_lambda, None, 1)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_clip_bound_must_be_positive(bad):
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        ops.clip_accumulate_noise([torch.zeros(2, 2)], bad)


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan")])
def test_noise_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="noise_std must be finite and >= 0"):
        ops.clip_accumulate_noise([torch.zeros(2, 2)], 1.0, bad)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_gradients_name_the_examples_and_tensor(device, bad_value):
    grads = make_grads(6, torch.float32, device)
    grads[2][4, 1] = bad_value
    grads[2][1, 0] = bad_value
    with pytest.raises(ValueError, match=r"examples \[1, 4\], first in grads\[2\]"):
        ops.clip_accumulate_noise(grads, 1.0, 1.0)


def test_fallback_names_non_finite_examples_as_the_kernel_does(monkeypatch):
    grads = make_grads(12, torch.float64, "cpu")
    grads[1][11, 0] = float("nan")
    for b in range(11):
        grads[2][b].view(-1)[0] = float("inf")
    message = ops.non_finite_error(
        "grads has", " for examples [0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 2 more], first in grads[2]"
    )
    with pytest.raises(ValueError) as kernel:
        ops.clip_accumulate_noise(grads, 1.0, 1.0)
    assert str(kernel.value) == str(message)
    monkeypatch.setattr(ops, "_EXTENSION_ERROR", "simulated: privfast._C not built")
    monkeypatch.setattr(ops, "_warned_fallback", True)
    with pytest.raises(ValueError) as fallback:
        ops.clip_accumulate_noise(grads, 1.0, 1.0)
    assert str(fallback.value) == str(message)


def test_gradsim_bad_input():
    with pytest.raises(ValueError, match="pass index"):
        ops.gradsim([torch.zeros(3, 2)], [torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="outside"):
        ops.gradsim([torch.zeros(3, 2)], [torch.zeros(2, 2)], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="pair up"):
        ops.gradsim([torch.zeros(3, 2)], [torch.zeros(3, 2), torch.zeros(3, 1)])
    with pytest.raises(ValueError, match="shapes past dim 0 differ"):
        ops.gradsim([torch.zeros(3, 2)], [torch.zeros(3, 3)])


def test_augment_batch_bad_input():
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="crop_padding must be in"):
        ops.augment_batch(x, 2, crop_padding=4)
    with pytest.raises(ValueError, match=r"x must be a float tensor \[B, C, H, W\]"):
        ops.augment_batch(x[0], 2, crop_padding=1)
    with pytest.raises(ValueError, match="extra must be"):
        ops.augment_batch(x, 2, crop_padding=1, extra=torch.rand(2, 1, 1, 4, 5))
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ops.augment_batch(x, 2, crop_padding=1, mixups=1, alpha=0.0)


# ----------------------------------------------------------------------------------------
# The reference path when the extension is missing
# ----------------------------------------------------------------------------------------


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    grads = make_grads(3, torch.float64, "cpu")
    with_kernels = ops.clip_accumulate_noise(grads, 1.0, 1.0, 0.5, torch.Generator().manual_seed(0))
    monkeypatch.setattr(ops, "_EXTENSION_ERROR", "simulated: privfast._C not built")
    monkeypatch.setattr(ops, "_warned_fallback", False)
    assert not privfast.has_extension()
    with pytest.warns(RuntimeWarning, match="pip install --no-build-isolation"):
        fallback = ops.clip_accumulate_noise(grads, 1.0, 1.0, 0.5, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        ops.per_sample_norms(grads)
    for a, b in zip(with_kernels, fallback):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_only_the_self_check_imports_the_oracle():
    """privfast._reference is the tests' oracle: the library must not compute with it (the self-check compares)."""
    package = Path(privfast.__file__).parent
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n == "privfast._reference" for n in names):
                importers.add(path.relative_to(package).as_posix())
    assert importers == {"selfcheck.py"}


@pytest.mark.parametrize("batch", BATCHES)
def test_fallback_matches_reference(monkeypatch, device, dtype, tol, batch):
    """Without the extension every op runs privfast._torch_ops (vectorized), checked against the loop-by-loop oracle."""
    monkeypatch.setattr(ops, "_EXTENSION_ERROR", "simulated: privfast._C not built")
    monkeypatch.setattr(ops, "_warned_fallback", True)
    grads = make_grads(batch, dtype, device, strided=True)
    refs = make_grads(3, dtype, device, seed=1)
    index = torch.arange(batch, device=device) % 3
    torch.testing.assert_close(
        ops.per_sample_norms(grads).cpu(), _reference.per_sample_norms(as_cpu(grads)), rtol=tol[0], atol=tol[1]
    )
    seed, offset = key_of(0, sum(math.prod(g.shape[1:]) for g in grads))
    got = ops.clip_accumulate_noise(grads, 0.5, 0.7, 0.25, torch.Generator().manual_seed(0))
    want = _reference.clip_accumulate_noise(as_cpu(grads), 0.5, 0.7, 0.25, seed, offset)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=tol[0], atol=tol[1])
    for per_layer in (False, True):
        torch.testing.assert_close(
            ops.gradsim(grads, refs, index, per_layer=per_layer).cpu(),
            _reference.gradsim(as_cpu(grads), as_cpu(refs), index.cpu(), per_layer),
            rtol=tol[0],
            atol=tol[1],
        )
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 9, 7, generator=gen, dtype=dtype).to(device)
    extra = torch.rand(batch, 2, 3, 9, 7, generator=gen, dtype=dtype).to(device)
    out, params = ops.augment_batch(x, 4, crop_padding=3, mixups=3, extra=extra, generator=gen, return_params=True)
    want = _reference.augment_batch(x.cpu(), type(params)(*(p.cpu() for p in params)), 3, extra.cpu())
    torch.testing.assert_close(out.cpu(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_augment_batch_refuses_out_of_range_params_on_every_device(device):
    """The CPU op checks the ranges itself; on CUDA the op only clamps (no host sync per step), so the
    wrapper checks parameters a user passes. Either way a bad draw is an error, not a silent clamp."""
    device = torch.device(device)
    x = torch.rand(1, 1, 4, 4, device=device)
    p = ops.draw_augment_params(1, 2, crop_padding=1, mixups=1)
    with pytest.raises(ValueError, match="crop_offsets must lie in"):
        ops.augment_batch(x, 2, crop_padding=1, mixups=1, params=p._replace(crop_offsets=p.crop_offsets + 5))
    with pytest.raises(ValueError, match="mix_pairs must index the k \\+ k_extra = 2 base rows"):
        ops.augment_batch(x, 2, crop_padding=1, mixups=1, params=p._replace(mix_pairs=p.mix_pairs + 2))
