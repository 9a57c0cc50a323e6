"""Process group and DeepSpeed engine construction: the order of the steps is what matters here.

1. The distributed environment is resolved once (pipeline.distributed) and handed to deepspeed.init_distributed:
   gloo on the CPU, NCCL on CUDA.
2. BatchNorm becomes SyncBatchNorm BEFORE deepspeed.initialize, which flattens and partitions the parameters of
   the modules it is given: converting afterwards would create parameters DeepSpeed does not manage. Which ranks
   share the statistics: pipeline/engine/batchnorm_groups.py.
3. The client optimizer and schedule are built on the module's own parameters, then handed to initialize.
4. LARS learns the partition layout of the flat tensors DeepSpeed will step it with (zero_layout).
5. The engine's checkpoint reader is swapped for the weights-only one (safe_load).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from datetime import timedelta

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.device import pick, prepare_deepspeed
from pipeline.distributed import DistEnv, export
from pipeline.engine.batchnorm_groups import check_batchnorm_device, sync_batchnorm
from pipeline.engine.ds_config import build_ds_config
from pipeline.engine.lars import LARS
from pipeline.engine.optimizers import build_optimizer
from pipeline.engine.safe_load import SafeCheckpointEngine
from pipeline.engine.schedule import WarmupSchedule
from pipeline.engine.zero_layout import attach_layouts


@dataclass(frozen=True)
class BatchGeometry:
    global_batch: int  # samples per optimizer step, all ranks together
    world_size: int
    grad_accum_steps: int

    @property
    def micro_batch(self) -> int:
        """Samples per rank per forward pass."""
        return self.global_batch // (self.world_size * self.grad_accum_steps)

    def check(self) -> "BatchGeometry":
        if self.global_batch % (self.world_size * self.grad_accum_steps) or self.micro_batch < 1:
            raise ValueError(f"data.batch_size={self.global_batch} is not a multiple of world size "
                             f"{self.world_size} x deepspeed.grad_accum_steps {self.grad_accum_steps}")
        return self


def init_distributed(env: DistEnv, timeout_s: float, device_kind: str = "auto") -> torch.device:
    """Start the process group described by `env` (idempotent) and return this rank's device (pipeline/device.py).
    A collective that waits longer than `timeout_s` (a peer died) raises instead of hanging for torch's default 30
    minutes."""
    device = pick(device_kind, env.local_rank)
    prepare_deepspeed(device)
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        export(env)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # DeepSpeed prints "... built successfully" on every start
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                       timeout=timedelta(seconds=timeout_s),
                                       auto_mpi_discovery=False, rank=env.rank, world_size=env.world_size)
        print("".join(line for line in printed.getvalue().splitlines(keepends=True)
                      if not line.endswith("built successfully\n")), end="", flush=True)
    return device


def build_engine(cfg: DictConfig, model: nn.Module, geometry: BatchGeometry, total_steps: int, warmup_steps: int,
                 device: torch.device):
    """(engine, client optimizer, schedule) for `model` under cfg.deepspeed / cfg.optimizer / cfg.schedule."""
    import deepspeed

    groups = check_batchnorm_device(cfg.deepspeed, geometry.world_size, device)
    if max(map(len, groups)) > 1:
        model = sync_batchnorm(model, groups, cfg.dist.timeout_s)
    model = model.to(device)
    optimizer = build_optimizer(cfg.optimizer, model)
    schedule = WarmupSchedule(optimizer, cfg.schedule.name, total_steps, warmup_steps,
                              cfg.schedule.warmup_start_factor, cfg.schedule.final_factor)
    ds_config = build_ds_config(cfg.deepspeed, geometry.micro_batch, geometry.world_size,
                                fp32_gradients=isinstance(optimizer, LARS))
    engine, wrapped, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                 config=ds_config, dist_init_required=False)
    if isinstance(optimizer, LARS):
        attach_layouts(wrapped, optimizer)
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    return engine, optimizer, schedule
