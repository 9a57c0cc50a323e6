"""Encoders, the AASAE decoder and projection heads."""

from pipeline.models.decoder import ResNetDecoder
from pipeline.models.heads import GaussianHead, ProjectionHead
from pipeline.models.resnet import ARCHS, STEM_DOWNSAMPLE, ResNet

__all__ = ["ARCHS", "STEM_DOWNSAMPLE", "GaussianHead", "ProjectionHead", "ResNet", "ResNetDecoder"]
