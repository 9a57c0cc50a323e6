"""Checkpoint files are read with torch.load(weights_only=True): a checkpoint from someone else cannot run code.

DeepSpeed 0.19.8 reads its checkpoint files through `engine.checkpoint_engine.load`, whose torch implementation
passes weights_only=False. SafeCheckpointEngine replaces it on our engines. Its optimizer files hold four DeepSpeed
types besides tensors and containers; they are allow-listed by name, and the weights-only unpickler rebuilds them
from their fields (enum values, dataclass fields, plain attributes) without calling anything they name.

It also writes them through a Python file, so that a failed write (a full disk) keeps its errno in the exception
chain: torch's own file writer reports only "enforce fail at inline_container.cc".
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
# process-wide, not a safe_globals context: leaving a nested context would remove them from the enclosing one
torch.serialization.add_safe_globals(SAFE_GLOBALS)


def safe_load(path: str, map_location=None):
    return torch.load(path, map_location=map_location, weights_only=True)


@contextmanager
def weights_only_everywhere():
    """Make every torch.load inside weights-only, including DeepSpeed's universal-checkpoint converter and loader,
    which call torch.load(weights_only=False) directly rather than through the checkpoint engine."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # torch reads it at every load
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def torch_save(obj, path) -> None:
    """torch.save through a Python file (see the module docstring), in the zip format Checkpoints.verify checks."""
    with open(path, "wb") as f:
        torch.save(obj, f)


class SafeCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)

    def save(self, state_dict, path: str):
        torch_save(state_dict, path)
