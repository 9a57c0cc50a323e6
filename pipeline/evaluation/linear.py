"""Linear classifiers on frozen features.

- `linear_probe`: the evaluation protocol: a linear classifier on the frozen encoder's pooled features, trained with
  SGD (momentum, optionally Nesterov) or Adam and a cosine learning rate (per epoch or per step); the features are
  standardised with the training split's mean and std (what a BatchNorm without affine parameters in front of the
  classifier computes at test time), L2-normalised, or used as they are, as the protocol says (configs/protocol).
- `pad_crop_flip`: CIFAR's probe augmentation, RandomCrop(32, padding 4, reflect) + flip, on a batch in torch (DALI
  pads with a constant only).
- `OnlineLinearProbe`: a linear classifier on DETACHED pooled features, optimised alongside a method while it trains
  (its loss is added to the method's, but no gradient reaches the encoder), as in solo-learn.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.evaluation.accuracy import topk_accuracy


def pad_crop_flip(images: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Each (C, H, W) image reflect-padded by `pad`, cropped back to H x W at a random offset, flipped with p 0.5.
    Padding and flipping commute with the per-channel normalisation, so normalised images may come in."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    draw = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).to(images.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    rows = draw[0, :, None] + torch.arange(h, device=images.device)
    cols = draw[1, :, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def linear_probe(train_batches: Callable[[int], list[tuple[Tensor, Tensor]]], test: tuple[Tensor, Tensor],
                 num_classes: int, dim: int, probe, stats: tuple[Tensor, Tensor], seed: int = 0) -> dict[str, float]:
    """train_batches(epoch) gives (features, labels) batches of one pass over the training split (precomputed or
    freshly augmented); `probe` holds the protocol's settings (pipeline.config.schema.LinearProbeConfig); stats =
    (mean, std) of the training features, used when the protocol standardises them."""
    torch.manual_seed(seed)
    mean, std = stats

    def prepare(features: Tensor) -> Tensor:
        if probe.features == "standardized":
            return (features - mean) / std
        return F.normalize(features, dim=1) if probe.features == "l2" else features

    head = nn.Linear(dim, num_classes).to(mean.device)
    if probe.optimizer == "adam":
        opt = torch.optim.Adam(head.parameters(), lr=probe.lr, betas=tuple(probe.betas),
                               weight_decay=probe.weight_decay)
    else:
        opt = torch.optim.SGD(head.parameters(), lr=probe.lr, momentum=probe.momentum, nesterov=probe.nesterov,
                              weight_decay=probe.weight_decay)
    for epoch in range(probe.epochs):
        batches = train_batches(epoch)
        for i, (features, labels) in enumerate(batches):
            progress = epoch + (i / len(batches) if probe.cosine_every == "step" else 0)
            for group in opt.param_groups:
                group["lr"] = probe.lr * 0.5 * (1 + math.cos(math.pi * progress / probe.epochs))
            loss = F.cross_entropy(head(prepare(features)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        scores = head(prepare(test[0]))
    return topk_accuracy(scores, test[1])


class OnlineLinearProbe(nn.Module):
    """Linear classifier trained on detached features. Label -1 (unlabelled, the shard format's UNLABELED) is
    ignored."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, features: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.fc(features.detach())
        labelled = labels >= 0
        count = labelled.sum().clamp(min=1)  # an all-unlabelled batch gives loss 0, not NaN, and no host sync
        loss = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / count
        correct = ((logits.argmax(1) == labels) & labelled).sum()
        return loss, {"online_loss": loss.detach(), "online_acc1": (correct / count).detach()}
