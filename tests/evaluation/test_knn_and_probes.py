"""Weighted kNN against a loop reference, and the kNN monitor on data whose answer is known."""

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from pipeline.evaluation.knn import KNNMonitor, knn_scores
from pipeline.evaluation.linear import OnlineLinearProbe


def ref_knn_scores(queries, bank, labels, num_classes, k, tau):
    out = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for q in range(len(queries)):
        sims = [(F.cosine_similarity(queries[q], bank[b], dim=0).item(), int(labels[b])) for b in range(len(bank))]
        for sim, label in sorted(sims, reverse=True)[:k]:
            out[q, label] += torch.exp(torch.tensor(sim / tau, dtype=torch.float64))
    return out


def test_knn_scores_match_the_loop_reference():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(40, 8, generator=g, dtype=torch.float64)
    queries = torch.randn(9, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,), generator=g)
    for k in (1, 5, 200):  # k above the bank size uses the whole bank
        scores = knn_scores(queries, bank, labels, 4, k=k, temperature=0.1, chunk_size=4)
        assert_close(scores, ref_knn_scores(queries, bank, labels, 4, k, 0.1))


def test_knn_monitor_on_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 16) * 10

    def sample(n):
        labels = torch.randint(0, 3, (n,), generator=g)
        return centres[labels] + torch.randn(n, 16, generator=g), labels

    monitor = KNNMonitor(num_classes=3, k=20)
    bank, bank_labels = sample(60)
    monitor.add_bank(bank, bank_labels)
    monitor.add_bank(torch.randn(5, 16), torch.full((5,), -1))  # unlabelled samples never vote
    monitor.add_queries(*sample(30))
    assert monitor.compute() == 1.0
    monitor.reset()
    monitor.add_bank(bank, bank_labels)
    monitor.add_queries(*sample(30))
    monitor.add_queries(bank[:3], (bank_labels[:3] + 1) % 3)  # 3 deliberately wrong labels
    assert monitor.compute() == 30 / 33


def test_online_linear_probe_learns_without_gradient_to_its_input():
    torch.manual_seed(0)
    features = torch.randn(64, 8, requires_grad=True)
    labels = (features[:, 0] > 0).long()
    probe = OnlineLinearProbe(8, 2)
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.5)
    for _ in range(50):
        loss, metrics = probe(features, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert features.grad is None
    assert metrics["online_acc1"] > 0.9
