"""ResNet encoders and the AASAE decoder: sizes, parameter counts, stems, channels-last, zero-init."""

import pytest
import torch
from torch.testing import assert_close

from pipeline.models import ARCHS, GaussianHead, ProjectionHead, ResNet, ResNetDecoder


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("resnet18", 11_176_512),  # torchvision resnet18 (11,689,512) minus its 512x1000 classifier
        ("resnet34", 21_284_672),
        ("resnet50", 23_508_032),  # torchvision resnet50 (25,557,032) minus its 2048x1000 classifier
    ],
)
def test_parameter_counts_match_the_standard_resnets(arch, expected):
    with torch.device("meta"):  # count without allocating
        model = ResNet(arch, stem="imagenet")
    assert n_params(model) == expected


@pytest.mark.parametrize("width, millions", [(2, 94), (4, 375)])  # SimCLR's table: ResNet-50 (2x) 94M, (4x) 375M
def test_wide_resnet50_parameter_counts(width, millions):
    with torch.device("meta"):
        model = ResNet("resnet50", stem="imagenet", width=width)
    assert abs(n_params(model) / 1e6 - millions) < 0.5
    assert model.out_dim == 2048 * width


@pytest.mark.parametrize(
    "stem, size, feature_map",
    [("cifar", 32, 4), ("stl10", 96, 6), ("imagenet", 224, 7), ("cifar", 64, 8), ("stl10", 64, 4)],
)
def test_stems_downsample_as_documented(stem, size, feature_map):
    model = ResNet("resnet_small", stem=stem).eval()
    x = torch.randn(2, 3, size, size)
    trunk = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2,
                                model.layer3, model.layer4)
    assert trunk(x).shape[-2:] == (feature_map, feature_map)
    assert model(x).shape == (2, model.out_dim) == (2, 128)


@pytest.mark.parametrize(
    "stem, size", [("cifar", 32), ("stl10", 96), ("imagenet", 224), ("cifar", 64), ("stl10", 64), ("imagenet", 64)]
)
def test_decoder_output_matches_the_image_size(stem, size):
    decoder = ResNetDecoder("resnet_small", stem, size, latent_dim=16, hidden_dim=64)
    assert decoder(torch.randn(2, 16)).shape == (2, 3, size, size)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stem, size", [("cifar", 32), ("stl10", 96), ("imagenet", 224)])
def test_full_size_decoders_output_the_image_size(arch, stem, size):
    with torch.device("meta"):  # shapes only: the meta device runs the graph without computing
        decoder = ResNetDecoder(arch, stem, size)
        out = decoder(torch.empty(2, 128))
    assert out.shape == (2, 3, size, size)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in decoder.modules())


@pytest.mark.parametrize("stem, size", [("stl10", 100), ("imagenet", 48), ("cifar", 36)])
def test_decoder_reaches_sizes_the_encoder_does_not_divide_evenly(stem, size):
    decoder = ResNetDecoder("resnet_small", stem, size, latent_dim=16, hidden_dim=64)
    assert decoder(torch.randn(2, 16)).shape == (2, 3, size, size)


def test_decoder_rejects_an_empty_image():
    with pytest.raises(ValueError):
        ResNetDecoder("resnet_small", "stl10", 0)


def test_channels_last_gives_the_same_features():
    torch.manual_seed(0)
    model = ResNet("resnet_small", stem="cifar").eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    assert_close(model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5)


def test_zero_init_residual_makes_every_block_start_as_the_identity():
    model = ResNet("resnet_small", stem="cifar", zero_init_residual=True).eval()
    block = model.layer1[0]  # identity shortcut: the block is relu(0 + x) = x for x >= 0
    x = torch.rand(2, block.conv1.in_channels, 8, 8)
    assert_close(block(x), x)
    assert all(m.last_bn.weight.abs().sum() == 0 for m in model.modules() if hasattr(m, "last_bn"))
    assert ResNet("resnet_small").layer1[0].bn2.weight.abs().sum() > 0


def test_unknown_backbone_or_stem_raises():
    with pytest.raises(ValueError):
        ResNet("resnet19")
    with pytest.raises(ValueError):
        ResNet("resnet18", stem="mnist")
    assert set(ARCHS) >= {"resnet18", "resnet34", "resnet50", "resnet_small"}


def test_heads_output_sizes():
    h = torch.randn(4, 32)
    mu, logvar = GaussianHead(32, hidden_dim=64, latent_dim=8)(h)
    assert mu.shape == logvar.shape == (4, 8)
    assert ProjectionHead(32, 128)(h).shape == ProjectionHead(32, 128, hidden_dim=64)(h).shape == (4, 128)
    assert isinstance(ProjectionHead(32).net, torch.nn.Linear)
