"""White-box check of what the accountant assumes, through the whole private step.

One canary example has a huge gradient of known direction ``u``; every other example has a zero
gradient. Clipped, the canary contributes exactly ``C u``, so over many noisy steps the update
projected on ``u`` must have mean ``C / B`` and standard deviation ``sigma * C / B``, and every
other direction pure noise of that standard deviation. Clipping the wrong unit (time steps, rows
instead of examples), noise of the wrong size (e.g. divided by K) or a layout mistake shows here.
"""

import pytest
import torch
import torch.nn.functional as F
from opacus.layers import DPLSTM
from opacus.validators import ModuleValidator
from torch import nn

from privfast.grad_sample import GradSampleModule
from privfast.models import ConvNet
from privfast.optim import DPOptimizer

B, T, V, C_CLASSES = 4, 6, 11, 5
MAX_GRAD_NORM, SIGMA, STEPS = 0.5, 0.3, 150


class LSTMLanguageModel(nn.Module):
    """Time-first token ids ``[T, N]`` -> next-token logits ``[T, N, V]`` (torch's default layout)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 8)
        self.rnn = DPLSTM(8, 8)
        self.head = nn.Linear(8, V)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0])


class Transformer(nn.Module):
    """A fixed (DPMultiheadAttention) encoder layer, time-first, over ``[T, N, 8]``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.layer = ModuleValidator.fix(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0))
        self.head = nn.Linear(8, C_CLASSES)

    def forward(self, x):
        return self.head(self.layer(self.inp(x)))


def _case(name, rows, g):
    """(model, input, per-row loss function returning ``[rows]``, batch_first)."""
    if name == "cnn":
        model = ConvNet(in_channels=1, num_classes=C_CLASSES, width=8, image_size=8, groups=4).double()
        x, y = (
            torch.randn(rows, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, C_CLASSES, (rows,), generator=g),
        )
        return model, x, lambda out: F.cross_entropy(out, y, reduction="none"), True
    if name == "lstm_lm":
        ids = torch.randint(0, V, (T + 1, rows), generator=g)
        return (
            LSTMLanguageModel().double(),
            ids[:-1],
            lambda out: (
                F.cross_entropy(out.reshape(-1, V), ids[1:].reshape(-1), reduction="none").view(T, rows).mean(0)
            ),
            False,
        )
    x, y = (
        torch.randn(T, rows, 3, generator=g, dtype=torch.float64),
        torch.randint(0, C_CLASSES, (T, rows), generator=g),
    )
    return (
        Transformer().double(),
        x,
        lambda out: F.cross_entropy(out.reshape(-1, C_CLASSES), y.reshape(-1), reduction="none").view(T, rows).mean(0),
        False,
    )


@pytest.mark.parametrize("mode", ["auto", "ghost"])
@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("name", ["cnn", "lstm_lm", "transformer"])
def test_canary_update_has_the_accountants_mean_and_noise(name, k, mode, one_thread):
    torch.manual_seed(0)
    rows = B * k
    model, x, row_loss, batch_first = _case(name, rows, torch.Generator().manual_seed(1))
    canary = torch.zeros(rows, dtype=torch.float64)
    canary[:k] = 1e4  # example 0's K rows: a gradient far above the clipping bound; the others: none

    params = [p for p in model.parameters() if p.requires_grad]
    # The canary's direction: its gradient (the other rows weigh 0) from a plain backward.
    full = torch.autograd.grad((row_loss(model(x)) * canary).sum() / k, params)
    u = torch.cat([g.flatten() for g in full])
    assert u.norm() > 100 * MAX_GRAD_NORM
    u = u / u.norm()

    wrapped = GradSampleModule(model, mode=mode, augmult=k, batch_first=batch_first)
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.0),
        module=wrapped,
        noise_multiplier=SIGMA,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=B,
        generator=torch.Generator().manual_seed(2),
    )
    projections, residual_std = [], []
    for _ in range(STEPS):
        (row_loss(wrapped(x)) * canary).mean().backward()
        optimizer.pre_step()
        update = torch.cat([p.grad.flatten() for p in params])
        along = update @ u
        projections.append(float(along))
        residual_std.append(float((update - along * u).std()))
        optimizer.zero_grad()
    projections = torch.tensor(projections, dtype=torch.float64)
    mean, std = MAX_GRAD_NORM / B, SIGMA * MAX_GRAD_NORM / B
    # Within 4 standard errors: of the mean (std / sqrt(STEPS)) and of the standard deviation (1 / sqrt(2 STEPS)).
    assert abs(float(projections.mean()) - mean) < 4 * std / STEPS**0.5, (float(projections.mean()), mean)
    assert abs(float(projections.std()) / std - 1) < 4 / (2 * STEPS) ** 0.5, (float(projections.std()), std)
    # Every other direction: pure noise with the same standard deviation (many coordinates: tight).
    assert abs(sum(residual_std) / STEPS / std - 1) < 0.03
