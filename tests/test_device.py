"""Device choice: `device` (train/evaluate config) or AUGSSL_DEVICE picks it, a device that is not there is one clear
line and exit 2, and DeepSpeed is made to use the same accelerator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.device import DeviceError, pick, requested
from tests.helpers import REPO


def test_the_environment_overrides_the_config(monkeypatch):
    monkeypatch.setenv("AUGSSL_DEVICE", "cpu")
    assert requested("cuda") == "cpu" and pick("cuda") == torch.device("cpu")
    monkeypatch.delenv("AUGSSL_DEVICE")
    assert requested("cpu") == "cpu"
    monkeypatch.setenv("AUGSSL_DEVICE", "tpu")
    with pytest.raises(DeviceError, match="AUGSSL_DEVICE='tpu': choose one of auto, cpu, cuda"):
        pick("auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_auto_is_the_cpu_and_cuda_is_refused_without_a_gpu(monkeypatch):
    monkeypatch.delenv("AUGSSL_DEVICE")
    assert pick("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="torch sees no CUDA device"):
        pick("cuda")


def test_a_local_rank_beyond_the_nodes_gpus_is_refused(monkeypatch):
    """What a 2-rank job on a 1-GPU node meets (the device count is simulated: this machine may have none)."""
    monkeypatch.delenv("AUGSSL_DEVICE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"local rank 1 needs cuda:1, but this node has 1 CUDA device\(s\)"):
        pick("cuda", local_rank=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_with_a_missing_device_is_one_line_and_exit_2(shards, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("AUGSSL_DEVICE", "DS_ACCELERATOR")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "experiment=smoke", f"data.root={shards}",
                           f"run_dir={tmp_path / 'run'}", "logger=none", "device=cuda"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("pipeline.train: device=cuda, but torch sees no CUDA")
    assert "Traceback" not in proc.stderr
