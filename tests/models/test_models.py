"""ResNet encoders and the AASAE decoder: sizes, parameter counts, stems, channels-last, zero-init."""

import pytest
import torch
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

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


# The official decoder's figures (Lightning-Universe/paper-AAVAE, src/models/decoder.py: decoder18/34/50/50w2 with
# h_dim = the encoder's width as its vae.py sets it, latent_dim 128, first_conv3x3/remove_first_maxpool per dataset as
# its vae.py sets them), computed from that code's layer list. FLOPs per image = 2 x the multiply-accumulates of the
# convolutions and linear layers, as torch.utils.flop_counter counts them (interpolation and biases not counted).
# By hand for ResNet-18: MLP 66,048 + 262,656, 1x1 conv 16,896, stages 3,081,472 + 770,688 + 192,832 + 48,288,
# 3x3 conv to 64 18,496, 3x3 conv to 3 1,731: 4,459,107 parameters.
OFFICIAL_DECODERS = [
    ("resnet18", 1, "cifar", 32, 4_459_107, 436_731_904),
    ("resnet18", 1, "stl10", 96, 4_459_107, 1_005_060_096),
    ("resnet18", 1, "imagenet", 224, 4_459_107, 1_844_445_184),
    ("resnet34", 1, "cifar", 32, 6_986_147, 738_721_792),
    ("resnet34", 1, "stl10", 96, 6_986_147, 1_684_537_344),
    ("resnet34", 1, "imagenet", 224, 6_986_147, 2_769_289_216),
    ("resnet50", 1, "cifar", 32, 13_291_203, 1_006_501_888),
    ("resnet50", 1, "stl10", 96, 13_291_203, 2_245_918_720),
    ("resnet50", 1, "imagenet", 224, 13_291_203, 4_561_960_960),
    ("resnet50", 2, "cifar", 32, 52_448_899, 3_712_352_256),
    ("resnet50", 2, "stl10", 96, 52_448_899, 8_207_597_568),
    ("resnet50", 2, "imagenet", 224, 52_448_899, 14_027_194_368),
]


@pytest.mark.parametrize("arch, width, stem, size, params, flops", OFFICIAL_DECODERS)
def test_decoder_matches_the_official_parameters_and_flops(arch, width, stem, size, params, flops):
    with torch.device("meta"):  # shapes only: the meta device runs the graph without computing
        decoder = ResNetDecoder(arch, stem, size, width=width)
        counter = FlopCounterMode(display=False)
        with counter:
            out = decoder(torch.empty(1, 128))
    assert out.shape == (1, 3, size, size)
    assert n_params(decoder) == params
    assert counter.get_total_flops() == flops
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in decoder.modules())


def test_decoder_hidden_width_is_the_encoders():
    for arch, width in [("resnet18", 1), ("resnet50", 1), ("resnet50", 2), ("resnet_small", 1)]:
        with torch.device("meta"):
            decoder = ResNetDecoder(arch, "cifar", 32, width=width)
            encoder = ResNet(arch, width=width)
        assert decoder.mlp[0].out_features == decoder.mlp[2].out_features == encoder.out_dim
    assert ResNetDecoder("resnet_small", hidden_dim=64).mlp[0].out_features == 64


@pytest.mark.parametrize(
    "stem, size", [("cifar", 32), ("stl10", 96), ("imagenet", 224), ("cifar", 64), ("stl10", 64), ("imagenet", 64)]
)
def test_decoder_output_matches_the_image_size(stem, size):
    decoder = ResNetDecoder("resnet_small", stem, size, latent_dim=16, hidden_dim=64)
    assert decoder(torch.randn(2, 16)).shape == (2, 3, size, size)


@pytest.mark.parametrize("stem, size", [("stl10", 100), ("imagenet", 48), ("cifar", 36)])
def test_decoder_reaches_sizes_the_encoder_does_not_divide_evenly(stem, size):
    decoder = ResNetDecoder("resnet_small", stem, size, latent_dim=16, hidden_dim=64)
    assert decoder(torch.randn(2, 16)).shape == (2, 3, size, size)


def test_decoder_rejects_an_empty_image_or_a_hidden_width_it_cannot_reshape():
    with pytest.raises(ValueError, match="image_size"):
        ResNetDecoder("resnet_small", "stl10", 0)
    with pytest.raises(ValueError, match="multiple of 16"):
        ResNetDecoder("resnet_small", hidden_dim=100)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the channels-last seed is made on CUDA only")
def test_decoder_keeps_a_channels_last_layout_on_cuda():
    decoder = ResNetDecoder("resnet_small", "stl10", 96, latent_dim=16).cuda()
    assert decoder(torch.randn(2, 16, device="cuda")).is_contiguous(memory_format=torch.channels_last)


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
