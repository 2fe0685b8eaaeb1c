"""Reference models. All use GroupNorm (or no normalization) so that DP-SGD can train them as
they are; ``ResNet20(norm="batch")`` exists for the non-private ATS experiments only."""

from __future__ import annotations

from torch import nn


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

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, width: int = 32, image_size: int = 8,
                 norm: str = "group", groups: int = 8):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), _norm(norm, width, groups), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), _norm(norm, 2 * width, groups), nn.ReLU(), nn.AvgPool2d(2),
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
    return nn.Sequential(*[
        _BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, norm, groups, pre) for i in range(blocks)
    ])


class WideResNet(nn.Module):
    """WRN-depth-widen (Zagoruyko & Komodakis) with GroupNorm, as used by De et al. and DP-Mix.

    Input ``[B, in_channels, H, W]`` (32x32 in the papers); output ``[B, num_classes]``.
    """

    def __init__(self, *, depth: int = 16, widen: int = 4, num_classes: int = 10, in_channels: int = 3,
                 groups: int = 16, norm: str = "group"):
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
        self.head = nn.Sequential(_norm(norm, widths[3], groups), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(widths[3], num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 inputs (He et al.), the ATS paper's model. Output ``[B, num_classes]``."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 3, norm: str = "group", groups: int = 8,
                 width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), _norm(norm, width, groups),
                                  nn.ReLU())
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
            nn.Conv2d(in_channels, width, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(width, width, 5, padding=2, stride=1), nn.Sigmoid(),
        )
        side = (image_size + 3) // 4  # each stride-2 convolution (kernel 5, padding 2) gives ceil(side / 2)
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))
