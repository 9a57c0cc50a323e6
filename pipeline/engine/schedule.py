"""Learning-rate schedules in optimizer steps: linear warmup, then cosine decay or constant.

A small scheduler of our own rather than torch's LambdaLR: DeepSpeed steps it once per optimizer step (not per
micro-batch) and saves `state_dict()` in every checkpoint, so its state must be plain numbers (checkpoints load
with weights_only=True) and resuming must restore the exact learning rate.

    lr(t) = peak * (s + (1 - s) * (t + 1) / W)                          t < W (warmup; s = warmup_start_factor)
    lr(t) = peak                                                         constant
    lr(t) = peak * (f + (1 - f) * (1 + cos(pi * (t - W) / (T - W))) / 2)  cosine (f = final_factor), t <= T
"""

from __future__ import annotations

import math

from torch.optim import Optimizer

SCHEDULES = ("cosine", "constant")


class WarmupSchedule:
    def __init__(self, optimizer: Optimizer, name: str, total_steps: int, warmup_steps: int,
                 warmup_start_factor: float = 0.0, final_factor: float = 0.0):
        if name not in SCHEDULES:
            raise ValueError(f"schedule.name={name!r}; choose from {SCHEDULES}")
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"schedule: need 0 <= warmup steps ({warmup_steps}) <= total steps ({total_steps})")
        self.optimizer, self.name = optimizer, name
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.warmup_start_factor, self.final_factor = warmup_start_factor, final_factor
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def factor(self, t: int) -> float:
        if t < self.warmup_steps:
            s = self.warmup_start_factor
            return s + (1 - s) * (t + 1) / self.warmup_steps
        if self.name == "constant":
            return 1.0
        progress = min(1.0, (t - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final_factor + (1 - self.final_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        f = self.factor(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * f

    def step(self, **_) -> None:
        """Called by DeepSpeed after each optimizer step: set the learning rate of the next one."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._apply()
