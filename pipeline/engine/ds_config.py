"""cfg.deepspeed (+ the batch geometry) -> the JSON-style dict deepspeed.initialize takes.

What this encodes beyond a transliteration (DeepSpeed 0.19.8):
- The client optimizer (Adam/SGD/LARS from pipeline/engine/optimizers.py) is not on DeepSpeed's list of ZeRO-tested
  optimizers: `zero_allow_untested_optimizer`. With ZeRO-Offload DeepSpeed would otherwise insist on its own CPU
  Adam: `zero_force_ds_cpu_optimizer: false`.
- `precision=bf16` is DeepSpeed's `torch_autocast` mode, not its `bf16` section: the module keeps fp32 parameters
  (the master weights) and fp32 buffers, and its forward runs under torch.autocast(bf16), so convolutions and
  matmuls compute in bf16 while BatchNorm accumulates its running statistics in fp32. The `bf16` section would cast
  the buffers with the parameters (`data_types.buffer_dtype`, which BatchNorm needs there), and a running mean kept
  in bf16 stops moving once 0.1 x (batch mean - running mean) is below half its spacing: 2-4 % short of the target
  (tests/engine/test_bf16_batchnorm.py). Gradients are fp32; DeepSpeed reduces those of convolutions and linear
  layers in bf16 unless LARS is used, whose trust ratios take norms of them: then every gradient is reduced in fp32
  (no lower-precision-safe modules, `communication_data_type: fp32`).
- `precision=fp16` is DeepSpeed's `fp16` section (dynamic loss scaling); it casts parameters but leaves buffers alone
  unless told, and BatchNorm then fails on fp16 activations with fp32 statistics: `data_types.buffer_dtype` casts
  the buffers with the parameters. Its gradients are reduced in fp16, LARS's too (DeepSpeed's CPU accelerator has no
  fp16, so nothing else could be tested here).
- The batch geometry is given three ways (train_batch_size = micro * accumulation * world) so that DeepSpeed checks
  it against the world it finds.
- Checkpoint tags are validated across ranks (a rank that disagrees about the tag is an error, not a warning).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from omegaconf import DictConfig, OmegaConf

# precision -> dtype of the module's parameters and buffers after deepspeed.initialize: what its inputs must be
MODULE_DTYPES = {"fp32": torch.float32, "bf16": torch.float32, "fp16": torch.float16}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The compute precision of the engine's forward, for calls into the module that bypass it (kNN features)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def build_ds_config(cfg: DictConfig, micro_batch: int, world_size: int, fp32_gradients: bool = False) -> dict:
    """cfg: the `deepspeed` node (pipeline.config.schema.DeepSpeedConfig), checked at composition. fp32_gradients:
    reduce every gradient in fp32 under bf16 (LARS)."""
    stage, precision = cfg.zero_stage, cfg.precision  # values and combinations: pipeline/config/checks.py

    zero: dict = {"stage": stage, "overlap_comm": cfg.overlap_comm, "reduce_bucket_size": cfg.reduce_bucket_size}
    if stage >= 1:
        zero["contiguous_gradients"] = True
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    conf: dict = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": micro_batch * cfg.grad_accum_steps * world_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": cfg.grad_clip,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed's own per-step prints would interleave
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Fail"},
    }
    if precision == "bf16":
        conf["torch_autocast"] = {"enabled": True, "dtype": "bf16"}
        if fp32_gradients:  # ZeRO 1-3 reduce by the modules' marks, ZeRO 0 by communication_data_type
            conf["torch_autocast"]["lower_precision_safe_modules"] = []
            conf["communication_data_type"] = "fp32"
    elif precision == "fp16":
        conf["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
        conf["data_types"] = {"buffer_dtype": "fp16"}
    return _merge(conf, OmegaConf.to_container(cfg.extra, resolve=True))
