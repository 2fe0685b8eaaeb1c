"""Pure-torch references of every privfast op: the tests' oracle, used by tests and the self-check only.

These define the answer: the CPU and CUDA kernels and the library's pure-torch fallback
(:mod:`privfast._torch_ops`) are tested against them. They favour clarity over speed (a loop per
example, the formula as written), accept float64 so that the kernels can be checked tightly, and
never call the code they check. The one shared piece is the noise stream,
:func:`privfast._torch_ops.philox_normal`: it must be bit-identical to the kernels' generator, and
Random123's known answers check it on its own.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from privfast._torch_ops import philox_normal

CLIP_EPS = 1e-6
"""Added to the per-example norm before dividing: c_b = min(1, C / (n_b + CLIP_EPS)) (Opacus' value)."""

COSINE_EPS = 1e-12
"""Floor of ||a||*||r|| in a cosine, so that a zero gradient has cosine 0 instead of NaN."""

# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are carried in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat_rows(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).to(accumulate_dtype(t.dtype))


def per_sample_norms(grads: Sequence[Tensor]) -> Tensor:
    """``n_b = sqrt(sum_i ||G_i[b]||^2)``; ``grads[i]`` is ``[B, *shape_i]``; returns ``[B]``."""
    squares = sum(_flat_rows(g).pow(2).sum(dim=1) for g in grads)
    return squares.sqrt().to(grads[0].dtype)


def clip_factors(norms: Tensor, max_grad_norm: float) -> Tensor:
    """``c_b = min(1, C / (n_b + 1e-6))``."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def clip_accumulate_noise(
    grads: Sequence[Tensor], max_grad_norm: float, noise_std: float, scale: float, seed: int, offset: int
) -> list[Tensor]:
    """``out_i = scale * (sum_b c_b G_i[b] + noise_std * z_i)``, ``z`` from :func:`philox_normal`.

    The noise of tensor i is the slice of one stream that starts at the number of elements
    of the tensors before it, so that the list behaves as one flat parameter vector.
    """
    acc_dtype = accumulate_dtype(grads[0].dtype)
    factors = clip_factors(per_sample_norms([g.to(acc_dtype) for g in grads]), max_grad_norm)
    outputs, start = [], 0
    for g in grads:
        n = math.prod(g.shape[1:])
        # Noise first, then the examples in order: the kernels sum in this order too.
        total = (noise_std * philox_normal(seed, offset, n, start)).to(acc_dtype)
        if noise_std == 0.0:
            total.zero_()
        for b in range(g.shape[0]):
            total = total + factors[b] * g[b].reshape(-1).to(acc_dtype)
        outputs.append((scale * total).reshape(g.shape[1:]).to(g.dtype))
        start += n
    return outputs


def gradsim(grads: Sequence[Tensor], refs: Sequence[Tensor], index: Tensor, per_layer: bool) -> Tensor:
    """Cosine between ``grads[:, n]`` and ``refs[:, index[n]]``; returns ``[N]``.

    ``per_layer=False``: one cosine over the concatenation of all tensors.
    ``per_layer=True``: the mean over tensors of each tensor's cosine.
    """
    a = [_flat_rows(g) for g in grads]
    r = [_flat_rows(t)[index] for t in refs]
    dots = torch.stack([(x * y).sum(1) for x, y in zip(a, r)])
    aa = torch.stack([(x * x).sum(1) for x in a])
    rr = torch.stack([(y * y).sum(1) for y in r])
    if per_layer:
        cos = dots / (aa * rr).sqrt().clamp(min=COSINE_EPS)
        return cos.mean(0).to(grads[0].dtype)
    cos = dots.sum(0) / (aa.sum(0) * rr.sum(0)).sqrt().clamp(min=COSINE_EPS)
    return cos.to(grads[0].dtype)


def _reflect_index(i: Tensor, size: int) -> Tensor:
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def augment_batch(x: Tensor, params, padding: int, extra: Optional[Tensor]) -> Tensor:
    """Crops, flips and mixups written as ``[B * (k + k_extra + mixups), C, H, W]``.

    ``params`` is an :class:`privfast.ops.AugmentParams` (read by field name only).

    For example b the rows are: its k crops (row ``i``, column ``j`` of crop kk reads padded pixel
    ``(i + oy, j' + ox)`` with ``j' = W-1-j`` when flipped and the padding reflecting without
    repeating the edge), then ``extra[b]`` as given, then ``lam * S[p] + (1 - lam) * S[q]`` for each
    mixup pair ``(p, q)`` of rows of S = crops followed by extras.
    """
    batch, channels, height, width = x.shape
    k = params.flips.shape[1]
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    crops = []
    for b in range(batch):
        for kk in range(k):
            oy, ox = (int(v) for v in params.crop_offsets[b, kk])
            src_rows = _reflect_index(rows + oy - padding, height)
            src_cols = width - 1 - cols if bool(params.flips[b, kk]) else cols
            src_cols = _reflect_index(src_cols + ox - padding, width)
            crops.append(x[b][:, src_rows][:, :, src_cols])
    per_example = []
    acc_dtype = accumulate_dtype(x.dtype)
    for b in range(batch):
        base = crops[b * k : (b + 1) * k] + (list(extra[b]) if extra is not None else [])
        mixes = []
        for m in range(params.mix_pairs.shape[1]):
            p, q = (int(v) for v in params.mix_pairs[b, m])
            lam = params.mix_lambda[b, m].to(acc_dtype)
            mixes.append((lam * base[p].to(acc_dtype) + (1 - lam) * base[q].to(acc_dtype)).to(x.dtype))
        per_example.extend(base + mixes)
    rows_per_example = k + (extra.shape[1] if extra is not None else 0) + params.mix_pairs.shape[1]
    if not per_example:
        return x.new_zeros(batch * rows_per_example, channels, height, width)
    return torch.stack(per_example)
