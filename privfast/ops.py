"""privfast's fused ops: typed wrappers over ``torch.ops.privfast.*`` with a pure-torch fallback.

Every op here validates its input, then runs the compiled kernel for the input's device when
the extension provides one, else the pure-torch fallback in :mod:`privfast._torch_ops` (which
gives the same numbers, noise included, only slower).
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from privfast import _torch_ops
from privfast._torch_ops import AugmentParams

__all__ = [
    "AugmentParams",
    "augment_batch",
    "clip_accumulate_noise",
    "draw_augment_params",
    "gradsim",
    "has_extension",
    "per_sample_norms",
    "sample_beta",
]

_BUILD_HINT = "pip install --no-build-isolation -e .   (or: make install)"

try:
    from privfast import _C  # noqa: F401  (loading it registers torch.ops.privfast.*)

    _EXTENSION_ERROR: Optional[str] = None
except ImportError as error:  # not built, or built against another torch
    _EXTENSION_ERROR = (
        "privfast._C is not built"
        if importlib.util.find_spec("privfast._C") is None
        else f"privfast._C failed to load: {error}"
    )

_warned_fallback = False


def has_extension() -> bool:
    """True when the compiled kernels (``privfast._C``) are loaded."""
    return _EXTENSION_ERROR is None


def _warn_fallback_once(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"privfast is running its pure-torch reference ops ({reason}); results are the same "
            f"but slower. Build the kernels with: {_BUILD_HINT}",
            RuntimeWarning,
            stacklevel=3,
        )


def _use_kernel(op_name: str, device: torch.device) -> bool:
    if not has_extension():
        _warn_fallback_once(_EXTENSION_ERROR)
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(f"privfast::{op_name}", key):
        _warn_fallback_once(f"the extension has no {device.type} kernels")
        return False
    return True


if has_extension():

    @torch.library.register_fake("privfast::per_sample_norms")
    def _(grads):
        return grads[0].new_empty(grads[0].shape[0])

    @torch.library.register_fake("privfast::clip_accumulate_noise")
    def _(grads, max_grad_norm, noise_std, scale, seed, offset, check_finite):
        return [g.new_empty(g.shape[1:]) for g in grads]

    @torch.library.register_fake("privfast::gradsim")
    def _(grads, refs, index, per_layer):
        return grads[0].new_empty(grads[0].shape[0])

    @torch.library.register_fake("privfast::augment_batch")
    def _(x, crop_offsets, flips, mix_pairs, mix_lambda, extra, padding):
        rows = flips.shape[1] + mix_pairs.shape[1] + (extra.shape[1] if extra is not None else 0)
        return x.new_empty(x.shape[0] * rows, *x.shape[1:])


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor_list(tensors: Sequence[Tensor], name: str) -> list[Tensor]:
    tensors = list(tensors) if not isinstance(tensors, Tensor) else [tensors]
    if not tensors:
        raise ValueError(f"{name} is empty: expected a list of tensors [B, *shape_i]")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}[{i}] is a {type(t).__name__}, expected a tensor [B, *shape_i]")
        if t.dim() < 1:
            raise ValueError(f"{name}[{i}] is a scalar; expected a leading batch dimension [B, *shape_i]")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}[{i}] has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
        if t.dtype != first.dtype:
            raise ValueError(f"{name}[{i}] has dtype {t.dtype} but {name}[0] has {first.dtype}; use one dtype")
        if t.device != first.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {first.device}; use one device")
        if t.shape[0] != first.shape[0]:
            raise ValueError(
                f"{name}[{i}] has batch size {t.shape[0]} but {name}[0] has {first.shape[0]}; "
                "every tensor must hold the same examples along dimension 0"
            )
    return tensors


def non_finite_error(
    subject: str, detail: str = "", consequence: str = "clipping them would give a wrong update"
) -> ValueError:
    """The one error for non-finite (NaN or inf) per-example gradients, worded as the kernels word it.

    Args:
        subject: whose gradients, ending in a verb, e.g. "grads has".
        detail: which examples, e.g. " for examples [3], first in grads[0]".
        consequence: what using them would do.
    """
    return ValueError(
        f"{subject} non-finite values (NaN or inf){detail}; {consequence}. Check the loss and learning rate."
    )


def check_finite_norms(norms: Tensor, grads: Optional[Sequence[Tensor]] = None, *, name: str = "grads") -> None:
    """Raise :func:`non_finite_error` if some example's norm is not finite (one host sync).

    Args:
        norms: per-example norms ``[B]``; one is non-finite exactly when its example's gradient is.
        grads: the per-example gradients ``grads[i] [B, *shape_i]``, to name the first bad tensor; optional.
        name: how the error calls the gradients.
    """
    bad = (~torch.isfinite(norms)).nonzero().flatten()
    if bad.numel() == 0:
        return
    shown = ", ".join(str(b) for b in bad[:10].tolist())
    more = f" and {bad.numel() - 10} more" if bad.numel() > 10 else ""
    where = ""
    if grads is not None:
        first = int(bad[0])
        where = f", first in {name}[{next(i for i, g in enumerate(grads) if not torch.isfinite(g[first]).all())}]"
    raise non_finite_error(f"{name} has", f" for examples [{shown}{more}]{where}")


# ----------------------------------------------------------------------------------------
# Noise keys
# ----------------------------------------------------------------------------------------

# Keeps privfast's counters apart from torch's own Philox draws under the same CUDA seed.
_PRIVFAST_KEY_TAG = int.from_bytes(b"privfast", "little")


def _noise_key(generator: Optional[torch.Generator], counters: int, secure_mode: bool) -> tuple[int, int]:
    """(seed, offset) of the next noise draw, advancing ``generator`` past it.

    A CUDA generator (Philox-based) hands out its seed and offset, and the offset moves on by the
    counters used, as torch's own kernels do. A CPU generator has no offset, so a fresh 64-bit key
    is drawn from its stream instead. Either way, re-seeding reproduces the noise and successive
    calls never share it. ``secure_mode`` ignores the generator and keys every call from the
    operating system's entropy.
    """
    if secure_mode:
        return int.from_bytes(os.urandom(8), "little"), int.from_bytes(os.urandom(8), "little")
    generator = generator if generator is not None else torch.default_generator
    if generator.device.type == "cpu":
        words = torch.randint(0, 2**32, (2,), generator=generator, dtype=torch.int64).tolist()
        return words[0] | (words[1] << 32), 0
    offset = generator.get_offset()
    generator.set_offset(offset + 4 * math.ceil(counters / 4))  # CUDA generators want multiples of 4
    return generator.initial_seed() ^ _PRIVFAST_KEY_TAG, offset


def _as_int64(value: int) -> int:
    """Two's-complement view of a 64-bit unsigned key, as an op schema's ``int`` takes it."""
    return value - (1 << 64) if value >= (1 << 63) else value


# ----------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------


def per_sample_norms(grads: Sequence[Tensor]) -> Tensor:
    """Per-example L2 norm over all parameter tensors, in one fused pass.

    Args:
        grads: per-example gradients, ``grads[i]`` of shape ``[B, *shape_i]``.

    Returns:
        ``[B]``: ``sqrt(sum_i ||grads[i][b]||^2)``, in the input dtype (accumulated in float32 or float64).
    """
    grads = _check_tensor_list(grads, "grads")
    if _use_kernel("per_sample_norms", grads[0].device):
        return torch.ops.privfast.per_sample_norms(grads)
    return _torch_ops.per_sample_norms(grads)


def clip_accumulate_noise(
    grads: Sequence[Tensor],
    max_grad_norm: float,
    noise_std: float = 0.0,
    scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    *,
    secure_mode: bool = False,
    check_finite: bool = True,
) -> list[Tensor]:
    """Clip every example to ``max_grad_norm``, sum, add Gaussian noise and scale: the DP-SGD step.

    ``out_i = scale * (sum_b min(1, C / (n_b + 1e-6)) * grads[i][b] + noise_std * z_i)`` with
    ``n_b`` the per-example norm over all tensors and ``z ~ N(0, I)`` drawn in-kernel from a
    counter-based generator (Philox4x32-10 + Box-Muller), never materialized. The same key gives
    the same noise on CPU and CUDA. For DP-SGD use ``noise_std = sigma * C`` and
    ``scale = 1 / expected_batch_size``.

    Args:
        grads: per-example gradients, ``grads[i]`` of shape ``[B, *shape_i]``; B may be 0.
        max_grad_norm: the clipping bound C > 0 (``inf`` disables clipping).
        noise_std: standard deviation of the noise added to the sum, >= 0.
        scale: multiplies the noisy sum.
        generator: source of the noise key (any device; default: torch's default CPU generator).
        secure_mode: key the noise from the operating system's entropy instead of ``generator``.
        check_finite: raise on a non-finite gradient (costs one host sync on CUDA).

    Returns:
        ``[out_i]`` with ``out_i`` of shape ``shape_i``, in the input dtype.

    Raises:
        ValueError: on mismatched batch sizes, dtypes or devices, ``max_grad_norm <= 0``,
            ``noise_std < 0``, or (with ``check_finite``) a non-finite gradient.
    """
    grads = _check_tensor_list(grads, "grads")
    if not (max_grad_norm > 0):  # also rejects NaN
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if not (0 <= noise_std < math.inf):
        raise ValueError(f"noise_std must be finite and >= 0, got {noise_std}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    numel = sum(math.prod(g.shape[1:]) for g in grads)
    seed, offset = (0, 0)
    if noise_std > 0:
        seed, offset = _noise_key(generator, _torch_ops.philox_counters(numel), secure_mode)
    if _use_kernel("clip_accumulate_noise", grads[0].device):
        return torch.ops.privfast.clip_accumulate_noise(
            grads,
            float(max_grad_norm),
            float(noise_std),
            float(scale),
            _as_int64(seed),
            _as_int64(offset),
            check_finite,
        )
    if check_finite:
        check_finite_norms(_torch_ops.per_sample_norms(grads), grads)
    return _torch_ops.clip_accumulate_noise(grads, max_grad_norm, noise_std, scale, seed, offset)


def gradsim(
    grads: Sequence[Tensor],
    refs: Sequence[Tensor],
    index: Optional[Tensor] = None,
    per_layer: bool = False,
) -> Tensor:
    """Cosine similarity of each example's gradient with a reference gradient (GradSim).

    Args:
        grads: per-example gradients, ``grads[i]`` of shape ``[N, *shape_i]``.
        refs: reference gradients, ``refs[i]`` of shape ``[M, *shape_i]``.
        index: int64 ``[N]`` in ``[0, M)``, the reference of each example. Default: ``arange(N)``
            when M == N, zeros when M == 1.
        per_layer: ``False`` gives one cosine over the concatenation of all tensors (the
            inverting-gradients objective); ``True`` the mean of per-tensor cosines (ATS's S_pri).

    Returns:
        ``[N]`` cosines in the input dtype; a zero gradient has cosine 0.
    """
    grads = _check_tensor_list(grads, "grads")
    refs = _check_tensor_list(refs, "refs")
    if len(grads) != len(refs):
        raise ValueError(f"grads has {len(grads)} tensors but refs has {len(refs)}; they must pair up")
    for i, (g, r) in enumerate(zip(grads, refs)):
        if g.shape[1:] != r.shape[1:]:
            raise ValueError(
                f"grads[{i}] is {tuple(g.shape)} but refs[{i}] is {tuple(r.shape)}: shapes past dim 0 differ"
            )
        if r.dtype != g.dtype or r.device != g.device:
            raise ValueError(f"refs[{i}] is {r.dtype} on {r.device} but grads[{i}] is {g.dtype} on {g.device}")
    n, m = grads[0].shape[0], refs[0].shape[0]
    if index is None:
        if m not in (n, 1):
            raise ValueError(f"refs has {m} rows and grads {n}: pass index [N] to say which reference each uses")
        index = (
            torch.arange(n, device=grads[0].device)
            if m == n
            else torch.zeros(n, dtype=torch.int64, device=grads[0].device)
        )
    if index.dtype != torch.int64 or index.shape != (n,):
        raise ValueError(f"index must be int64 of shape [{n}], got {index.dtype} {tuple(index.shape)}")
    index = index.to(grads[0].device)
    if n:
        low, high = torch.stack([index.min(), index.max()]).tolist()  # one host copy
        if low < 0 or high >= m:
            raise ValueError(f"index holds values outside [0, {m}) (min {low}, max {high})")
    if _use_kernel("gradsim", grads[0].device):
        return torch.ops.privfast.gradsim(grads, refs, index, per_layer)
    return _torch_ops.gradsim(grads, refs, index, per_layer)


def _check_augment_ranges(params: AugmentParams, crop_padding: int, base_rows: int) -> None:
    """Raise on crop offsets outside [0, 2 * crop_padding] or mixup pairs outside the base rows (one host copy)."""
    crop, pairs = params.crop_offsets, params.mix_pairs
    bad = torch.stack([((crop < 0) | (crop > 2 * crop_padding)).any(), ((pairs < 0) | (pairs >= base_rows)).any()])
    bad_crop, bad_pair = bad.tolist()
    if bad_crop:
        raise ValueError(f"crop_offsets must lie in [0, 2 * padding] = [0, {2 * crop_padding}]")
    if bad_pair:
        raise ValueError(f"mix_pairs must index the k + k_extra = {base_rows} base rows of an example")


def sample_beta(alpha: float, shape: tuple[int, ...], *, generator: Optional[torch.Generator] = None) -> Tensor:
    """Draws of Beta(alpha, alpha), reproducible from ``generator``.

    torch's Beta takes no generator, so numpy's (fast for every alpha) is keyed from the generator's
    stream, which the draw advances.

    Returns:
        float64 tensor of ``shape`` on the CPU.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=shape))


def draw_augment_params(
    batch: int,
    k: int,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    mixups: int = 0,
    k_extra: int = 0,
    alpha: float = 0.2,
    generator: Optional[torch.Generator] = None,
    device: Union[torch.device, str] = "cpu",
    lambda_dtype: torch.dtype = torch.float32,
) -> AugmentParams:
    """Draw the crops, flips and DP-Mix pairs and weights of one :func:`augment_batch` call.

    Mixup pairs are two distinct rows of the example's ``k + k_extra`` base rows (the same
    row twice when there is only one), with ``lambda ~ Beta(alpha, alpha)``.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * crop_padding + 1, (batch, k, 2), generator=generator, device=gen_device)
    flips = (torch.rand(batch, k, generator=generator, device=gen_device) < 0.5) & flip
    base_rows = k + k_extra
    if mixups and base_rows < 1:
        raise ValueError("mixups need at least one base row: k + k_extra >= 1")
    first = torch.randint(0, max(base_rows, 1), (batch, mixups), generator=generator, device=gen_device)
    shift = torch.randint(1, max(base_rows, 2), (batch, mixups), generator=generator, device=gen_device)
    second = (first + shift) % base_rows if base_rows > 1 else first
    lam = (
        sample_beta(alpha, (batch, mixups), generator=generator)
        if mixups
        else torch.zeros(batch, 0, dtype=torch.float64)
    )
    return AugmentParams(
        offsets.to(device), flips.to(device), torch.stack([first, second], -1).to(device), lam.to(device, lambda_dtype)
    )


def augment_batch(
    x: Tensor,
    k: int,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    mixups: int = 0,
    alpha: float = 0.2,
    extra: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    params: Optional[AugmentParams] = None,
    return_params: bool = False,
) -> Union[Tensor, tuple[Tensor, AugmentParams]]:
    """Self-augmentations and DP-Mix mixups of each example, written in one pass.

    For each example b, the output holds (rows of one example contiguous):
    ``k`` random crops of the reflect-padded image (padding ``crop_padding``), each mirrored
    left-right with probability 1/2 when ``flip``; then the ``k_extra`` rows ``extra[b]`` (public or
    synthetic samples for DP-Mix_Diff); then ``mixups`` mixes ``lam * S[p] + (1 - lam) * S[q]`` of
    two distinct rows of ``S`` (the crops and extras), ``lam ~ Beta(alpha, alpha)``.

    Args:
        x: images ``[B, C, H, W]``.
        k: number of crops per example (K_base).
        crop_padding: reflect padding P before cropping, ``0 <= P < min(H, W)``.
        flip: mirror each crop with probability 1/2.
        mixups: number of mixups per example (K_self).
        alpha: Beta parameter of the mixup weight.
        extra: ``[B, k_extra, C, H, W]`` rows mixed in (DP-Mix_Diff), or None.
        generator: source of the random draws (default: torch's default CPU generator).
        params: draws to use instead of new ones (see :func:`draw_augment_params`).
        return_params: also return the draws, e.g. to mix soft labels alike.

    Returns:
        ``[B * (k + k_extra + mixups), C, H, W]``, and the :class:`AugmentParams` if asked.
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a float tensor [B, C, H, W], got {getattr(x, 'shape', type(x))}")
    batch, channels, height, width = x.shape
    if k < 0 or mixups < 0:
        raise ValueError(f"k and mixups must be >= 0, got k={k}, mixups={mixups}")
    if not 0 <= crop_padding < min(height, width):
        raise ValueError(
            f"crop_padding must be in [0, min(H, W)) = [0, {min(height, width)}) for reflect padding, got "
            f"{crop_padding}"
        )
    if mixups and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    k_extra = 0
    if extra is not None:
        if extra.dim() != 5 or extra.shape[0] != batch or extra.shape[2:] != x.shape[1:]:
            raise ValueError(
                f"extra must be [B={batch}, k_extra, {channels}, {height}, {width}], got {tuple(extra.shape)}"
            )
        if extra.dtype != x.dtype or extra.device != x.device:
            raise ValueError(f"extra is {extra.dtype} on {extra.device} but x is {x.dtype} on {x.device}")
        k_extra = extra.shape[1]
    lambda_dtype = _torch_ops.accumulate_dtype(x.dtype)
    if params is None:
        params = draw_augment_params(
            batch,
            k,
            crop_padding=crop_padding,
            flip=flip,
            mixups=mixups,
            k_extra=k_extra,
            alpha=alpha,
            generator=generator,
            device=x.device,
            lambda_dtype=lambda_dtype,
        )
    else:
        params = AugmentParams(*(t.to(x.device) for t in params))
        params = params._replace(mix_lambda=params.mix_lambda.to(lambda_dtype))
        if params.flips.shape != (batch, k) or params.mix_pairs.shape[:2] != params.mix_lambda.shape:
            raise ValueError("params do not match x and k: expected flips [B, k] and mix_pairs [B, mixups, 2]")
        if x.device.type != "cpu" and batch:  # the CPU op checks itself; on CUDA it only clamps (no sync)
            _check_augment_ranges(params, crop_padding, k + k_extra)
    if _use_kernel("augment_batch", x.device):
        out = torch.ops.privfast.augment_batch(x, *params, extra, crop_padding)
    else:
        out = _torch_ops.augment_batch(x, params, crop_padding, extra)
    return (out, params) if return_params else out
