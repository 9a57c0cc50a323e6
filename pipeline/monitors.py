"""Online monitors: cheap signals of representation quality while the encoder trains.

- OnlineLinearProbe: a linear classifier on DETACHED pooled features, optimised alongside the method (its loss is
  added to the method's, but no gradient reaches the encoder), as in solo-learn.
- KNNMonitor: weighted k-nearest-neighbour top-1 accuracy of a labelled query set against a labelled feature bank,
  the InstDisc / SimCLR protocol: cosine similarities, the K = 200 nearest neighbours each vote for their class with
  weight exp(sim / tau), tau = 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distributed import all_reduce_sum, gather_variable


class OnlineLinearProbe(nn.Module):
    """Linear classifier trained on detached features. Label -1 (unlabelled, the shard format's UNLABELED) is ignored."""

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
