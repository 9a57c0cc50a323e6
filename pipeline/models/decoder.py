"""The AASAE decoder: a mirrored ResNet without BatchNorm that maps a latent code to the mean of a Gaussian over pixels.

Layout (docs/methods.md, AASAE): Linear(latent, hidden)-ReLU-Linear(hidden, 128*4*4)-ReLU, reshape to a (128, 4, 4)
seed, 1x1 conv to the encoder's last width, four residual stages mirroring the encoder's (same block type, blocks per
stage in reverse order, widths halving), a final 3x3 conv to 3 channels and no output activation.

Spatial scheme, chosen so that every data.image_size works: the decoder undoes the encoder's downsampling
exactly. The encoder shrinks the input by F = 8 * (stem factor: CIFAR 1, STL-10 2, ImageNet 4), so the 4x4 seed is
first resized (nearest) to image_size / F, i.e. to the size of the encoder's last feature map: 32 px CIFAR -> 4 (no
resize), 96 px STL-10 -> 6, 224 px ImageNet -> 7, 64 px CIFAR stem -> 8. Stages 1-3 then upsample by 2 (mirroring
encoder stages 4-2), stage 4 keeps the size (mirroring stage 1), and a last nearest upsampling by the stem factor
mirrors the stem. An image_size not divisible by F (48 px with the ImageNet stem: F = 32) starts from the next larger
feature map, ceil(image_size / F), and the output is resized (bilinear) to image_size at the end.

No BatchNorm: the decoder's output is a per-pixel mean, and batch statistics would couple the reconstructions of
different images; the convolutions carry biases instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.resnet import ARCHS, STEM_DOWNSAMPLE

SEED_SIZE = 4


def _upsample(scale: int) -> nn.Module:
    return nn.Upsample(scale_factor=scale, mode="nearest") if scale > 1 else nn.Identity()


def _shortcut(in_ch: int, out_ch: int) -> nn.Module:
    return nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, kernel_size=1)


class DecoderBasicBlock(nn.Module):
    """Mirror of BasicBlock: nearest upsampling first (in place of the stride), then two 3x3 convs."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, scale: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.upsample = _upsample(scale)
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(planes, out_ch, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        x = self.upsample(x)
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(out + self.shortcut(x))


class DecoderBottleneck(nn.Module):
    """Mirror of Bottleneck: nearest upsampling first, then 1x1 reduce, 3x3, 1x1 expand."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, scale: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.upsample = _upsample(scale)
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=1)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(planes, out_ch, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        x = self.upsample(x)
        out = self.relu(self.conv1(x))
        out = self.conv3(self.relu(self.conv2(out)))
        return self.relu(out + self.shortcut(x))


# encoder block expansion -> decoder block
_DECODER_BLOCKS = {1: DecoderBasicBlock, 4: DecoderBottleneck}


class ResNetDecoder(nn.Module):
    """Decoder for the encoder `ResNet(arch, stem, width)` on `image_size` x `image_size` inputs."""

    def __init__(
        self,
        arch: str = "resnet18",
        stem: str = "cifar",
        image_size: int = 32,
        latent_dim: int = 128,
        hidden_dim: int = 2048,
        width: int = 1,
        seed_channels: int = 128,
    ):
        super().__init__()
        encoder_block, layers, base = ARCHS[arch]
        block = _DECODER_BLOCKS[encoder_block.expansion]
        stem_factor = STEM_DOWNSAMPLE[stem]
        factor = 8 * stem_factor
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, not {image_size}")
        self.image_size = image_size
        self.seed_channels = seed_channels
        self.feature_size = -(-image_size // factor)

        self.mlp = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, seed_channels * SEED_SIZE * SEED_SIZE),
            nn.ReLU(inplace=True),
        )
        in_ch = base * width * 8 * block.expansion
        self.conv_in = nn.Conv2d(seed_channels, in_ch, kernel_size=1)

        stages = []
        # Stage i mirrors encoder stage 4-i: it upsamples where that stage strided and ends at the width that stage
        # received, i.e. the output width of encoder stage 3-i (for the last one, stage 1's output: the stem's width
        # with BasicBlocks, 4x that with Bottlenecks).
        for i, (n_blocks, scale) in enumerate(zip(reversed(layers), (2, 2, 2, 1))):
            planes = base * width * 2 ** max(2 - i, 0)
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_ch, planes, scale=scale if j == 0 else 1))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.stem_upsample = _upsample(stem_factor)
        self.conv_out = nn.Conv2d(in_ch, 3, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mlp(z).reshape(z.shape[0], self.seed_channels, SEED_SIZE, SEED_SIZE)
        if x.is_cuda:  # the convolutions that follow keep the layout; cuDNN's bf16/fp16 kernels want channels-last
            x = x.contiguous(memory_format=torch.channels_last)
        if self.feature_size != SEED_SIZE:
            x = F.interpolate(x, size=(self.feature_size, self.feature_size), mode="nearest")
        x = self.conv_out(self.stem_upsample(self.stages(self.conv_in(x))))
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x
