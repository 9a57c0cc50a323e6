"""The kNN monitor's sharded fp16 bank at world size 2 (torchrun, gloo) against `knn_scores` on the gathered fp32 bank.

This file is also the worker: `torchrun --nproc_per_node 2 tests/evaluation/test_knn_sharded.py OUT` gives each rank
its share of a fixed bank and query set per scenario, runs KNNMonitor (bank kept on its rank in fp16, queries in
chunks of CHUNK) and saves each rank's class scores and reported accuracy. The test computes the scores in one
process on the whole bank in fp32. The data are chosen so that fp16 cannot change a neighbour set: for every query the
k-th and (k+1)-th similarities are further apart than fp16 rounding can move them, which the test checks first; the
class scores then agree to the rounding of the similarities (1e-2 relative), and top-1 and top-5 are identical.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from pipeline.evaluation.accuracy import topk_accuracy
from pipeline.evaluation.knn import KNNMonitor, knn_scores
from tests.helpers.torchrun import run_ranks

WORLD, CLASSES, DIM, K, CHUNK = 2, 10, 16, 8, 4
BANK, QUERIES = 40, 17
# name -> (bank rows of rank 0, queries of rank 0, k); rank 1 has the rest
SCENARIOS = {
    # rank 1: 5 bank rows, fewer than k; 6 queries, so none in the third chunk (rank 0: 4 + 4 + 3)
    "uneven": (35, 11, K),
    # rank 1 holds no bank row, rank 0 no query
    "empty": (BANK, 0, K),
    # k above the bank size: every labelled row votes, and the padding of short shares must not
    "whole_bank": (20, 9, 64),
}


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bank and queries around class centres, overlapping enough for about half the queries to be right; a few bank
    rows unlabelled (-1), which never vote. The seed is one whose neighbour sets fp16 cannot change."""
    g = torch.Generator().manual_seed(15)
    centres = torch.randn(CLASSES, DIM, generator=g)
    bank_labels, query_labels = torch.randint(0, CLASSES, (BANK,), generator=g), torch.randint(0, CLASSES, (QUERIES,),
                                                                                              generator=g)
    bank = centres[bank_labels] + 2 * torch.randn(BANK, DIM, generator=g)
    queries = centres[query_labels] + 2 * torch.randn(QUERIES, DIM, generator=g)
    bank_labels[::9] = -1
    return bank, bank_labels, queries, query_labels


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    bank, bank_labels, queries, query_labels = data()
    results = {}
    for name, (bank_split, query_split, k) in SCENARIOS.items():
        b = slice(0, bank_split) if rank == 0 else slice(bank_split, None)
        q = slice(0, query_split) if rank == 0 else slice(query_split, None)
        monitor = KNNMonitor(CLASSES, k=k, chunk_size=CHUNK)
        for piece in torch.arange(BANK)[b].tensor_split(2):  # in two batches, as from a loader
            monitor.add_bank(bank[piece], bank_labels[piece])
        monitor.add_queries(queries[q], query_labels[q])
        scores, _ = monitor.scores()
        results[name] = {"scores": scores, "accuracy": torch.tensor(monitor.compute())}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("knn")
    run_ranks(__file__, WORLD, str(out), timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_fp16_cannot_change_a_neighbour_set():
    """A cosine similarity of fp16-rounded unit vectors, rounded to fp16, is within 2 x 2^-11 (inputs, by
    Cauchy-Schwarz) + 2^-11 (output) < 1.5e-3 of the exact one, so a gap above 3e-3 between the k-th and the
    (k+1)-th cannot close."""
    bank, bank_labels, queries, _ = data()
    keep = bank_labels >= 0
    sims = (F.normalize(queries, dim=1) @ F.normalize(bank[keep], dim=1).T).sort(dim=1, descending=True).values
    assert (sims[:, K - 1] - sims[:, K]).min() > 3e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_sharded_monitor_equals_the_gathered_fp32_knn(ranks, name):
    bank, bank_labels, queries, query_labels = data()
    keep = bank_labels >= 0
    _, query_split, k = SCENARIOS[name]
    expected = knn_scores(queries, bank[keep], bank_labels[keep], CLASSES, k=k)
    got = [r[name]["scores"] for r in ranks]
    assert [len(s) for s in got] == [query_split, QUERIES - query_split]
    scores = torch.cat(got)
    assert_close(scores, expected, rtol=1e-2, atol=0)
    assert topk_accuracy(scores, query_labels) == topk_accuracy(expected, query_labels)
    top1 = topk_accuracy(expected, query_labels)["top1"]
    assert 0.2 < top1 < 0.8 and topk_accuracy(expected, query_labels)["top5"] < 1  # a wrong merge would show
    for result in ranks:
        assert result[name]["accuracy"].item() == pytest.approx(top1, abs=1e-12)


if __name__ == "__main__":
    worker(sys.argv[1])
    # Its results are written. Skip the interpreter's teardown: a gloo or DeepSpeed thread still joinable in a C++
    # destructor aborts the process now and then ("terminate called without an active exception", 2 CI runs of 9)
    os._exit(0)
