"""Weighted k-nearest-neighbour classification of frozen features, the InstDisc protocol (Wu et al., 2018): cosine
similarities, the K = 200 nearest bank entries each vote for their class with weight exp(sim / tau), tau = 0.1.

`knn` evaluates a finished encoder in one process, in float32. `KNNMonitor` is the same protocol as a signal while
the encoder trains, on a bank sharded across ranks so that it fits beside the training state.

Memory of the monitor per rank, ImageNet with ResNet-50 features (d = 2048) on 8 ranks (`tools/knn_memory.py`
computes it for any sizes): the bank share, L2-normalised in fp16, 160,146 x 2048 x 2 B = 0.66 GB, twice that while
its per-batch pieces are concatenated once (1.34 GB with the queries: the peak); its 6,250 queries 26 MB; per chunk
of queries the gathered chunk (8 x 128) x 2048 x 2 B = 4 MB, the similarity matrix (8 x 128) x 160,146 x 2 B =
0.33 GB (world x chunk_size rows by the share's rows: chunk_size x bank rows whatever the world size) and the top-k
candidates of every rank, 42 MB; 1.06 GB while searching. The fp32 bank gathered onto every rank took 10.5 GB.
torch.topk on CUDA selects by radix and does not sort the rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pipeline.distributed import all_reduce_sum, gather_variable, is_distributed
from pipeline.evaluation.accuracy import topk_accuracy
from pipeline.losses import at_least_fp32


def _votes(sim: Tensor, labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Class scores (Q, num_classes) from each query's nearest similarities (Q, k) and their labels: the sum of
    exp(sim / temperature) per class (a -inf similarity, padding, weighs 0)."""
    (sim,) = at_least_fp32(sim)
    weights = (sim / temperature).exp()
    votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return votes.scatter_add_(1, labels, weights)


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
        scores.append(_votes(sim, bank_labels[idx], num_classes, temperature))
    return torch.cat(scores)


def knn(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], num_classes: int, k: int = 200,
        temperature: float = 0.1) -> dict[str, float]:
    """Top-1 and top-5 accuracy of the test features against the training features as the bank."""
    scores = knn_scores(test[0], train[0], train[1], num_classes, k=k, temperature=temperature)
    return topk_accuracy(scores, test[1])


class KNNMonitor:
    """Accumulates a feature bank and queries over an evaluation pass, then reports weighted-kNN accuracy.

    Under torch.distributed each rank adds its own share of both, and the bank stays sharded: each rank keeps its
    rows L2-normalised in `bank_dtype`. Queries go round in chunks: every rank contributes up to `chunk_size` of its
    queries, the chunk is gathered to all ranks, each rank finds the k most similar rows of its share (values and
    labels), and those per-rank candidates are gathered so that each rank merges the global top-k of its own queries
    and votes as `knn` does. The global k nearest are among the union of every rank's k nearest, so only the
    rounding of the similarities (fp16: under 1.5e-3) separates the result from `knn` on the gathered bank.
    Ranks may hold different numbers of bank rows and queries, including none; every rank returns the global
    accuracy. Memory per rank: the module docstring.
    """

    def __init__(self, num_classes: int, k: int = 200, temperature: float = 0.1, chunk_size: int = 128,
                 bank_dtype: torch.dtype = torch.float16):
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.chunk_size, self.bank_dtype = chunk_size, bank_dtype
        self.reset()

    def reset(self) -> None:
        self._bank: list[Tensor] = []
        self._bank_labels: list[Tensor] = []
        self._queries: list[Tensor] = []
        self._query_labels: list[Tensor] = []

    def _compact(self, features: Tensor) -> Tensor:
        return F.normalize(features.detach().float(), dim=1).to(self.bank_dtype)

    @torch.no_grad()
    def add_bank(self, features: Tensor, labels: Tensor) -> None:
        keep = labels >= 0
        self._bank.append(self._compact(features[keep]))
        self._bank_labels.append(labels[keep])

    @torch.no_grad()
    def add_queries(self, features: Tensor, labels: Tensor) -> None:
        self._queries.append(self._compact(features))
        self._query_labels.append(labels)

    @torch.no_grad()
    def scores(self) -> tuple[Tensor, Tensor]:
        """(class scores of this rank's queries against the bank of all ranks (Q, num_classes), their labels)."""
        self._bank, self._bank_labels = [torch.cat(self._bank)], [torch.cat(self._bank_labels)]  # pieces freed
        (bank,), (bank_labels,) = self._bank, self._bank_labels
        queries, query_labels = torch.cat(self._queries), torch.cat(self._query_labels)
        rows = gather_variable(torch.tensor([[bank.shape[0], queries.shape[0]]], device=bank.device))  # (world, 2)
        world, rank = rows.shape[0], dist.get_rank() if is_distributed() else 0
        k, local_k = min(self.k, int(rows[:, 0].sum())), min(self.k, bank.shape[0])
        out = []
        for start in range(0, int(rows[:, 1].max()), self.chunk_size):
            sizes = (rows[:, 1] - start).clamp(0, self.chunk_size).tolist()  # each rank's queries in this chunk
            chunk = gather_variable(queries[start : start + self.chunk_size])
            sim, idx = (chunk @ bank.T).topk(local_k, dim=1)
            values = sim.float().new_full((chunk.shape[0], k), float("-inf"))  # a short share pads with -inf
            labels = bank_labels.new_zeros((chunk.shape[0], k))
            values[:, :local_k], labels[:, :local_k] = sim, bank_labels[idx]
            # every rank's candidates for this rank's queries: (world, sizes[rank], k) -> (sizes[rank], world * k)
            mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            values, labels = (gather_variable(t).view(world, chunk.shape[0], k)[:, mine].transpose(0, 1)
                              .reshape(sizes[rank], world * k) for t in (values, labels))
            top, pos = values.topk(k, dim=1)
            out.append(_votes(top, labels.gather(1, pos), self.num_classes, self.temperature))
        scores = torch.cat(out) if out else bank.new_zeros((0, self.num_classes), dtype=torch.float32)
        return scores, query_labels

    @torch.no_grad()
    def compute(self) -> float:
        """Global top-1 accuracy, the same on every rank."""
        scores, labels = self.scores()
        counts = torch.stack([(scores.argmax(1) == labels).sum(), torch.tensor(labels.numel(), device=labels.device)])
        correct, total = all_reduce_sum(counts).tolist()
        return correct / max(total, 1)
