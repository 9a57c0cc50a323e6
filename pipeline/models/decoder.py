"""The AASAE decoder, layer for layer the official one (Lightning-Universe/paper-AAVAE, src/models/decoder.py), so that
its capacity and cost are the paper's: a ResNet without BatchNorm that maps a latent code to the mean of a Gaussian
over pixels.

Layout, with h = hidden width (the encoder's width by default: 512 for ResNet-18/34, 2048 for ResNet-50) and
C = 8 x the encoder's first-stage channels (512 for the standard ResNets, x width):
Linear(latent, h)-ReLU-Linear(h, h)-ReLU, reshape to an (h/16, 4, 4) seed, 1x1 conv to h channels + ReLU, four
residual stages with the encoder's blocks per stage in reverse order and widths C/2, C/4, C/8, C/16 (x4 with
Bottlenecks), a 3x3 conv to 64 channels + ReLU and a final 3x3 conv to 3 channels, no output activation.

Where it upsamples (nearest): the first block of stage 1 resizes the seed to the encoder's last feature-map size,
image_size / F with F = 8 x the stem factor (CIFAR 1, STL-10 2, ImageNet 4): 4 for 32 px CIFAR (no resize), 6 for
96 px STL-10, 7 for 224 px ImageNet; the first block of each later stage doubles it; the ImageNet stem's max-pool is
undone by a doubling before the 64-channel conv, and a 7x7 stride-2 stem conv (STL-10, ImageNet) by a doubling after
it. Each stage's first block also has a 1x1 conv shortcut; a BasicBlock upsamples before its first conv, a Bottleneck
after its first (1x1) conv. Where F does not divide image_size (48 px with the ImageNet stem), stage 1 starts from
ceil(image_size / F) and the output is resized (bilinear) to image_size at the end; the official code has no such
case.

No BatchNorm: the decoder's output is a per-pixel mean, and batch statistics would couple the reconstructions of
different images; the convolutions carry biases instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.resnet import ARCHS, STEM_DOWNSAMPLE

SEED_SIZE = 4
SEED_DIVISOR = SEED_SIZE * SEED_SIZE  # the hidden vector is reshaped to (h / 16, 4, 4)
OUT_CONV_CHANNELS = 64  # the official decoder's fixed width before the last conv, whatever the encoder's width


def _upsample(**how) -> nn.Module:
    return nn.Upsample(mode="nearest", **how)


class DecoderBasicBlock(nn.Module):
    """Two 3x3 convs; a stage's first block upsamples before them and has a 1x1 conv shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, upsample: nn.Module | None = None):
        super().__init__()
        out_ch = planes * self.expansion
        self.upsample = upsample or nn.Identity()
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(planes, out_ch, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1) if upsample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.upsample(x)
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(out + self.shortcut(x))


class DecoderBottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand; a stage's first block upsamples after the 1x1 reduce and has a 1x1 conv
    shortcut on the upsampled input."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, upsample: nn.Module | None = None):
        super().__init__()
        out_ch = planes * self.expansion
        self.upsample = upsample or nn.Identity()
        self.conv1 = nn.Conv2d(in_ch, planes, kernel_size=1)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(planes, out_ch, kernel_size=1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1) if upsample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.upsample(self.relu(self.conv1(x)))
        out = self.conv3(self.relu(self.conv2(out)))
        return self.relu(out + self.shortcut(self.upsample(x)))


# encoder block expansion -> decoder block
_DECODER_BLOCKS = {1: DecoderBasicBlock, 4: DecoderBottleneck}


def encoder_width(arch: str, width: int = 1) -> int:
    """The pooled feature size of `ResNet(arch, width=width)`: the default hidden width of the AASAE heads."""
    block, _, base = ARCHS[arch]
    return base * width * 8 * block.expansion


class ResNetDecoder(nn.Module):
    """Decoder for the encoder `ResNet(arch, stem, width)` on `image_size` x `image_size` inputs; `hidden_dim` None
    means the encoder's width, as in the official code."""

    def __init__(
        self,
        arch: str = "resnet18",
        stem: str = "cifar",
        image_size: int = 32,
        latent_dim: int = 128,
        hidden_dim: int | None = None,
        width: int = 1,
    ):
        super().__init__()
        encoder_block, layers, base = ARCHS[arch]
        block = _DECODER_BLOCKS[encoder_block.expansion]
        stem_factor = STEM_DOWNSAMPLE[stem]
        hidden_dim = hidden_dim or encoder_width(arch, width)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, not {image_size}")
        if hidden_dim % SEED_DIVISOR:
            raise ValueError(f"hidden_dim must be a multiple of {SEED_DIVISOR}, not {hidden_dim}")
        self.image_size = image_size
        self.seed_channels = hidden_dim // SEED_DIVISOR
        feature_size = -(-image_size // (8 * stem_factor))

        self.mlp = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(inplace=True),
        )
        self.conv_in = nn.Sequential(nn.Conv2d(self.seed_channels, hidden_dim, kernel_size=1), nn.ReLU(inplace=True))

        in_ch, stages = hidden_dim, []
        for i, n_blocks in enumerate(reversed(layers)):
            planes = base * width * 8 // 2 ** (i + 1)
            first = _upsample(size=feature_size) if i == 0 else _upsample(scale_factor=2)
            blocks = []
            for j in range(n_blocks):
                blocks.append(block(in_ch, planes, first if j == 0 else None))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # The encoder's max-pool (ImageNet stem) and stride-2 stem conv (STL-10, ImageNet stems), undone in turn.
        self.pool_upsample = _upsample(scale_factor=2) if stem_factor == 4 else nn.Identity()
        self.conv_out = nn.Sequential(nn.Conv2d(in_ch, OUT_CONV_CHANNELS, kernel_size=3, padding=1),
                                      nn.ReLU(inplace=True))
        self.stem_upsample = _upsample(scale_factor=2) if stem_factor > 1 else nn.Identity()
        self.final_conv = nn.Conv2d(OUT_CONV_CHANNELS, 3, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mlp(z).reshape(z.shape[0], self.seed_channels, SEED_SIZE, SEED_SIZE)
        if x.is_cuda:  # the convolutions that follow keep the layout; cuDNN's bf16/fp16 kernels want channels-last
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stages(self.conv_in(x))
        x = self.final_conv(self.stem_upsample(self.conv_out(self.pool_upsample(x))))
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x
