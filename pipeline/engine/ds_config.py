"""cfg.deepspeed (+ the batch geometry) -> the JSON-style dict deepspeed.initialize takes.

What this encodes beyond a transliteration (DeepSpeed 0.19.8):
- The client optimizer (Adam/SGD/LARS from pipeline/engine/optimizers.py) is not on DeepSpeed's list of ZeRO-tested
  optimizers: `zero_allow_untested_optimizer`. With ZeRO-Offload DeepSpeed would otherwise insist on its own CPU
  Adam: `zero_force_ds_cpu_optimizer: false`.
- bf16/fp16 cast parameters but leave buffers alone unless told; BatchNorm then gets bf16 activations with fp32
  running statistics and fails. `data_types.buffer_dtype` casts the buffers with the parameters.
- The batch geometry is given three ways (train_batch_size = micro * accumulation * world) so that DeepSpeed checks
  it against the world it finds.
- Checkpoint tags are validated across ranks (a rank that disagrees about the tag is an error, not a warning).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

PRECISIONS = {"fp32": None, "bf16": "bf16", "fp16": "fp16"}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_ds_config(cfg: DictConfig, micro_batch: int, world_size: int) -> dict:
    """cfg: the `deepspeed` node (pipeline.config.schema.DeepSpeedConfig), checked at composition."""
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
        conf["bf16"] = {"enabled": True}
    elif precision == "fp16":
        conf["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if PRECISIONS[precision]:
        conf["data_types"] = {"buffer_dtype": PRECISIONS[precision]}
    return _merge(conf, OmegaConf.to_container(cfg.extra, resolve=True))
