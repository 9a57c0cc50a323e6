"""Encoder features of a whole labelled split, each rank a share: for the kNN monitor and for evaluation.

The split is read in manifest order with the deterministic eval transform (the loader's center_crop augmentation); the
epoch's last global batch is padded by the loader, and the padding (valid = False) is dropped here, so every sample
counts once.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.data.loading.loader import ShardLoader


@torch.no_grad()
def features(encoder: nn.Module, loader: ShardLoader, device: torch.device, dtype: torch.dtype = torch.float32):
    """(features, labels) of this rank's share of one epoch of `loader`, float32, computed on `device` (the
    encoder's)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for batch in loader:
        (images,) = batch.views.values()
        out = encoder(images.to(device, dtype, non_blocking=True))
        valid = batch.valid.to(device, non_blocking=True)
        feats.append(out[valid].float())
        labels.append(batch.labels.to(device, non_blocking=True)[valid])
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)
