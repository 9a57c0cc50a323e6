"""The client optimizer handed to deepspeed.initialize, built from cfg.optimizer.

Parameters are split into two groups: weights, and "bias and norm" parameters (every parameter with ndim <= 1:
biases, BatchNorm/LayerNorm scales and shifts). With `exclude_bias_and_norm` the second group gets no weight decay
and, under LARS, no trust-ratio adaptation (the large-batch self-supervised practice: decaying a BN scale towards 0
fights the normalisation, and a trust ratio on a bias is meaningless). DeepSpeed flattens each group separately, so
group options survive ZeRO partitioning.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from pipeline.engine.lars import LARS

OPTIMIZERS = ("adam", "adamw", "sgd", "lars")


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool) -> list[dict]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not exclude_bias_and_norm:
        return [{"params": trainable, "weight_decay": weight_decay}]
    weights = [p for p in trainable if p.ndim > 1]
    others = [p for p in trainable if p.ndim <= 1]
    groups = [{"params": weights, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0,
                                                                  "lars": False}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """cfg: the `optimizer` node (pipeline.config.schema.OptimizerConfig)."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={cfg.name!r}; choose from {OPTIMIZERS}")
    groups = param_groups(model, cfg.weight_decay, cfg.exclude_bias_and_norm)
    if cfg.name != "lars":
        for g in groups:
            g.pop("lars", None)  # the per-group switch only LARS knows
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                trust_coefficient=cfg.trust_coefficient)
