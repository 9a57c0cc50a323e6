"""Which ranks share BatchNorm statistics (`deepspeed.sync_batchnorm`, `deepspeed.sync_batchnorm_group`): groups of
consecutive ranks, so that a group of one node's GPUs keeps SyncBatchNorm's two collectives per layer off the network
(torchrun and Slurm's default block distribution number a node's processes consecutively). Checked before the
process group starts: torch has no CPU SyncBatchNorm."""

from __future__ import annotations

from datetime import timedelta

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.config.checks import ConfigError

# below this many samples per forward pass BatchNorm's batch statistics are noisy enough to hurt training (Wu & He,
# "Group Normalization": ResNet-50's error rises steeply below 16 images per BatchNorm). Counted in samples, as the
# trainer knows no method: one whose views go through the encoder together (3 views: 3 images a sample) has more
MIN_BATCHNORM_SAMPLES = 16


def batchnorm_groups(ds: DictConfig, world_size: int) -> list[list[int]]:
    """The ranks that share BatchNorm statistics: consecutive ranks in groups of `ds.sync_batchnorm_group` (0: all
    ranks; the last group may be smaller), or every rank alone without `ds.sync_batchnorm`."""
    size = (ds.sync_batchnorm_group or world_size) if ds.sync_batchnorm else 1
    return [list(range(first, min(first + size, world_size))) for first in range(0, world_size, size)]


def check_batchnorm_device(ds: DictConfig, world_size: int, device: torch.device) -> list[list[int]]:
    """The BatchNorm groups (batchnorm_groups), or ConfigError where ranks would share statistics off CUDA: torch
    has no CPU SyncBatchNorm. The trainer asks before it starts the process group or anything slow."""
    groups = batchnorm_groups(ds, world_size)
    if device.type != "cuda" and max(map(len, groups)) > 1:
        raise ConfigError(f"deepspeed.sync_batchnorm=true: {world_size} ranks on {device.type} would share BatchNorm "
                          "statistics, which needs CUDA devices (torch has no CPU SyncBatchNorm); set "
                          "deepspeed.sync_batchnorm=false or deepspeed.sync_batchnorm_group=1")
    return groups


def sync_batchnorm(model: nn.Module, groups: list[list[int]], timeout_s: float) -> nn.Module:
    """BatchNorm -> SyncBatchNorm over this rank's group. Every rank creates every group, in the same order, as
    torch.distributed.new_group requires; their collectives give up after `timeout_s` as the main group's do."""
    import torch.distributed as dist

    if len(groups) == 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    mine, _ = dist.new_subgroups_by_enumeration(groups, timeout=timedelta(seconds=timeout_s))
    return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=mine)


def batchnorm_scope(groups: list[list[int]], per_node: int, micro_batch: int) -> str:
    """Which ranks share BatchNorm statistics and over how many samples, in words, for the banner (`per_node`: ranks
    per node, numbered consecutively). A group that spans nodes is said: its collectives cross the network in every
    BatchNorm layer."""
    size = len(groups[0])
    if size == 1:
        return f"BatchNorm per rank ({micro_batch} samples)"
    spans = [len({rank // per_node for rank in group}) for group in groups]
    if len(groups) == 1:
        return f"SyncBatchNorm over all {size} ranks ({size * micro_batch} samples" + (
            f", {spans[0]} nodes)" if spans[0] > 1 else ")")
    across = ("" if max(spans) == 1 else f", {spans[0]} nodes each" if min(spans) == max(spans)
              else f", some across {max(spans)} nodes")
    smaller = f", the last of {len(groups[-1])}" if len(groups[-1]) < size else ""
    return f"SyncBatchNorm in {len(groups)} groups of {size} ranks{smaller} ({size * micro_batch} samples each{across})"
