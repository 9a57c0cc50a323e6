"""Which device a process computes on: one answer for the trainer, the loader, DeepSpeed and evaluation.

`device` (top of the train and evaluate configs) is `auto` (CUDA when torch sees a CUDA device, else the CPU), `cpu`
or `cuda`; the environment variable AUGSSL_DEVICE, when set, overrides it (the test suite sets it to `cpu` so that
it runs unchanged on a GPU machine). On CUDA each process takes the GPU of its local rank, which must exist. DeepSpeed
picks its accelerator once, when it is first imported, from DS_ACCELERATOR, so that is set here before that import
(`pipeline.train` resolves the device before it imports the trainer).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

ENV = "AUGSSL_DEVICE"
KINDS = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """The device asked for is not there."""


def requested(configured: str) -> str:
    """The device kind asked for: AUGSSL_DEVICE if set, else the config's."""
    kind = os.environ.get(ENV) or configured
    if kind not in KINDS:
        source = ENV if os.environ.get(ENV) else "device"
        raise DeviceError(f"{source}={kind!r}: choose one of {', '.join(KINDS)}")
    return kind


def resolve_device(configured: str = "auto", local_rank: int = 0) -> torch.device:
    """The device a process of this local rank would compute on, without making it current: a launcher checks its
    ranks' devices with it before it starts them."""
    kind = requested(configured)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("device=cuda, but torch sees no CUDA device (a CPU-only torch build, no driver, or "
                          "CUDA_VISIBLE_DEVICES empty); use device=cpu or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"local rank {local_rank} needs cuda:{local_rank}, but this node has {count} CUDA "
                          f"device(s): start at most {count} process(es) per node (torchrun --nproc-per-node, "
                          "srun --ntasks-per-node/--gpus-per-task) or use device=cpu")
    return torch.device("cuda", local_rank)


def pick(configured: str = "auto", local_rank: int = 0) -> torch.device:
    """This process's device; on CUDA also makes it the current one."""
    device = resolve_device(configured, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # a run's input shapes are fixed: cuDNN's autotuned kernels pay off
    return device


class _CompilerProbeFilter(logging.Filter):
    """Drops distutils' compiler command lines: DeepSpeed compiles a test program (is libaio there?) when it first
    looks at its ops, and distutils logs each gcc call at INFO, which the entry points' log handlers print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "distutils" not in record.pathname


def prepare_deepspeed(device: torch.device) -> None:
    """Make DeepSpeed use the accelerator of `device` (it would take CUDA whenever it sees one), and keep the
    compiler lines of its import off the console."""
    for handler in logging.getLogger().handlers:  # distutils' loggers propagate to these
        if not any(isinstance(f, _CompilerProbeFilter) for f in handler.filters):
            handler.addFilter(_CompilerProbeFilter())
    wanted = "cuda" if device.type == "cuda" else "cpu"
    if "deepspeed" not in sys.modules:
        os.environ["DS_ACCELERATOR"] = wanted
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != wanted:
        raise DeviceError(f"DeepSpeed was imported with its {get_accelerator().device_name()} accelerator before "
                          f"the device ({device}) was chosen; set DS_ACCELERATOR={wanted}")
