"""ATS scores and search: S_pri against a plain loop, S_acc against numpy, the search's selection."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from privfast.augment.ats_library import Policy
from privfast.data import load_digits
from privfast.models import ConvNet, LeNet
from privfast.search import accuracy_score, ats_search, crop_and_flip, describe_policy, privacy_score, search

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    train, _ = load_digits(dtype=torch.float64)
    return train


def _model(seed=0, cls=ConvNet, **kwargs):
    torch.manual_seed(seed)
    return cls(**kwargs).double()


def _loop_privacy_score(model, x_t, y, x0, bins, per_layer):
    """S_pri as the reference code computes it: one image, one point, one backward at a time."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(image, label):
        loss = 0.5 * F.cross_entropy(model(image[None]), label[None])  # ATS's loss; cosines ignore the 0.5
        return [g.flatten() for g in torch.autograd.grad(loss, params)]

    def cosine(a, b):
        if per_layer:
            return sum(float(F.cosine_similarity(u, v, dim=0)) for u, v in zip(a, b)) / len(a)
        return float(F.cosine_similarity(torch.cat(a), torch.cat(b), dim=0))

    scores = []
    for n in range(x_t.shape[0]):
        reference = gradient(x_t[n], y[n])
        curve = [cosine(gradient(i / bins * x_t[n] + (1 - i / bins) * x0[n], y[n]), reference) for i in range(bins + 1)]
        scores.append(sum((curve[i - 1] + curve[i]) / 2 for i in range(1, bins + 1)) / bins)
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("per_layer", [True, False])
def test_privacy_score_equals_the_one_at_a_time_loop(digits, per_layer):
    # LeNet: every parameter has a non-vanishing gradient (a conv bias right before a one-channel
    # GroupNorm group has gradient 0 up to rounding, whose cosine is noise in any implementation).
    model = _model(cls=LeNet, width=6)
    x, y = digits.x[:4], digits.y[:4]
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    mean, std = 0.3, 0.4
    batched = privacy_score(model, x, y, start=start, per_layer=per_layer, mean=mean, std=std, chunk_size=7)
    expected = _loop_privacy_score(model, (x - mean) / std, y, (start - mean) / std, 20, per_layer)
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-5)


def test_privacy_score_applies_the_policy_and_restores_the_mode(digits):
    model = _model(cls=LeNet, width=6)
    model.train()
    x, y = digits.x[:3], digits.y[:3]
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    policy = Policy("0-8")  # invert then autocontrast: no random draw, so the loop sees the same images
    batched = privacy_score(model, x, y, policy=policy, start=start, bins=6)
    assert model.training
    expected = _loop_privacy_score(model, policy(x), y, start, 6, True)
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-5)
    # Chunking only bounds memory.
    torch.testing.assert_close(privacy_score(model, x, y, policy="0-8", start=start, bins=6, chunk_size=1), batched)


def test_privacy_score_checks_its_input(digits):
    model = _model(width=8)
    with pytest.raises(ValueError, match="labels"):
        privacy_score(model, digits.x[:3], digits.y[:2])
    with pytest.raises(ValueError, match="start must have the shape"):
        privacy_score(model, digits.x[:3], digits.y[:3], start=digits.x[:2])
    with pytest.raises(ValueError, match="bins"):
        privacy_score(model, digits.x[:3], digits.y[:3], bins=0)


def _numpy_accuracy_score(model, images):
    """ATS's eval_score on a Jacobian computed image by image."""
    model.eval()
    rows = []
    for image in images:
        image = image[None].clone().requires_grad_(True)
        model(image).sum().backward()
        rows.append(image.grad.flatten().numpy())
    v = np.linalg.eig(np.corrcoef(np.stack(rows)))[0].real
    return -np.sum(np.log(v + 1e-5) + 1.0 / (v + 1e-5))


@pytest.mark.parametrize("policy", [None, "0-8"])
def test_accuracy_score_equals_a_direct_numpy_computation(digits, policy):
    model = _model(seed=3, width=8)
    # One image per label: every batch holds exactly these ten, so the draws do not matter.
    first = torch.stack([torch.nonzero(digits.y == c)[0, 0] for c in range(10)])
    x, y = digits.x[first], digits.y[first]
    images = Policy(policy)(x) if policy else x
    expected = _numpy_accuracy_score(model, images)
    assert accuracy_score(model, x, y, policy=policy, batches=3) == pytest.approx(expected, rel=1e-6)


def test_accuracy_score_draws_one_image_per_label(digits):
    model = _model(seed=3, width=8)
    x, y = digits.x[:300], digits.y[:300]
    a = accuracy_score(model, x, y, batches=4, generator=torch.Generator().manual_seed(0))
    b = accuracy_score(model, x, y, batches=4, generator=torch.Generator().manual_seed(0))
    c = accuracy_score(model, x, y, batches=4, generator=torch.Generator().manual_seed(1))
    assert a == b and a != c and math.isfinite(a)
    with pytest.raises(ValueError, match="two distinct labels"):
        accuracy_score(model, x[y == 0], y[y == 0])


def test_search_filters_ranks_and_builds_a_disjoint_hybrid(digits):
    semi, init = _model(seed=0, cls=LeNet, width=4), _model(seed=1, cls=LeNet, width=4)
    data = (digits.x[:200], digits.y[:200])
    probe = search(
        semi,
        init,
        data,
        candidates=12,
        acc_threshold=-math.inf,
        images=3,
        bins=4,
        batches=2,
        policies_per_pass=5,
        progress=False,
    )
    threshold = float(np.median([row.accuracy for row in probe.table]))
    result = search(
        semi,
        init,
        data,
        candidates=12,
        acc_threshold=threshold,
        top_n=2,
        images=3,
        bins=4,
        batches=2,
        policies_per_pass=5,
        progress=False,
    )
    assert [row.policy for row in result.table] == [row.policy for row in probe.table]
    assert len({row.policy for row in result.table}) == 12
    for row, full in zip(result.table, probe.table):
        assert row.accuracy == pytest.approx(full.accuracy)
        assert math.isnan(row.privacy) == (row.accuracy < threshold)
        if not math.isnan(row.privacy):  # same images, starts and draws: the same S_pri
            assert row.privacy == pytest.approx(full.privacy, abs=1e-12)
    kept = sorted((row for row in result.table if not math.isnan(row.privacy)), key=lambda r: r.privacy)
    assert result.selected[0] == kept[0].policy
    assert len(result.selected) == 2 and not result.selected[0].transforms & result.selected[1].transforms
    assert str(result.hybrid) == "+".join(str(p) for p in result.selected)
    assert "S_pri" in result.format_table() and str(result.hybrid) in str(result)


def test_search_checks_its_arguments(digits):
    model = _model(cls=LeNet, width=4)
    with pytest.raises(ValueError, match="exceeds"):
        search(model, model, (digits.x, digits.y), candidates=60, max_len=1, acc_threshold=0.0)


def test_policies_are_named_by_their_transforms():
    assert describe_policy("3-1") == "translate_x 0.4532 > contrast 0.3333"
    assert describe_policy("0+8-11") == "invert | autocontrast > posterize 6"  # one sub-policy drawn per image
    assert describe_policy("") == "identity"


def test_ats_search_semi_trains_sets_the_threshold_and_writes_json_and_markdown(digits, tmp_path):
    import json

    data = (digits.x[:120].float(), digits.y[:120])
    result = ats_search(lambda: LeNet(width=4), data, candidates=6, images=2, semi_epochs=1, seed=0, progress=False)
    assert result.threshold is not None and len(result.table) == 6
    kept = [r for r in result.table if not math.isnan(r.privacy)]
    assert all(r.accuracy >= result.threshold for r in kept)  # the default filter keeps policies at least as good
    text = result.format_table()
    first = sorted(kept, key=lambda r: r.privacy)[0]
    assert any(
        line.split()[0] == str(first.policy) and describe_policy(first.policy) in line for line in text.splitlines()
    )
    assert f"hybrid: {result.hybrid} ({describe_policy(result.hybrid)})" in text
    json_path, markdown_path = result.write(tmp_path)
    values = json.loads(json_path.read_text())
    assert values["threshold"] == result.threshold and values["hybrid"] == str(result.hybrid)
    assert values["table"][0]["transforms"] == describe_policy(result.table[0].policy)
    markdown = markdown_path.read_text()
    assert "| policy | transforms | S_pri | S_acc |" in markdown and "| --- | --- | ---: | ---: |" in markdown
    assert markdown.count("\n| ") == 2 + 6  # header, rule and every candidate
    fixed = ats_search(
        lambda: LeNet(width=4), data, candidates=6, images=2, semi_epochs=1, acc_threshold=1e9, progress=False
    )
    assert fixed.threshold == 1e9 and fixed.selected == [] and all(math.isnan(r.privacy) for r in fixed.table)


def test_crop_and_flip_takes_a_zero_padded_window_mirrored_or_not(digits):
    x = digits.x[:6]
    out = crop_and_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    for n in range(len(x)):
        windows = [padded[n, :, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[n], w) or torch.equal(out[n], w.flip(-1)) for w in windows)


def test_privacy_score_and_search_augment_like_the_reference_before_the_policy(digits):
    # The reference's augmented evaluation: RandomCrop(padding 4) and a random flip, then the policy.
    model = _model(cls=LeNet, width=6)
    x, y = digits.x[:3], digits.y[:3]
    start = torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    augmented = privacy_score(
        model, x, y, policy="0-8", start=start, bins=4, augment=True, generator=torch.Generator().manual_seed(5)
    )
    expected = privacy_score(
        model, crop_and_flip(x, generator=torch.Generator().manual_seed(5)), y, policy="0-8", start=start, bins=4
    )
    torch.testing.assert_close(augmented, expected)
    assert not torch.allclose(augmented, privacy_score(model, x, y, policy="0-8", start=start, bins=4))
    semi, init = _model(seed=0, cls=LeNet, width=4), _model(seed=1, cls=LeNet, width=4)
    kwargs = dict(candidates=4, acc_threshold=-math.inf, images=3, bins=4, batches=2, progress=False)
    plain = search(semi, init, (digits.x[:100], digits.y[:100]), **kwargs)
    crops = search(semi, init, (digits.x[:100], digits.y[:100]), augment=True, **kwargs)
    assert [r.policy for r in crops.table] == [r.policy for r in plain.table]  # the same candidates, other images
    assert any(a.privacy != pytest.approx(b.privacy) for a, b in zip(crops.table, plain.table))
