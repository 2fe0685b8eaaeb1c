"""Reference models. All use GroupNorm, LayerNorm or no normalization so that DP-SGD can train them
as they are; ``ResNet20(norm="batch")`` exists for the non-private ATS experiments only. The language
models (:class:`LSTMLanguageModel`, :class:`TransformerLanguageModel`) are those of the Secret Sharer
experiment (:mod:`privfast.secret_sharer`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from privfast.config import TrainConfig

MODELS = ("convnet", "mlp", "wrn16-4", "resnet20")
"""The image classifiers :func:`build_model` makes (``TrainConfig.model``, ``privfast train --model``)."""


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'group', 'batch' or 'none', got {kind!r}")


class MLP(nn.Module):
    """Flatten, then ``len(hidden)`` Linear+ReLU layers and a classifier. Input ``[B, *in_shape]``."""

    def __init__(self, in_features: int, num_classes: int, *, hidden: tuple[int, ...] = (128,)):
        super().__init__()
        widths = (in_features, *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ConvNet(nn.Module):
    """Small CNN: two conv-GroupNorm-ReLU blocks with pooling, then a linear classifier.

    Input ``[B, in_channels, image_size, image_size]`` (image_size divisible by 4); output ``[B, num_classes]``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        image_size: int = 8,
        norm: str = "group",
        groups: int = 8,
    ):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            _norm(norm, width, groups),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            _norm(norm, 2 * width, groups),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.classifier = nn.Linear(2 * width * (image_size // 4) ** 2, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, groups: int, pre_activation: bool):
        super().__init__()
        self.pre_activation = pre_activation
        self.norm1 = _norm(norm, c_in if pre_activation else c_out, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm2 = _norm(norm, c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x):
        if self.pre_activation:  # WideResNet ordering: norm-relu-conv
            out = self.relu(self.norm1(x))
            skip = self.shortcut(out) if self.shortcut is not None else x
            out = self.conv2(self.relu(self.norm2(self.conv1(out))))
            return out + skip
        out = self.relu(self.norm1(self.conv1(x)))  # ResNet ordering: conv-norm-relu
        out = self.norm2(self.conv2(out))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return self.relu(out + skip)


def _stage(c_in: int, c_out: int, blocks: int, stride: int, norm: str, groups: int, pre: bool) -> nn.Sequential:
    return nn.Sequential(
        *[
            _BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, norm, groups, pre)
            for i in range(blocks)
        ]
    )


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis) with GroupNorm, as used by De et al. and DP-Mix.

    Input ``[B, in_channels, H, W]`` (32x32 in the papers); output ``[B, num_classes]``.
    """

    def __init__(
        self,
        *,
        depth: int = 16,
        widen: int = 4,
        num_classes: int = 10,
        in_channels: int = 3,
        groups: int = 16,
        norm: str = "group",
    ):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.stages = nn.Sequential(
            _stage(widths[0], widths[1], n, 1, norm, groups, True),
            _stage(widths[1], widths[2], n, 2, norm, groups, True),
            _stage(widths[2], widths[3], n, 2, norm, groups, True),
        )
        self.head = nn.Sequential(
            _norm(norm, widths[3], groups),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[3], num_classes),
        )

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 inputs (He et al.), the ATS paper's model. Output ``[B, num_classes]``."""

    def __init__(
        self, *, num_classes: int = 10, in_channels: int = 3, norm: str = "group", groups: int = 8, width: int = 16
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), _norm(norm, width, groups), nn.ReLU()
        )
        self.stages = nn.Sequential(
            _stage(width, width, 3, 1, norm, groups, False),
            _stage(width, 2 * width, 3, 2, norm, groups, False),
            _stage(2 * width, 4 * width, 3, 2, norm, groups, False),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class LeNet(nn.Module):
    """DLG's LeNet: three stride-2/2/1 5x5 convolutions with sigmoid activations and a linear
    classifier. Its smooth activations make gradient inversion well posed, which is why the
    reconstruction literature (and privfast's attack tests) use it.

    Input ``[B, in_channels, image_size, image_size]``; output ``[B, num_classes]``.
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, width: int = 12, image_size: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        side = (image_size + 3) // 4  # each stride-2 convolution (kernel 5, padding 2) gives ceil(side / 2)
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


# -- language models (the Secret Sharer, Carlini et al., USENIX Security 2019) -----------------
# Both take token ids [N, T] with the examples first (pass batch_first=True to make_private) and
# return next-token logits [N, T, V]: logits[:, t] predicts the token after ids[:, t].


class LSTMLanguageModel(nn.Module):
    """Word- or character-level LSTM language model: Embedding, stacked LSTM, Linear over the vocabulary.

    The Secret Sharer's model family (an embedding, a 2-layer LSTM, a softmax output). The LSTM is
    Opacus's :class:`~opacus.layers.DPLSTM` (Linear cells, batch-first) so that the per-example
    engine clips it exactly; its weights load from an ``nn.LSTM`` state dict.

    The output layer is *untied* from the embedding: privfast's per-example engine refuses a
    parameter shared by two layers (a tied weight's per-example gradient is the sum of two
    layers' contributions, which no per-layer rule sees whole), and untying costs only
    ``vocab_size * embed_dim`` parameters at these vocabulary sizes.

    Args:
        vocab_size: V.
        embed_dim: embedding width E.
        hidden_size: LSTM width H.
        num_layers: stacked LSTM layers (2 in the Secret Sharer).
        dropout: dropout on the embedding, between LSTM layers and before the output (0: none).

    Input ``ids`` int64 ``[N, T]``; output logits ``[N, T, V]``.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        embed_dim: int = 128,
        hidden_size: int = 128,
        num_layers: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        from opacus.layers import DPLSTM

        if min(vocab_size, embed_dim, hidden_size, num_layers) < 1 or not 0 <= dropout < 1:
            raise ValueError(
                f"need vocab_size, embed_dim, hidden_size, num_layers >= 1 and dropout in [0, 1); got "
                f"{vocab_size}, {embed_dim}, {hidden_size}, {num_layers}, {dropout}"
            )
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.drop = nn.Dropout(dropout)
        self.lstm = DPLSTM(embed_dim, hidden_size, num_layers=num_layers, batch_first=True, dropout=dropout)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, ids):
        return self.step(ids)[0]

    def step(self, ids, state=None):
        """Run ``ids [N, t]`` on from ``state``; the incremental form behind exposure and extraction.

        Any model with this method (state: tensors holding the rows in dimension 1, as torch's
        RNN states do) is scored incrementally by :mod:`privfast.attacks.exposure`; other models
        are run on whole sequences.

        Args:
            ids: int64 ``[N, t]``.
            state: ``(h, c)``, each ``[num_layers, N, H]``, from a previous call (None: zeros).

        Returns:
            ``(logits [N, t, V], state after the last token)``.
        """
        out, state = self.lstm(self.drop(self.embed(ids)), state)
        return self.head(self.drop(out)), state


class _CausalSelfAttention(nn.Module):
    """Multi-head self-attention over ``[N, T, D]`` from Linear layers and torch's fused attention
    (causal: position t attends to positions <= t). The engine clips the two Linear layers exactly."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [N, h, T, d/h]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerLanguageModel(nn.Module):
    """A small causal GPT-style transformer: token and learned position embeddings, pre-LN blocks of
    causal self-attention and MLP, a final LayerNorm and an (untied) Linear over the vocabulary.

    Batch-first throughout. The position embedding looks up ``arange(T)`` expanded to ``[N, T]``
    rather than broadcasting one ``[T, D]`` lookup: every layer's input must hold the examples in
    dimension 0, which is how the per-example engine tells a layer's examples apart.

    Args:
        vocab_size: V.
        dim: model width D (divisible by ``heads``).
        heads: attention heads.
        layers: transformer blocks.
        context: longest input T (positions embedded).
        mlp_ratio: MLP hidden width over D.
        dropout: dropout in attention, after the MLP and on the embeddings (0: none).

    Input ``ids`` int64 ``[N, T]``, ``T <= context``; output logits ``[N, T, V]``.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        dim: int = 128,
        heads: int = 4,
        layers: int = 2,
        context: int = 64,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        if min(vocab_size, dim, heads, layers, context, mlp_ratio) < 1 or dim % heads or not 0 <= dropout < 1:
            raise ValueError(
                f"need positive sizes, dim divisible by heads and dropout in [0, 1); got vocab_size="
                f"{vocab_size}, dim={dim}, heads={heads}, layers={layers}, context={context}, "
                f"mlp_ratio={mlp_ratio}, dropout={dropout}"
            )
        self.vocab_size, self.context = vocab_size, context
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(context, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, ids):
        n, t = ids.shape
        if t > self.context:
            raise ValueError(f"input of {t} tokens, but the model embeds {self.context} positions (context=)")
        # Contiguous: Opacus's ghost clipping views an Embedding's input, and runs this model too in
        # privfast's comparisons (privfast itself takes the expanded view as it is).
        positions = torch.arange(t, device=ids.device).expand(n, t).contiguous()
        x = self.drop(self.embed(ids) + self.pos(positions))
        return self.head(self.norm(self.blocks(x)))


def build_model(config: TrainConfig, *, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The model ``config.model`` (one of :data:`MODELS`) for images ``[B, in_channels, image_size, image_size]``."""
    if config.model == "convnet":
        return ConvNet(
            in_channels=in_channels,
            num_classes=num_classes,
            width=config.width,
            image_size=image_size,
            groups=min(8, config.width),
        )
    if config.model == "mlp":
        return MLP(in_channels * image_size**2, num_classes, hidden=(config.width,))
    if config.model == "wrn16-4":
        return WideResNet(depth=16, widen=4, num_classes=num_classes, in_channels=in_channels)
    if config.model == "resnet20":
        return ResNet20(num_classes=num_classes, in_channels=in_channels)
    raise ValueError(f"--model must be one of {', '.join(MODELS)}; got {config.model!r}")
