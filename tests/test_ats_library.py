"""The ATS transform library: shapes and ranges, each op against its definition, policies."""

import numpy as np
import pytest
import torch

from privfast.augment import ats_library as L


def _images(n=6, c=1, size=8, dtype=torch.float64, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("channels", [1, 3])
def test_every_entry_keeps_shape_range_and_dtype(dtype, channels):
    x = _images(c=channels, dtype=dtype)
    for i in range(len(L.LIBRARY)):
        out = L.apply_transform(x, i, generator=torch.Generator().manual_seed(i))
        assert out.shape == x.shape and out.dtype == dtype, i
        assert float(out.min()) >= 0 and float(out.max()) <= 1, (i, L.LIBRARY[i])


def test_library_has_the_fifty_entries_of_the_reference_table():
    assert len(L.LIBRARY) == 50
    assert L.LIBRARY[3] == L.Transform("translate_x", pytest.approx(150 / 331, abs=1e-4))
    assert L.LIBRARY[2].op == "rotate" and L.LIBRARY[2].magnitude == pytest.approx(6.67, abs=0.01)
    assert L.LIBRARY[40] == L.LIBRARY[45] and L.LIBRARY[40].magnitude == pytest.approx(227.6, abs=0.1)
    assert [L.LIBRARY[i].op for i in (0, 29, 47)] == ["invert"] * 3
    assert L.LIBRARY[11] == L.Transform("posterize", 6)


def test_enhance_ops_blend_with_their_degenerate_image():
    x = torch.tensor([[0.0, 0.2, 0.4], [0.6, 0.8, 1.0], [0.1, 0.3, 0.5]], dtype=torch.float64).view(1, 1, 3, 3)
    mean = x.mean()
    for factor in (0.5, 1.5):
        torch.testing.assert_close(L.contrast(x, factor), (mean + factor * (x - mean)).clamp(0, 1))
        torch.testing.assert_close(L.brightness(x, factor), (factor * x).clamp(0, 1))
        torch.testing.assert_close(L.color(x, factor), x)  # one channel is its own grayscale
    rgb = torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    gray = 0.299 * 0.2 + 0.587 * 0.6 + 0.114 * 1.0
    torch.testing.assert_close(L.color(rgb, 0.5), (gray + 0.5 * (rgb - gray)).clamp(0, 1))
    torch.testing.assert_close(L.contrast(rgb, 0.0), torch.full_like(rgb, gray))


def test_sharpness_blends_with_the_smooth_filter_inside_the_border():
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    x[0, 0, 2, 2] = 1.0
    smooth = torch.zeros_like(x)
    smooth[0, 0, 1:4, 1:4] = 1 / 13
    smooth[0, 0, 2, 2] = 5 / 13
    for factor in (0.0, 0.5, 1.5):
        torch.testing.assert_close(L.sharpness(x, factor), (smooth + factor * (x - smooth)).clamp(0, 1))
    edge = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    edge[0, 0, 0, 0] = 1.0
    assert float(L.sharpness(edge, 0.0)[0, 0, 0, 0]) == 1.0  # the border is not filtered


def test_histogram_ops_match_their_definitions():
    levels = torch.tensor([[10, 50, 90], [130, 170, 210], [250, 30, 70]], dtype=torch.float64).view(1, 1, 3, 3)
    x = levels / 255
    torch.testing.assert_close(L.invert(x), 1 - x)
    torch.testing.assert_close(L.autocontrast(x), (levels - 10) / 240)
    flat = torch.full((1, 1, 3, 3), 0.4, dtype=torch.float64)
    torch.testing.assert_close(L.autocontrast(flat), flat)
    torch.testing.assert_close(L.posterize(x, 6), (levels.long() & 0b11111100).double() / 255)
    torch.testing.assert_close(L.posterize(x, 1), (levels >= 128).double() * 128 / 255)
    torch.testing.assert_close(L.solarize(x, 142.2), torch.where(levels >= 143, 1 - x, x))
    torch.testing.assert_close(L.solarize(x, 256), x)


def _pil_equalize(levels: np.ndarray) -> np.ndarray:
    """PIL's ImageOps.equalize written out for one channel of uint8 levels."""
    hist = np.bincount(levels.ravel(), minlength=256)
    nonzero = hist[hist > 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if len(nonzero) <= 1 or step == 0:
        return levels
    lut, n = [], step // 2
    for i in range(256):
        lut.append(min(n // step, 255))
        n += hist[i]
    return np.array(lut)[levels]


def test_equalize_follows_pils_lookup_table():
    rng = np.random.default_rng(0)
    levels = np.stack([rng.integers(0, 256, (32, 32)), rng.integers(40, 120, (32, 32))])
    x = torch.tensor(levels, dtype=torch.float64).unsqueeze(1) / 255
    expected = np.stack([_pil_equalize(lv) for lv in levels])
    torch.testing.assert_close(L.equalize(x), torch.tensor(expected, dtype=torch.float64).unsqueeze(1) / 255)
    digit = _images(n=2)  # 64 pixels: fewer than 255 below the top level, so PIL leaves it alone
    torch.testing.assert_close(L.equalize(digit), (digit * 255).round() / 255)


def test_affine_ops_follow_pils_geometry():
    x = _images(n=1, size=6)
    torch.testing.assert_close(L.rotate(x, 90.0), torch.rot90(x, 1, dims=(2, 3)))  # counter-clockwise
    rotated = L.rotate(x, 45.0)
    assert float(rotated[0, 0, 0, 0]) == pytest.approx(128 / 255)  # corners fall outside: gray fill
    shifted = L.translate_x(x, 2 / 6)
    torch.testing.assert_close(shifted[..., :4], x[..., 2:])
    assert float(shifted[..., 4:].abs().max()) == 0
    shifted = L.translate_y(x, -1 / 6)
    torch.testing.assert_close(shifted[..., 1:, :], x[..., :-1, :])
    assert float(shifted[..., 0, :].abs().max()) == 0
    # Shear 2 about the top-left corner, pixel centres at +0.5: out[r, c] = in[r + 2c + 1, c], black outside.
    expected = torch.zeros_like(x)
    for r in range(6):
        for c in range(6):
            if r + 2 * c + 1 < 6:
                expected[0, 0, r, c] = x[0, 0, r + 2 * c + 1, c]
    torch.testing.assert_close(L.shear_y(x, 2.0), expected)


def test_per_image_amounts_act_per_image():
    x = _images(n=2, size=6)
    out = L.translate_x(x, torch.tensor([1 / 6, -1 / 6], dtype=torch.float64))
    torch.testing.assert_close(out[0], L.translate_x(x[:1], 1 / 6)[0])
    torch.testing.assert_close(out[1], L.translate_x(x[1:], -1 / 6)[0])
    with pytest.raises(ValueError, match="per-image amount"):
        L.rotate(x, torch.ones(3))


def test_signed_entries_draw_a_sign_per_image():
    x = _images(n=1, size=6).expand(16, 1, 6, 6)
    out = L.apply_transform(x, 3, generator=torch.Generator().manual_seed(0))  # translate_x 0.453
    left, right = L.translate_x(x[:1], 0.4532), L.translate_x(x[:1], -0.4532)
    is_left = (out - left).flatten(1).abs().amax(1) == 0
    is_right = (out - right).flatten(1).abs().amax(1) == 0
    assert bool((is_left ^ is_right).all()) and 0 < int(is_left.sum()) < 16


def test_ops_match_pil_when_it_is_installed():
    """Cross-check with PIL itself (installed with matplotlib); the definitions above stand alone."""
    Image = pytest.importorskip("PIL.Image")
    from PIL import ImageEnhance, ImageOps

    rng = np.random.default_rng(1)
    levels = rng.integers(0, 256, (16, 16)).astype(np.uint8)
    pil = Image.fromarray(levels)
    x = torch.tensor(levels, dtype=torch.float64).view(1, 1, 16, 16) / 255

    def check(ours, theirs, atol=1.01 / 255):
        expected = torch.tensor(np.array(theirs), dtype=torch.float64).view(1, 1, 16, 16) / 255
        torch.testing.assert_close(ours, expected, rtol=0, atol=atol)

    for factor in (0.6, 1.4):
        check(L.contrast(x, factor), ImageEnhance.Contrast(pil).enhance(factor))
        check(L.brightness(x, factor), ImageEnhance.Brightness(pil).enhance(factor))
        check(L.sharpness(x, factor), ImageEnhance.Sharpness(pil).enhance(factor))
    check(L.autocontrast(x), ImageOps.autocontrast(pil))
    check(L.equalize(x), ImageOps.equalize(pil))
    check(L.posterize(x, 6), ImageOps.posterize(pil, 6))
    check(L.solarize(x, 142.2), ImageOps.solarize(pil, 142.2))
    for degrees in (6.67, -6.67):
        rot = pil.convert("RGBA").rotate(degrees)
        check(L.rotate(x, degrees), Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert("L"))
    for t in (0.4532, -0.1007):
        check(L.translate_x(x, t), pil.transform(pil.size, Image.AFFINE, (1, 0, t * 16, 0, 1, 0), fillcolor=0))
        check(L.translate_y(x, t), pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, t * 16), fillcolor=0))
    check(
        L.shear_y(x, 0.1667),
        pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0.1667, 1, 0), Image.BILINEAR, fillcolor=0),
    )


def test_policy_parsing_and_formatting():
    p = L.Policy("3-1-7")
    assert p.sub_policies == ((3, 1, 7),) and str(p) == "3-1-7" and p.transforms == {1, 3, 7}
    h = L.Policy("3-1-7+43-18-18")
    assert h.sub_policies == ((3, 1, 7), (43, 18, 18)) and str(h) == "3-1-7+43-18-18"
    assert L.Policy([[3, 1, 7]]) == p and hash(L.Policy("3-1-7")) == hash(p)
    assert L.Policy("").sub_policies == ((),)
    with pytest.raises(ValueError, match="cannot parse"):
        L.Policy("3-a")
    with pytest.raises(ValueError, match=r"indices must be in \[0, 50\)"):
        L.Policy("3-50")


def test_policy_applies_its_entries_in_order():
    x = _images(n=5)
    out = L.Policy("3-1-7")(x, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    expected = x
    for index in (3, 1, 7):
        expected = L.apply_transform(expected, index, generator=g)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(L.Policy("")(x), x)


def test_hybrid_draws_one_sub_policy_per_image():
    x = _images(n=32)
    out = L.Policy("0+8")(x, generator=torch.Generator().manual_seed(0))  # invert or autocontrast
    inverted = (out - L.invert(x)).flatten(1).abs().amax(1) < 1e-12
    stretched = (out - L.autocontrast(x)).flatten(1).abs().amax(1) < 1e-12
    assert bool((inverted ^ stretched).all()) and 0 < int(inverted.sum()) < 32


def test_policy_rejects_images_outside_the_unit_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        L.Policy("0")(torch.full((1, 1, 4, 4), 2.0))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        L.Policy("0")(torch.rand(4, 4))


def test_random_policy_lengths_and_range():
    g = torch.Generator().manual_seed(0)
    policies = [L.random_policy(3, generator=g) for _ in range(200)]
    lengths = {len(p.sub_policies[0]) for p in policies}
    assert lengths == {1, 2, 3}
    assert all(0 <= i < 50 for p in policies for i in p.transforms)
