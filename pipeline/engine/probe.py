"""Frozen-encoder evaluation protocols: weighted kNN and a linear probe, each reporting top-1 and top-5 accuracy.

kNN: the InstDisc/SimCLR protocol of pipeline.monitors (cosine similarity, k nearest training features vote with
weight exp(sim / T)). Linear probe: a linear classifier on the frozen encoder's pooled features, trained with SGD +
momentum and a cosine learning rate; features are standardised with the training split's mean and std (what a
BatchNorm without affine parameters in front of the classifier computes at test time, as in SimCLR's protocol).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.monitors import knn_scores


def topk_accuracy(scores: Tensor, labels: Tensor, ks=(1, 5)) -> dict[str, float]:
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {f"top{k}": hits[:, :k].any(1).float().mean().item() for k in ks}


def knn(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int, k: int = 200,
        temperature: float = 0.1) -> dict[str, float]:
    scores = knn_scores(test[0], train[0], train[1], num_classes, k=k, temperature=temperature)
    return topk_accuracy(scores, test[1])


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
