"""One rank of tests/engine/test_batchnorm_groups.py (torchrun, gloo): converts a small model's BatchNorm layers for
groups of 2 and of all ranks, and writes what each rank's layers hold to OUT/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from pipeline.engine.batchnorm_groups import batchnorm_groups, sync_batchnorm


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 4),
                         nn.BatchNorm1d(4))


def sync_layers(m: nn.Module) -> list[nn.SyncBatchNorm]:
    return [layer for layer in m.modules() if isinstance(layer, nn.SyncBatchNorm)]


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def groups(size: int) -> list[list[int]]:
        return batchnorm_groups(OmegaConf.create({"sync_batchnorm": True, "sync_batchnorm_group": size}), world)

    pairs = sync_layers(sync_batchnorm(model(), groups(2), timeout_s=60))
    group = pairs[0].process_group
    total = torch.tensor([rank])
    dist.all_reduce(total, group=group)
    result = {
        "group_ranks": dist.get_process_group_ranks(group),
        "group_sum": int(total),
        "sync_layers": sum(layer.process_group is group for layer in pairs),
        "batchnorm_layers": 2,
        "all_ranks": list({layer.process_group for layer in sync_layers(sync_batchnorm(model(), groups(0), 60))}),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
