"""Encoder features of a whole labelled split, each rank a share: for the kNN monitor and for evaluation.

The split is read in manifest order with the deterministic eval transform (the loader's center_crop augmentation); the
epoch's last global batch is padded by the loader, and the padding (valid = False) is dropped here, so every sample
counts once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from pipeline.data.loading.loader import Batch, ShardLoader


@torch.no_grad()
def feature_batches(encoder: nn.Module, loader: ShardLoader | Iterable[Batch], device: torch.device,
                    dtype: torch.dtype = torch.float32,
                    transform: Callable[[Tensor], Tensor] | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(features, labels) of each batch of this rank's share of one epoch of `loader` (or of batches it made before),
    float32, computed on `device` (the encoder's) from inputs of `dtype` (the encoder's), after `transform` (a probe's
    augmentation) if given; one batch at a time, so that a consumer keeping a compressed copy (the kNN monitor)
    never holds the share in float32."""
    was_training = encoder.training
    encoder.eval()
    try:
        for batch in loader:
            (images,) = batch.views.values()
            images = images.to(device, dtype, non_blocking=True)
            out = encoder(transform(images) if transform else images)
            valid = batch.valid.to(device, non_blocking=True)
            yield out[valid].float(), batch.labels.to(device, non_blocking=True)[valid]
    finally:
        encoder.train(was_training)


def features(encoder: nn.Module, loader: ShardLoader | Iterable[Batch], device: torch.device,
             dtype: torch.dtype = torch.float32,
             transform: Callable[[Tensor], Tensor] | None = None):
    """(features, labels) of this rank's whole share, concatenated (`feature_batches`)."""
    feats, labels = zip(*feature_batches(encoder, loader, device, dtype, transform))
    return torch.cat(feats), torch.cat(labels)
