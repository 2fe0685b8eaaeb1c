"""SelfAug and DPMix: shapes, K, and soft labels mixed exactly like the images."""

import pytest
import torch

from privfast import ops
from privfast.augment import DPMix, SelfAug


def _batch(b=3, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, classes, (b,), generator=g)


def test_self_aug_repeats_one_hot_labels():
    x, y = _batch()
    aug = SelfAug(4, crop_padding=2, num_classes=5)
    out, labels = aug(x, y, generator=torch.Generator().manual_seed(1))
    assert aug.augmult == 4 and out.shape == (12, 2, 8, 8) and labels.shape == (12, 5)
    torch.testing.assert_close(labels, torch.nn.functional.one_hot(y, 5).double().repeat_interleave(4, 0))
    expected = ops.augment_batch(x, 4, crop_padding=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, expected)


def test_dp_mix_labels_follow_the_image_mixups():
    x, y = _batch()
    aug = DPMix(3, 2, alpha=0.4, crop_padding=1, num_classes=5)
    out, labels = aug(x, y, generator=torch.Generator().manual_seed(3))
    assert aug.augmult == 5 and out.shape == (15, 2, 8, 8) and labels.shape == (15, 5)
    params = ops.draw_augment_params(
        3,
        3,
        crop_padding=1,
        mixups=2,
        alpha=0.4,
        generator=torch.Generator().manual_seed(3),
        lambda_dtype=torch.float64,
    )
    rows, soft = out.reshape(3, 5, 2, 8, 8), labels.reshape(3, 5, 5)
    for b in range(3):
        for m in range(2):
            p, q = params.mix_pairs[b, m].tolist()
            lam = params.mix_lambda[b, m]
            torch.testing.assert_close(rows[b, 3 + m], lam * rows[b, p] + (1 - lam) * rows[b, q])
            torch.testing.assert_close(soft[b, 3 + m], lam * soft[b, p] + (1 - lam) * soft[b, q])
    torch.testing.assert_close(labels.sum(1), torch.ones(15, dtype=torch.float64))


def test_dp_mix_diff_draws_labelled_pool_rows():
    x, y = _batch(b=2)
    pool_x = torch.full((4, 2, 8, 8), 0.5, dtype=torch.float64)
    pool_y = torch.full((4,), 4)
    aug = DPMix(2, 3, k_diff=1, pool=(pool_x, pool_y), num_classes=5)
    out, labels = aug(x, y, generator=torch.Generator().manual_seed(0))
    assert aug.augmult == 6 and out.shape == (12, 2, 8, 8)
    rows, soft = out.reshape(2, 6, 2, 8, 8), labels.reshape(2, 6, 5)
    torch.testing.assert_close(rows[:, 2], pool_x[:2])  # the pool row follows the crops
    assert (soft[:, 2].argmax(1) == 4).all()


def test_soft_input_labels_pass_through():
    x, _ = _batch()
    soft = torch.softmax(torch.randn(3, 5, dtype=torch.float64), 1)
    _, labels = SelfAug(2)(x, soft)
    torch.testing.assert_close(labels, soft.repeat_interleave(2, 0))


@pytest.mark.parametrize(
    "make",
    [
        lambda: DPMix(0, 1),
        lambda: DPMix(2, -1),
        lambda: DPMix(2, 2, alpha=0.0),
        lambda: DPMix(2, 2, k_diff=1),
        lambda: DPMix(2, 1, k_diff=1, pool=(torch.rand(3, 1, 4, 4), torch.zeros(2))),
    ],
)
def test_bad_configurations(make):
    with pytest.raises(ValueError):
        make()


def test_class_indices_need_num_classes():
    x, y = _batch()
    with pytest.raises(ValueError, match="num_classes"):
        SelfAug(2)(x, y)
