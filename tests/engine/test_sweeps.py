"""Hyperparameter sweeps and re-runs as a user types them, `python -m pipeline.train` on real digits shards in a
scratch working directory: each point of a Hydra multirun trains in a run dir of its own, and a run dir is resumed
only by a command whose weight-shaping settings match the ones that made it (or with checkpoint.resume=force)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO

SMOKE = ["experiment=smoke", "method=aag", "logger=none", "logger.progress_bar=false", "max_steps=2",
         "monitor.knn_every_epochs=0"]


def train(cwd: Path, shards: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pipeline.train", *args, *SMOKE, f"data.root={shards}"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_sweep_trains_each_point_in_a_run_dir_of_its_own(shards, tmp_path):
    proc = train(tmp_path, shards, "-m", "optimizer.lr=0.01,0.02")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("training done") == 2 and "resumed" not in out, out[-4000:]
    sweep = tmp_path / "runs" / "multirun" / "smoke_aag"
    runs = [sweep / "optimizer.lr=0.01", sweep / "optimizer.lr=0.02"]
    assert sorted(sweep.iterdir()) == runs
    for run, lr in zip(runs, ("0.01", "0.02")):
        assert f"run_dir=runs/multirun/smoke_aag/optimizer.lr={lr}" in out
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
    first, second = (load_file(str(run / "encoder.safetensors")) for run in runs)
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)
