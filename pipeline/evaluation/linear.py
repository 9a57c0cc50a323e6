"""Linear classifiers on frozen features.

- `linear_probe`: the evaluation protocol: a linear classifier on the frozen encoder's pooled features, trained with
  SGD + momentum and a cosine learning rate; features are standardised with the training split's mean and std (what
  a BatchNorm without affine parameters in front of the classifier computes at test time, as in the standard
  linear-evaluation protocol).
- `OnlineLinearProbe`: a linear classifier on DETACHED pooled features, optimised alongside a method while it trains
  (its loss is added to the method's, but no gradient reaches the encoder), as in solo-learn.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.evaluation.accuracy import topk_accuracy


def linear_probe(train_batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]], test: tuple[Tensor, Tensor],
                 num_classes: int, dim: int, epochs: int, lr: float, momentum: float, weight_decay: float,
                 stats: tuple[Tensor, Tensor], seed: int = 0) -> dict[str, float]:
    """train_batches(epoch) yields (features, labels) of one pass over the training split (precomputed or freshly
    augmented); stats = (mean, std) of the training features."""
    torch.manual_seed(seed)
    mean, std = stats
    head = nn.Linear(dim, num_classes).to(mean.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        for features, labels in train_batches(epoch):
            loss = F.cross_entropy(head((features - mean) / std), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        scores = head((test[0] - mean) / std)
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
