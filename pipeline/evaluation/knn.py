"""Weighted k-nearest-neighbour classification of frozen features, the InstDisc protocol (Wu et al., 2018): cosine
similarities, the K = 200 nearest bank entries each vote for their class with weight exp(sim / tau), tau = 0.1.

`knn` evaluates a finished encoder; `KNNMonitor` is the same protocol as a cheap signal while the encoder trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distributed import all_reduce_sum, gather_variable
from pipeline.evaluation.accuracy import topk_accuracy


@torch.no_grad()
def knn_scores(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores (Q, num_classes): sum of exp(cos_sim / temperature) over each query's k nearest bank entries of
    that class. Queries are processed in chunks so that the (chunk, bank) similarity matrix bounds the memory."""
    queries = F.normalize(queries, dim=1)
    bank = F.normalize(bank, dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for chunk in queries.split(chunk_size):
        sim, idx = (chunk @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        scores.append(votes.scatter_add_(1, bank_labels[idx], weights))
    return torch.cat(scores)


def knn(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int, k: int = 200,
        temperature: float = 0.1) -> dict[str, float]:
    """Top-1 and top-5 accuracy of the test features against the training features as the bank."""
    scores = knn_scores(test[0], train[0], train[1], num_classes, k=k, temperature=temperature)
    return topk_accuracy(scores, test[1])


class KNNMonitor:
    """Accumulates a feature bank and queries over an evaluation pass, then reports weighted-kNN top-1 accuracy.

    Under torch.distributed each rank adds its own share; `compute` gathers the bank from every rank, scores the
    local queries and sums the counts, so every rank returns the global accuracy.
    """

    def __init__(self, num_classes: int, k: int = 200, temperature: float = 0.1):
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.reset()

    def reset(self) -> None:
        self._bank: list[Tensor] = []
        self._bank_labels: list[Tensor] = []
        self._queries: list[Tensor] = []
        self._query_labels: list[Tensor] = []

    @torch.no_grad()
    def add_bank(self, features: Tensor, labels: Tensor) -> None:
        keep = labels >= 0
        self._bank.append(features[keep].detach().float())
        self._bank_labels.append(labels[keep])

    @torch.no_grad()
    def add_queries(self, features: Tensor, labels: Tensor) -> None:
        self._queries.append(features.detach().float())
        self._query_labels.append(labels)

    @torch.no_grad()
    def compute(self) -> float:
        bank = gather_variable(torch.cat(self._bank))
        bank_labels = gather_variable(torch.cat(self._bank_labels))
        queries, labels = torch.cat(self._queries), torch.cat(self._query_labels)
        scores = knn_scores(queries, bank, bank_labels, self.num_classes, self.k, self.temperature)
        counts = torch.stack([(scores.argmax(1) == labels).sum(), torch.tensor(labels.numel(), device=labels.device)])
        correct, total = all_reduce_sum(counts).tolist()
        return correct / max(total, 1)
