"""ResNet encoders in plain torch: the backbones every method trains.

The layout follows He et al. (2016) and torchvision's layer naming, so standard weights line up, but the stem is
chosen per dataset (small images lose too much to a 7x7/2 conv and a max-pool) and all channels scale with a width
multiplier as in SimCLR's ResNet-50 (2x) / (4x). The forward pass returns globally average-pooled features: the
representation that the linear probe and kNN evaluate. Nothing here reshapes with `.view`, so a model and input in
`torch.channels_last` stay channels-last end to end.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# How much each stem shrinks the input before the four stages (the decoder undoes exactly this much).
STEM_DOWNSAMPLE = {"cifar": 1, "stl10": 2, "imagenet": 4}


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's "ResNet v1.5"), 1x1 expand (ResNet-50)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


# name -> (block, blocks per stage, channels of the first stage before the width multiplier)
ARCHS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int], int]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
    # ResNet-10 layout at a quarter of the width (128-d features, ~0.3M parameters): smoke runs and tests on CPU.
    "resnet_small": (BasicBlock, (1, 1, 1, 1), 16),
}


class ResNet(nn.Module):
    """A ResNet trunk that returns pooled features of size `out_dim` (no classifier).

    `arch` is a key of ARCHS; ResNet-50 (2x) is `ResNet("resnet50", width=2)`. `stem`: "cifar" (3x3 stride 1, no
    max-pool), "stl10" (7x7 stride 2, no max-pool) or "imagenet" (7x7 stride 2 and a 3x3 stride-2 max-pool).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        stem: str = "cifar",
        width: int = 1,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown backbone {arch!r}; known: {sorted(ARCHS)}")
        if stem not in STEM_DOWNSAMPLE:
            raise ValueError(f"unknown stem {stem!r}; known: {sorted(STEM_DOWNSAMPLE)}")
        block, layers, base = ARCHS[arch]
        self.arch, self.stem, self.width = arch, stem, width
        stem_ch = base * width

        if stem == "cifar":
            self.conv1 = conv3x3(3, stem_ch)
        else:
            self.conv1 = nn.Conv2d(3, stem_ch, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()

        in_ch = stem_ch
        stages = []
        for i, n_blocks in enumerate(layers):
            planes = base * width * 2**i
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_ch, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_ch

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual block starts as the identity (Goyal et al., 2017): helps large-batch training.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

