"""The one place where the trainer and the evaluator turn cfg.data into pipeline.data loaders.

cfg.data carries the loader's tuning fields under the loader's own names (pipeline/data/loader_config.py); which
split, which recipe, the per-rank batch, the seed and the order are decided per use by the caller.
"""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig

from pipeline.data.loader import ShardLoader
from pipeline.data.loader_config import LoaderConfig

PER_USE = ("manifest", "recipe", "batch_size", "seed", "shuffle")


def build_loader(data: DictConfig, manifest: str, recipe: str, batch_size: int, rank: int, world_size: int,
                 seed: int = 0, shuffle: bool = True) -> ShardLoader:
    tuning = {f.name: data[f.name] for f in dataclasses.fields(LoaderConfig)
              if f.name not in PER_USE and f.name in data}
    cfg = LoaderConfig(manifest=manifest, recipe=recipe, batch_size=batch_size, seed=seed, shuffle=shuffle, **tuning)
    return ShardLoader(cfg, rank, world_size)
