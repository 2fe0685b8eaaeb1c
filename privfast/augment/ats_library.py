"""The 50-entry transformation library of ATS (Gao et al., CVPR 2021) as batched tensor ops.

Every op takes images ``[N, C, H, W]`` with values in [0, 1] and returns the same shape and range.
The ops follow the PIL functions that AutoAugment's library (and ATS) call, so that a policy found
here means what it means there, but they run on whole batches without PIL:

- enhance ops (contrast, color, brightness, sharpness) blend the image with a degenerate image,
  ``degenerate + factor * (x - degenerate)``, clipped to [0, 1], with ``factor = 1 ± magnitude``;
- affine ops (rotate, translate, shear) resample with PIL's geometry (pixel centres at +0.5,
  nearest neighbour for rotate and translate, bilinear for shear); rotation fills gray (128/255),
  translation and shear fill black;
- histogram ops (autocontrast, equalize, posterize, solarize) act on the 0-255 scale; equalize and
  posterize quantize to 8 bits first, as PIL's uint8 images are.

Continuous ops are not re-quantized to 8 bits afterwards (the gradients an attacker sees are of
float inputs anyway), so they match PIL to within its rounding (1/255).

A policy is a string such as ``"3-1-7"`` (entries 3, 1, 7 applied in that order) or a hybrid
``"3-1-7+43-18-18"``, of which one sub-policy is drawn per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LIBRARY",
    "Policy",
    "Transform",
    "apply_transform",
    "autocontrast",
    "brightness",
    "color",
    "contrast",
    "equalize",
    "invert",
    "posterize",
    "random_policy",
    "rotate",
    "sharpness",
    "shear_y",
    "solarize",
    "translate_x",
    "translate_y",
]

_GRAY_FILL = 128.0 / 255.0
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's RGB -> L conversion


@dataclass(frozen=True)
class Transform:
    """One library entry: an op name and its magnitude (degrees, fraction of the side, factor
    offset, bits or 0-255 threshold, depending on the op; 0 for ops without one)."""

    op: str
    magnitude: float = 0.0


LIBRARY: tuple[Transform, ...] = tuple(
    Transform(op, m)
    for op, m in [
        ("invert", 0),
        ("contrast", 0.3333),
        ("rotate", 6.6667),
        ("translate_x", 0.4532),
        ("sharpness", 0.0556),
        ("sharpness", 0.1667),
        ("shear_y", 0.0667),
        ("translate_y", 0.1007),
        ("autocontrast", 0),
        ("equalize", 0),
        ("shear_y", 0.1667),
        ("posterize", 6),
        ("color", 0.1667),
        ("brightness", 0.2778),
        ("sharpness", 0.5),
        ("brightness", 0.5),
        ("equalize", 0),
        ("equalize", 0),
        ("contrast", 0.3889),
        ("sharpness", 0.2778),
        ("color", 0.2778),
        ("translate_x", 0.2518),
        ("equalize", 0),
        ("autocontrast", 0),
        ("translate_y", 0.1511),
        ("sharpness", 0.3333),
        ("brightness", 0.3333),
        ("color", 0.4444),
        ("solarize", 256),
        ("invert", 0),
        ("equalize", 0),
        ("autocontrast", 0),
        ("equalize", 0),
        ("equalize", 0),
        ("color", 0.2778),
        ("equalize", 0),
        ("autocontrast", 0),
        ("solarize", 142.2222),
        ("brightness", 0.1667),
        ("color", 0),
        ("solarize", 227.5556),
        ("autocontrast", 0),
        ("translate_y", 0.1511),
        ("translate_y", 0.1511),
        ("autocontrast", 0),
        ("solarize", 227.5556),
        ("equalize", 0),
        ("invert", 0),
        ("translate_y", 0.1511),
        ("autocontrast", 0),
    ]
)
"""The 50 entries, indexed as in ATS's policies (magnitudes are AutoAugment's ``linspace`` grid values)."""


# ----------------------------------------------------------------------------------------
# Ops. ``factor``, ``degrees``, ``fraction`` and ``shear`` are floats or per-image tensors [N].
# ----------------------------------------------------------------------------------------

Amount = Union[float, Tensor]


def _per_image(value: Amount, x: Tensor) -> Tensor:
    """``value`` as a ``[N, 1, 1, 1]`` tensor that broadcasts over each image."""
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if value.dim() == 0:
        value = value.expand(x.shape[0])
    if value.shape != (x.shape[0],):
        raise ValueError(f"a per-image amount must be a scalar or [N={x.shape[0]}], got {tuple(value.shape)}")
    return value.view(-1, 1, 1, 1)


def _blend(degenerate: Tensor, x: Tensor, factor: Amount) -> Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)`` clipped to the valid range."""
    return (degenerate + _per_image(factor, x) * (x - degenerate)).clamp(0, 1)


def _grayscale(x: Tensor) -> Tensor:
    """``[N, 1, H, W]`` luma, as PIL's conversion to mode L; a 1-channel image is its own luma."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"color and contrast need 1 or 3 channels (L or RGB), got {x.shape[1]}")
    weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _to_uint8_levels(x: Tensor) -> Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.int64)


def invert(x: Tensor) -> Tensor:
    """``1 - x`` (PIL ``ImageOps.invert``)."""
    return 1 - x


def contrast(x: Tensor, factor: Amount) -> Tensor:
    """Blend with the image's mean gray level (PIL ``ImageEnhance.Contrast``)."""
    return _blend(_grayscale(x).mean((1, 2, 3), keepdim=True).expand_as(x), x, factor)


def color(x: Tensor, factor: Amount) -> Tensor:
    """Blend with the grayscale image (PIL ``ImageEnhance.Color``); the identity on 1 channel."""
    return _blend(_grayscale(x).expand_as(x), x, factor)


def brightness(x: Tensor, factor: Amount) -> Tensor:
    """Blend with black, i.e. ``factor * x`` clipped (PIL ``ImageEnhance.Brightness``)."""
    return _blend(torch.zeros_like(x), x, factor)


def sharpness(x: Tensor, factor: Amount) -> Tensor:
    """Blend with PIL's SMOOTH-filtered image (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13), whose
    one-pixel border PIL leaves unfiltered (PIL ``ImageEnhance.Sharpness``)."""
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(x.shape[1], 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=x.shape[1])
    return _blend(smooth, x, factor)


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel's [min, max] to [0, 1]; a flat channel is left alone (PIL ``ImageOps.autocontrast``)."""
    low = x.amin((2, 3), keepdim=True)
    high = x.amax((2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) / span.clamp_min(torch.finfo(x.dtype).tiny), x)


def equalize(x: Tensor) -> Tensor:
    """Histogram equalization of each channel on 256 levels, with PIL's lookup table
    (``ImageOps.equalize``): ``lut[i] = (step // 2 + #pixels below i) // step`` with
    ``step = (#pixels - #pixels at the top level) // 255``; a channel with ``step == 0``
    (fewer than 255 pixels below its top level, e.g. any 8x8 image) is left alone."""
    n, c, h, w = x.shape
    levels = _to_uint8_levels(x).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, levels, torch.ones_like(levels))
    top_count = hist.gather(1, levels.amax(1, keepdim=True))
    step = (h * w - top_count) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    equalized = lut.gather(1, levels).to(x.dtype) / 255
    return torch.where(step > 0, equalized, levels.to(x.dtype) / 255).view(n, c, h, w)


def posterize(x: Tensor, bits: int) -> Tensor:
    """Keep the ``bits`` high bits of each 8-bit level (PIL ``ImageOps.posterize``)."""
    if not 0 <= bits <= 8:
        raise ValueError(f"posterize bits must be in [0, 8], got {bits}")
    mask = ~(2 ** (8 - int(bits)) - 1)
    return (_to_uint8_levels(x) & mask).to(x.dtype) / 255


def solarize(x: Tensor, threshold: float) -> Tensor:
    """Invert the pixels at or above ``threshold`` (on the 0-255 scale; PIL ``ImageOps.solarize``)."""
    return torch.where(x * 255 >= threshold, 1 - x, x)


def _affine(x: Tensor, matrix: Tensor, *, fill: float, mode: str) -> Tensor:
    """Resample ``x`` with PIL's affine convention.

    ``matrix [N, 6] = (a, b, c, d, e, f)`` maps an output point (X, Y) to the input point
    ``(a X + b Y + c, d X + e Y + f)``, in pixel units with pixel centres at +0.5 (as PIL's
    ``Image.transform``). Points falling outside the image take the value ``fill``.
    """
    _, _, h, w = x.shape
    a, b, c, d, e, f = matrix.unbind(1)
    # The same map in affine_grid's normalized coordinates (u = 2X/W - 1, v = 2Y/H - 1).
    theta = torch.stack(
        [
            torch.stack([a, b * h / w, a + b * h / w + 2 * c / w - 1], 1),
            torch.stack([d * w / h, e, d * w / h + e + 2 * f / h - 1], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # PIL fills the points that fall outside [0, W) x [0, H) and interpolates the others with
    # clamped neighbours, which is border padding plus this mask.
    inside = ((grid >= -1) & (grid < 1)).all(-1).unsqueeze(1)
    sampled = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return torch.where(inside, sampled, torch.as_tensor(fill, dtype=x.dtype, device=x.device))


def _matrix(x: Tensor, **entries: Tensor) -> Tensor:
    """``[N, 6]`` affine matrices: the identity, with the named entries replaced."""
    n = x.shape[0]
    identity = dict(a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0)
    cols = [entries[k].reshape(n) if k in entries else x.new_full((n,), v) for k, v in identity.items()]
    return torch.stack(cols, 1)


def rotate(x: Tensor, degrees: Amount) -> Tensor:
    """Rotate counter-clockwise about the centre, nearest neighbour, gray fill (PIL ``Image.rotate``
    composited over gray, as AutoAugment's ``rotate_with_fill``)."""
    _, _, h, w = x.shape
    theta = torch.deg2rad(_per_image(degrees, x).view(-1))
    cos, sin = theta.cos(), theta.sin()
    cx, cy = w / 2, h / 2
    matrix = _matrix(x, a=cos, b=-sin, c=cx - cos * cx + sin * cy, d=sin, e=cos, f=cy - sin * cx - cos * cy)
    return _affine(x, matrix, fill=_GRAY_FILL, mode="nearest")


def translate_x(x: Tensor, fraction: Amount) -> Tensor:
    """Shift the content left by ``fraction`` of the width (right when negative), black fill."""
    return _affine(x, _matrix(x, c=_per_image(fraction, x) * x.shape[3]), fill=0.0, mode="nearest")


def translate_y(x: Tensor, fraction: Amount) -> Tensor:
    """Shift the content up by ``fraction`` of the height (down when negative), black fill."""
    return _affine(x, _matrix(x, f=_per_image(fraction, x) * x.shape[2]), fill=0.0, mode="nearest")


def shear_y(x: Tensor, shear: Amount) -> Tensor:
    """Vertical shear about the top-left corner, ``Y_in = Y + shear * X``, bilinear, black fill.

    AutoAugment asks PIL for bicubic resampling here; PIL's cubic kernel (a = -0.5) is not
    torch's (a = -0.75), so this uses bilinear, which matches PIL's bilinear exactly."""
    return _affine(x, _matrix(x, d=_per_image(shear, x)), fill=0.0, mode="bilinear")


# Ops whose magnitude takes a random sign per image, and how the signed magnitude enters the op.
_SIGNED = {
    "rotate": (rotate, lambda m: m),
    "translate_x": (translate_x, lambda m: m),
    "translate_y": (translate_y, lambda m: m),
    "shear_y": (shear_y, lambda m: m),
    "contrast": (contrast, lambda m: 1 + m),
    "color": (color, lambda m: 1 + m),
    "brightness": (brightness, lambda m: 1 + m),
    "sharpness": (sharpness, lambda m: 1 + m),
}
_UNSIGNED = {
    "invert": lambda x, m: invert(x),
    "autocontrast": lambda x, m: autocontrast(x),
    "equalize": lambda x, m: equalize(x),
    "posterize": lambda x, m: posterize(x, int(m)),
    "solarize": solarize,
}


def apply_transform(x: Tensor, index: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """Apply library entry ``index`` to every image, drawing one random sign per image for the
    affine and enhance ops.

    Args:
        x: images ``[N, C, H, W]`` in [0, 1].
        index: entry of :data:`LIBRARY`, in ``[0, 50)``.
        generator: source of the random signs.

    Returns:
        ``[N, C, H, W]`` in [0, 1].
    """
    if not 0 <= index < len(LIBRARY):
        raise ValueError(f"transform index must be in [0, {len(LIBRARY)}), got {index}")
    entry = LIBRARY[index]
    if entry.op in _UNSIGNED:
        return _UNSIGNED[entry.op](x, entry.magnitude)
    op, signed_amount = _SIGNED[entry.op]
    sign = torch.randint(0, 2, (x.shape[0],), generator=generator).to(x.device, x.dtype) * 2 - 1
    return op(x, signed_amount(sign * entry.magnitude))


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"images must be a float tensor [N, C, H, W], got {getattr(x, 'shape', type(x))}")
    if x.numel() and (float(x.min()) < -1e-6 or float(x.max()) > 1 + 1e-6):
        raise ValueError(
            f"images must be in [0, 1] (apply a policy before normalizing), got range "
            f"[{float(x.min()):.3g}, {float(x.max()):.3g}]"
        )


class Policy:
    """A transformation policy: one or more sub-policies, each a sequence of library indices.

    ``Policy("3-1-7")`` applies entries 3, 1 and 7 in that order to every image;
    ``Policy("3-1-7+43-18-18")`` (a hybrid) applies one of its sub-policies, drawn uniformly per
    image. ``Policy("")`` is the identity.

    Args:
        spec: a policy string, or a sequence of sub-policies (sequences of ints).
    """

    def __init__(self, spec: Union[str, Sequence[Sequence[int]]]):
        if isinstance(spec, str):
            try:
                spec = [[int(i) for i in part.split("-")] if part.strip() else [] for part in spec.split("+")]
            except ValueError:
                raise ValueError(
                    f"cannot parse policy {spec!r}: expected indices joined by '-', sub-policies joined by "
                    "'+', e.g. '3-1-7' or '3-1-7+43-18-18'"
                ) from None
        self.sub_policies: tuple[tuple[int, ...], ...] = tuple(tuple(int(i) for i in sub) for sub in spec)
        if not self.sub_policies:
            raise ValueError("a policy needs at least one sub-policy (use '' for the identity)")
        for sub in self.sub_policies:
            for i in sub:
                if not 0 <= i < len(LIBRARY):
                    raise ValueError(f"policy {self} uses transform {i}; indices must be in [0, {len(LIBRARY)})")

    def __str__(self) -> str:
        return "+".join("-".join(str(i) for i in sub) for sub in self.sub_policies)

    def __repr__(self) -> str:
        return f"Policy({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Policy) and other.sub_policies == self.sub_policies

    def __hash__(self) -> int:
        return hash(self.sub_policies)

    @property
    def transforms(self) -> frozenset[int]:
        """The library indices this policy uses."""
        return frozenset(i for sub in self.sub_policies for i in sub)

    def __call__(self, x: Tensor, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """Transform a batch.

        Args:
            x: images ``[N, C, H, W]`` in [0, 1] (not yet normalized).
            generator: source of the sub-policy choices and the random signs.

        Returns:
            ``[N, C, H, W]`` in [0, 1].
        """
        _check_images(x)
        if len(self.sub_policies) == 1:
            return self._apply(x, self.sub_policies[0], generator)
        choice = torch.randint(0, len(self.sub_policies), (x.shape[0],), generator=generator).to(x.device)
        out = torch.empty_like(x)
        for k, sub in enumerate(self.sub_policies):  # a loop over sub-policies, each applied to its images at once
            rows = (choice == k).nonzero().flatten()
            if rows.numel():
                out[rows] = self._apply(x[rows], sub, generator)
        return out

    @staticmethod
    def _apply(x: Tensor, sub: tuple[int, ...], generator: Optional[torch.Generator]) -> Tensor:
        for i in sub:
            x = apply_transform(x, i, generator=generator)
        return x


def random_policy(max_len: int = 3, *, generator: Optional[torch.Generator] = None) -> Policy:
    """A random single policy of 1 to ``max_len`` library entries (repeats allowed), as ATS samples."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    length = int(torch.randint(1, max_len + 1, (1,), generator=generator))
    return Policy([torch.randint(0, len(LIBRARY), (length,), generator=generator).tolist()])
