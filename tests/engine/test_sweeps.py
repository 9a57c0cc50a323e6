"""Hyperparameter sweeps and re-runs as a user types them, `python -m pipeline.train` on real digits shards in a
scratch working directory: each point of a Hydra multirun trains in a run dir of its own, and a run dir is resumed
only by a command whose weight-shaping settings match the ones that made it (or with checkpoint.resume=force)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.engine.run_status import read_status
from tests.helpers.torchrun import environment

SMOKE = ["experiment=smoke", "method=aag", "logger=none", "logger.progress_bar=false", "max_steps=2",
         "monitor.knn_every_epochs=0"]


def train(cwd: Path, shards: str, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    env = {**environment(), "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "pipeline.train", *(["-m"] if multirun else []), *SMOKE,
                           f"data.root={shards}", *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_a_sweep_trains_each_point_in_a_run_dir_of_its_own(shards, tmp_path):
    proc = train(tmp_path, shards, "optimizer.lr=0.01,0.02", multirun=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.splitlines().count("training done") == 2 and "resumed" not in out, out[-4000:]
    sweep = tmp_path / "runs" / "multirun" / "smoke_aag"
    runs = [sweep / "optimizer.lr=0.01", sweep / "optimizer.lr=0.02"]
    assert sorted(sweep.iterdir()) == runs
    for run, lr in zip(runs, ("0.01", "0.02")):
        assert f"run_dir=runs/multirun/smoke_aag/optimizer.lr={lr}" in out
        assert f"lr: {lr}" in (run / "config.yaml").read_text()
    first, second = (load_file(str(run / "encoder.safetensors")) for run in runs)
    assert first.keys() == second.keys() and any(not torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def shared(shards, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A sweep whose jobs share the run_dir the user set: the first trains it at lr 0.01 (2 steps), the second, at
    lr 0.02, is refused."""
    cwd = tmp_path_factory.mktemp("shared")
    proc = train(cwd, shards, f"run_dir={cwd / 'run'}", "optimizer.lr=0.01,0.02", multirun=True)
    return cwd / "run", proc


@pytest.mark.slow
def test_a_run_dir_made_with_another_lr_is_refused_naming_both_values(shared):
    run, proc = shared
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.splitlines().count("training done") == 1 and "Traceback" not in proc.stdout + proc.stderr
    refusals = [line for line in proc.stderr.splitlines() if line.startswith("pipeline.train: ")]
    assert refusals == [f"pipeline.train: run_dir={run} holds a run made with other settings that shape the weights: "
                        "optimizer.lr=0.01 there, 0.02 now. Choose another run_dir, set the values it was made with, "
                        "or pass checkpoint.resume=force to continue its checkpoints with this command's settings on "
                        "purpose (e.g. more epochs, a lower lr after a divergence)"]
    assert json.loads((run / "experiment.json").read_text())["fingerprint"]["optimizer.lr"] == 0.01
    assert read_status(run)["status"] == "done"  # the refused job wrote nothing


@pytest.mark.slow
def test_force_resumes_with_the_changed_settings_and_records_them(shards, shared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(shared[0], run)
    proc = train(tmp_path, shards, f"run_dir={run}", "optimizer.lr=0.02", "max_steps=3", "checkpoint.resume=force",
                 "logger=wandb_offline")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert (f"run_dir={run}: checkpoint.resume=force: continuing its checkpoints with changed settings: "
            "max_steps=2 there, 3 now; optimizer.lr=0.01 there, 0.02 now") in out
    assert f"resumed from {run / 'checkpoints' / 'step000000002'}" in out and "training done" in out
    assert (read_status(run)["status"], read_status(run)["step"]) == ("done", 3)
    record = json.loads((run / "experiment.json").read_text())
    assert record["fingerprint"]["optimizer.lr"] == 0.02
    assert [entry["changed"] for entry in record["forced"]] == [{"max_steps": [2, 3], "optimizer.lr": [0.01, 0.02]}]
    (wandb_run,) = run.glob("wandb/offline-run-*/run-*.wandb")
    assert b"resume_forced" in wandb_run.read_bytes()  # the W&B run's config


@pytest.mark.slow
def test_settings_that_do_not_shape_the_weights_resume_silently(shards, shared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(shared[0], run)
    proc = train(tmp_path, shards, f"run_dir={run}", "optimizer.lr=0.01", "logger.log_every_steps=7",
                 "checkpoint.every_steps=9", "checkpoint.keep_last=5", "data.loader.prefetch=3", "dist.timeout_s=300")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"resumed from {run / 'checkpoints' / 'step000000002'}" in out and "training done" in out
    assert "checkpoint.resume=force" not in out and "other settings" not in out
