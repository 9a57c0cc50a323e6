"""BatchNorm statistics shared within groups of consecutive ranks (`deepspeed.sync_batchnorm_group`): which ranks
group together, that each rank's SyncBatchNorm layers hold its own group (4 gloo ranks), and that a run whose ranks
share nothing keeps plain BatchNorm, so that it trains on the CPU."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from pipeline.engine.batchnorm_groups import batchnorm_groups, batchnorm_scope
from tests.helpers import REPO
from tests.helpers.torchrun import environment, run_ranks

WORKER = REPO / "tests" / "helpers" / "batchnorm_group_worker.py"


def ds(sync: bool, group: int):
    return OmegaConf.create({"sync_batchnorm": sync, "sync_batchnorm_group": group})


@pytest.mark.parametrize("sync, group, world, expected", [
    (True, 0, 4, [[0, 1, 2, 3]]),
    (True, 2, 4, [[0, 1], [2, 3]]),
    (True, 4, 6, [[0, 1, 2, 3], [4, 5]]),  # an elastic run down to 6 ranks: the last group is smaller
    (True, 8, 3, [[0, 1, 2]]),
    (True, 1, 3, [[0], [1], [2]]),
    (False, 0, 3, [[0], [1], [2]]),
    (True, 0, 1, [[0]]),
])
def test_groups_are_consecutive_ranks(sync, group, world, expected):
    assert batchnorm_groups(ds(sync, group), world) == expected


@pytest.mark.slow
def test_each_rank_synchronises_batchnorm_within_its_own_group(tmp_path):
    run_ranks(WORKER, 4, str(tmp_path), timeout=240)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r, rank in enumerate(seen):
        assert rank["group_ranks"] == ([0, 1] if r < 2 else [2, 3])
        assert rank["group_sum"] == (0 + 1 if r < 2 else 2 + 3)  # an all_reduce over the layers' group
        assert rank["sync_layers"] == rank["batchnorm_layers"] > 0
        assert rank["all_ranks"] == [None]  # group 0: the layers use the default (world) group


def test_one_cpu_rank_trains_with_sync_batchnorm_on(shards, tmp_path):
    """The ImageNet presets turn sync_batchnorm on; with nothing to share, a one-process CPU run used to fail in the
    first forward ("SyncBatchNorm expected input tensor to be on GPU"). Its 8 samples a step are too few for
    BatchNorm, which the log says."""
    args = ["experiment=smoke", "method=aag", f"data.root={shards}", f"run_dir={tmp_path}", "logger=none",
            "logger.progress_bar=false", "monitor.knn_every_epochs=0", "max_steps=2", "checkpoint.every_steps=0",
            "deepspeed.sync_batchnorm=true", "data.batch_size=8"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=environment(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "training done at step 2/2" in proc.stdout and "BatchNorm per rank (8 samples)" in proc.stdout
    assert "BatchNorm statistics come from 8 samples per forward pass: few enough to hurt training" in proc.stdout


@pytest.mark.parametrize("groups, per_node, words", [
    ([[0], [1]], 1, "BatchNorm per rank (32 samples)"),
    ([[0, 1, 2, 3]], 4, "SyncBatchNorm over all 4 ranks (128 samples)"),
    ([[0, 1, 2, 3]], 2, "SyncBatchNorm over all 4 ranks (128 samples, 2 nodes)"),
    ([[0, 1], [2, 3]], 2, "SyncBatchNorm in 2 groups of 2 ranks (64 samples each)"),
    ([[0, 1, 2, 3], [4, 5]], 4, "SyncBatchNorm in 2 groups of 4 ranks, the last of 2 (128 samples each)"),
    ([list(range(8)), list(range(8, 16))], 4, "SyncBatchNorm in 2 groups of 8 ranks (256 samples each, 2 nodes "
                                              "each)"),  # the presets' groups of 8 on 4-GPU nodes
    ([[0, 1, 2, 3], [4, 5, 6, 7]], 6, "SyncBatchNorm in 2 groups of 4 ranks (128 samples each, some across 2 "
                                      "nodes)"),  # 6-GPU nodes: ranks 4-5 on one, 6-7 on the next
])
def test_the_banner_says_which_ranks_share_statistics(groups, per_node, words):
    assert batchnorm_scope(groups, per_node, micro_batch=32) == words
