"""The pure-torch side of :mod:`privfast.ops`: the helpers the library shares and the ops' fallback.

:mod:`privfast.ops` runs these ops when the compiled extension (or a device's kernels) is missing,
and the engine shares the clip factor and accumulate dtype with them. They are written for speed
in plain torch (vectorized, no Python loop over examples), and give the kernels' numbers: the same
noise bit for bit, sums equal up to rounding. The test oracle, :mod:`privfast._reference`, is a
separate, loop-by-loop computation; this module never imports it.

The Gaussian noise must be bit-identical to the kernels' counter-based generator, so
:func:`philox_normal` re-implements, operation for operation, the Philox4x32-10 + Box-Muller code
in ``csrc/common/philox.h`` (numpy uint64 for the 32x32->64 products, float64 with no fused
multiply-add for the transcendental part). Random123's known answers check it in the tests.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

CLIP_EPS = 1e-6
"""Added to the per-example norm before dividing: c_b = min(1, C / (n_b + CLIP_EPS)) (Opacus' value)."""

COSINE_EPS = 1e-12
"""Floor of ||a||*||r|| in a cosine, so that a zero gradient has cosine 0 instead of NaN."""


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are carried in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def clip_factors(norms: Tensor, max_grad_norm: float) -> Tensor:
    """``c_b = min(1, C / (n_b + 1e-6))`` for norms ``[B]``; returns ``[B]``."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


class AugmentParams(NamedTuple):
    """The random draws behind one :func:`privfast.ops.augment_batch` call (all on x's device).

    Attributes:
        crop_offsets: int64 ``[B, k, 2]``, the (row, column) of each crop in the padded image, in ``[0, 2P]``.
        flips: bool ``[B, k]``, whether each crop is mirrored left-right.
        mix_pairs: int64 ``[B, mixups, 2]``, indices into the ``k + k_extra`` base rows of the example.
        mix_lambda: ``[B, mixups]`` in the accumulate dtype, weight of the first of the pair.
    """

    crop_offsets: Tensor
    flips: Tensor
    mix_pairs: Tensor
    mix_lambda: Tensor


# ----------------------------------------------------------------------------------------
# Counter-based Gaussian noise: Philox4x32-10 (Salmon et al., SC'11) + Box-Muller.
# ----------------------------------------------------------------------------------------

_MASK32 = np.uint64(0xFFFFFFFF)
_PHILOX_M0 = np.uint64(0xD2511F53)
_PHILOX_M1 = np.uint64(0xCD9E8D57)
_PHILOX_W0 = np.uint64(0x9E3779B9)
_PHILOX_W1 = np.uint64(0xBB67AE85)

NORMALS_PER_COUNTER = 2
"""Each Philox counter yields four 32-bit words, i.e. two 53-bit uniforms, i.e. two normals."""


def philox4x32_10(counter: np.ndarray, key: Sequence[int]) -> np.ndarray:
    """Philox4x32 with 10 rounds.

    Args:
        counter: uint64 array ``[n, 4]`` holding 32-bit words.
        key: two 32-bit words.

    Returns:
        uint64 array ``[n, 4]`` of 32-bit random words.
    """
    c0, c1, c2, c3 = (counter[:, i].astype(np.uint64) for i in range(4))
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for round_index in range(10):
        p0 = _PHILOX_M0 * c0
        p1 = _PHILOX_M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if round_index < 9:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
    return np.stack([c0, c1, c2, c3], axis=1)


def _uniform53(high_word: np.ndarray, low_word: np.ndarray) -> np.ndarray:
    """Integer in [0, 2^53) from 27 bits of one word and 26 of another, as float64."""
    return ((high_word >> np.uint64(5)) * np.uint64(1 << 26) + (low_word >> np.uint64(6))).astype(np.float64)


_SQRT_HALF = math.sqrt(0.5)
_LN2 = math.log(2.0)
_HALF_PI = math.pi / 2
_LOG_SERIES = [1.0 / (2 * i + 1) for i in range(14)]  # atanh series: 1, 1/3, ..., 1/27
_SIN_SERIES = [(-1.0) ** i / math.factorial(2 * i + 1) for i in range(9)]  # x, -x^3/3!, ..., x^17/17!
_COS_SERIES = [(-1.0) ** i / math.factorial(2 * i) for i in range(10)]  # 1, -x^2/2!, ..., x^18/18!


def _horner(x2: np.ndarray, coefficients: Sequence[float]) -> np.ndarray:
    acc = np.full_like(x2, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        acc = acc * x2
        acc = acc + c
    return acc


def _log_unit(u: np.ndarray) -> np.ndarray:
    """log(u) for u in (0, 1], from +,-,*,/ only (so that every device rounds alike)."""
    mantissa, exponent = np.frexp(u)  # u = mantissa * 2^exponent, mantissa in [0.5, 1)
    low = mantissa < _SQRT_HALF
    mantissa = np.where(low, mantissa * 2.0, mantissa)
    exponent = np.where(low, exponent - 1, exponent).astype(np.float64)
    s = (mantissa - 1.0) / (mantissa + 1.0)
    series = _horner(s * s, _LOG_SERIES)
    return exponent * _LN2 + (2.0 * s) * series


def _sincos_two_pi(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sin 2*pi*v, cos 2*pi*v) for v in [0, 1) by quadrant and Taylor series on [-pi/4, pi/4)."""
    v4 = v * 4.0
    quadrant = np.floor(v4)
    x = (v4 - quadrant - 0.5) * _HALF_PI
    x2 = x * x
    sin_x = x * _horner(x2, _SIN_SERIES)
    cos_x = _horner(x2, _COS_SERIES)
    s = (cos_x + sin_x) * _SQRT_HALF  # sin(pi/4 + x)
    c = (cos_x - sin_x) * _SQRT_HALF  # cos(pi/4 + x)
    q = quadrant.astype(np.int64)
    sin_t = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    cos_t = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    return sin_t, cos_t


def philox_normal(seed: int, offset: int, numel: int, start: int = 0) -> Tensor:
    """Standard normals number ``start .. start+numel-1`` of the stream keyed by (seed, offset).

    Element e comes from Philox counter (e // 2, offset) under key seed; lane e % 2 picks the
    cosine or sine half of the Box-Muller pair.

    Returns:
        float64 tensor ``[numel]``.
    """
    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    if numel == 0:
        return torch.zeros(0, dtype=torch.float64)
    elements = np.arange(start, start + numel, dtype=np.uint64)
    groups = elements >> np.uint64(1)
    counter = np.stack(
        [
            groups & _MASK32,
            groups >> np.uint64(32),
            np.full_like(groups, offset & 0xFFFFFFFF),
            np.full_like(groups, offset >> 32),
        ],
        axis=1,
    )
    words = philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))
    u1 = (_uniform53(words[:, 0], words[:, 1]) + 1.0) * 2.0**-53  # (0, 1]
    u2 = _uniform53(words[:, 2], words[:, 3]) * 2.0**-53  # [0, 1)
    radius = np.sqrt(-2.0 * _log_unit(u1))
    sin_t, cos_t = _sincos_two_pi(u2)
    lane_is_cos = (elements & np.uint64(1)) == 0
    return torch.from_numpy(np.where(lane_is_cos, radius * cos_t, radius * sin_t))


def philox_counters(numel: int) -> int:
    """How many Philox counters a call drawing ``numel`` normals consumes."""
    return (numel + NORMALS_PER_COUNTER - 1) // NORMALS_PER_COUNTER


# ----------------------------------------------------------------------------------------
# The ops' fallback
# ----------------------------------------------------------------------------------------


def _rows(t: Tensor) -> Tensor:
    """``[B, *shape]`` as ``[B, prod(shape)]`` in the accumulate dtype."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).to(accumulate_dtype(t.dtype))


def per_sample_norms(grads: Sequence[Tensor]) -> Tensor:
    """``[B]`` norms over all tensors ``grads[i] [B, *shape_i]``, accumulated in float32 or float64."""
    squares = torch.stack([torch.linalg.vector_norm(_rows(g), dim=1).square() for g in grads]).sum(0)
    return squares.sqrt().to(grads[0].dtype)


def clip_accumulate_noise(
    grads: Sequence[Tensor], max_grad_norm: float, noise_std: float, scale: float, seed: int, offset: int
) -> list[Tensor]:
    """``out_i = scale * (sum_b c_b grads[i][b] + noise_std * z_i)``; ``z`` from :func:`philox_normal`.

    The noise of tensor i is the slice of one stream that starts at the number of elements of the
    tensors before it, so that the list behaves as one flat parameter vector.
    """
    acc_dtype = accumulate_dtype(grads[0].dtype)
    factors = clip_factors(per_sample_norms([g.to(acc_dtype) for g in grads]), max_grad_norm)
    sizes = [math.prod(g.shape[1:]) for g in grads]
    noise = None
    if noise_std != 0.0:
        noise = (noise_std * philox_normal(seed, offset, sum(sizes))).to(grads[0].device, acc_dtype).split(sizes)
    outputs = []
    for i, g in enumerate(grads):
        total = factors @ _rows(g)
        if noise is not None:
            total = total + noise[i]
        outputs.append((scale * total).reshape(g.shape[1:]).to(g.dtype))
    return outputs


def gradsim(grads: Sequence[Tensor], refs: Sequence[Tensor], index: Tensor, per_layer: bool) -> Tensor:
    """Cosine of ``grads[:, n]`` with ``refs[:, index[n]]``, over all tensors or averaged per tensor; ``[N]``."""
    a = [_rows(g) for g in grads]
    r = [_rows(t).index_select(0, index) for t in refs]
    dots = torch.stack([torch.linalg.vecdot(x, y) for x, y in zip(a, r)])  # [tensors, N]
    aa = torch.stack([x.square().sum(1) for x in a])
    rr = torch.stack([y.square().sum(1) for y in r])
    if not per_layer:
        dots, aa, rr = dots.sum(0, keepdim=True), aa.sum(0, keepdim=True), rr.sum(0, keepdim=True)
    return (dots / (aa * rr).sqrt().clamp(min=COSINE_EPS)).mean(0).to(grads[0].dtype)


def _reflect(i: Tensor, size: int) -> Tensor:
    """Reflect-without-repeating-the-edge padding: index -1 reads 1, index ``size`` reads ``size - 2``."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def augment_batch(x: Tensor, params: AugmentParams, padding: int, extra: Optional[Tensor]) -> Tensor:
    """Crops, flips and mixups of ``x [B, C, H, W]`` as ``[B * (k + k_extra + mixups), C, H, W]``, by gathers.

    Rows of example b: its k crops (flipped ones read columns right to left, the padding reflects),
    then ``extra[b]``, then ``lam * S[p] + (1 - lam) * S[q]`` for each mixup pair of rows of S.
    """
    batch, channels, height, width = x.shape
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    src_rows = _reflect(rows + params.crop_offsets[..., :1] - padding, height)  # [B, k, H]
    flipped = torch.where(params.flips[..., None], width - 1 - cols, cols)  # [B, k, W]
    src_cols = _reflect(flipped + params.crop_offsets[..., 1:] - padding, width)
    example = torch.arange(batch, device=x.device).view(batch, 1, 1, 1)
    # The advanced indices go first, the sliced channel last: [B, k, H, W, C].
    crops = x[example, :, src_rows[..., :, None], src_cols[..., None, :]].permute(0, 1, 4, 2, 3)
    base = crops if extra is None else torch.cat([crops, extra], 1)  # [B, k + k_extra, C, H, W]
    acc_dtype = accumulate_dtype(x.dtype)
    owner = torch.arange(batch, device=x.device)[:, None]
    first = base[owner, params.mix_pairs[..., 0]].to(acc_dtype)  # [B, mixups, C, H, W]
    second = base[owner, params.mix_pairs[..., 1]].to(acc_dtype)
    lam = params.mix_lambda.to(acc_dtype)[..., None, None, None]
    mixes = (lam * first + (1 - lam) * second).to(x.dtype)
    return torch.cat([base, mixes], 1).reshape(-1, channels, height, width)
