"""What the ranks must agree on before an update: a stop signal, a non-finite loss, too many unusable samples.

Agreeing takes one small all-reduce whose result the host must read, which makes it wait for the GPU to finish the
step. So the flags are recorded on the device at every step and agreed on every `every` steps (and wherever the
trainer must be sure: the last step, a checkpoint step), not per step. A non-finite loss is still named by its step:
each step of the window has its own slot. Steps between agreements may update the weights with a non-finite loss,
but no checkpoint is written before an agreement has cleared every step it holds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

CPU_EVERY, CUDA_EVERY = 1, 10


class NonFiniteLoss(RuntimeError):
    """A loss was NaN or infinite; training stopped without saving."""


class BadData(RuntimeError):
    """More samples of an epoch were unusable than data.max_bad_fraction allows; training stopped without saving."""


class StepChecks:
    def __init__(self, every: int, device: torch.device, split_size: int, max_bad_fraction: float,
                 last_good: Callable[[], Path | None]):
        self.every = every or (CUDA_EVERY if device.type == "cuda" else CPU_EVERY)
        self.split_size, self.max_bad_fraction, self.last_good = split_size, max_bad_fraction, last_good
        self.non_finite = torch.zeros(self.every, device=device)  # per step of the window: this rank's count
        self.steps: dict[int, tuple[int, int]] = {}  # step -> (epoch, batch) since the last agreement
        self.bad: Counter[int] = Counter()  # epoch -> unusable samples on this rank since the last agreement
        self.bad_seen: Counter[int] = Counter()  # epoch -> unusable samples on all ranks

    def record(self, step: int, loss: torch.Tensor, batch) -> None:
        """One micro-batch of `step`: device work only, nothing the host waits for."""
        self.non_finite[(step - 1) % self.every] += (~torch.isfinite(loss.detach())).float()
        self.steps.setdefault(step, (batch.epoch, batch.step))
        self.bad[batch.epoch] += batch.bad

    def agree(self, stop_requested: bool) -> bool:
        """Sums the flags over ranks (every rank calls it at the same step); raises on a non-finite loss or too many
        unusable samples, else returns whether any rank received a stop signal."""
        epochs = sorted(self.bad)
        host = torch.tensor([float(stop_requested), *(float(self.bad[e]) for e in epochs)])
        flags = torch.cat([host.to(self.non_finite.device), self.non_finite])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        values = flags.tolist()
        for epoch, count in zip(epochs, values[1 : 1 + len(epochs)]):
            self.bad_seen[epoch] += int(count)
            if self.bad_seen[epoch] > self.max_bad_fraction * self.split_size:
                raise BadData(f"{self.bad_seen[epoch]} unusable samples in epoch {epoch} of {self.split_size}, more "
                              f"than data.max_bad_fraction={self.max_bad_fraction} allows; the warnings above name "
                              "them: repair the shards (tools/make_shards.py --verify-only) or raise "
                              "data.max_bad_fraction")
        non_finite = values[1 + len(epochs) :]
        for step, (epoch, batch) in sorted(self.steps.items()):
            slot = (step - 1) % self.every
            if non_finite[slot]:
                where = "this rank" if self.non_finite[slot].item() else "another rank"
                last = self.last_good()
                raise NonFiniteLoss(f"non-finite loss at step {step} (epoch {epoch}, batch {batch}, seen on {where}); "
                                    f"last good checkpoint: {last if last is not None else 'none'}")
        self.non_finite.zero_()
        self.steps.clear()
        self.bad.clear()
        return bool(values[0])
