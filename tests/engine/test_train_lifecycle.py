"""`python -m pipeline.train` as a job scheduler sees it, one process on real digits shards with W&B offline:
SIGTERM and SIGUSR1 checkpoint and exit 0, the next start resumes the same W&B run, a corrupt newest checkpoint
falls back to the previous one with a warning, a non-finite loss stops with status 3 naming the step and the last
good checkpoint, and a mistyped key stops before anything starts. Each outcome is also in run_dir/status.json."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from pipeline.engine.checkpoint import Checkpoints
from pipeline.engine.run_status import read_status
from pipeline.engine.safe_load import safe_load
from tests.helpers import REPO
from tests.helpers.torchrun import environment


def train(shards, run_dir, *extra: str) -> subprocess.Popen:
    args = ["experiment=smoke", "method=aasae", "method.hidden_dim=64", f"data.root={shards}", f"run_dir={run_dir}",
            "logger.progress_bar=false", "logger.log_every_steps=1", "logger.image_every_steps=2",
            "monitor.knn_every_epochs=0", "checkpoint.every_steps=2", "max_steps=200", *extra]
    env = {**environment(), "WANDB_SILENT": "true"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(line)["step"] for line in path.read_text().splitlines()), default=0)


def signal_after(proc: subprocess.Popen, run_dir: Path, step: int, signum: int) -> str:
    deadline = time.time() + 240
    while steps_logged(run_dir) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    return out


def image_steps(run_dir: Path, run_id: str) -> list[list[int]]:
    """Per attempt (its offline W&B folder, oldest first): the steps of the reconstruction grids it logged, each a
    grid of the three labelled rows (original, encoder input, reconstruction) of 32-pixel digits."""
    attempts = []
    for folder in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}")):
        grids = sorted(folder.glob("files/media/images/reconstructions_*.png"))
        for grid in grids:
            assert Image.open(grid).height == 3 * 32
        attempts.append(sorted(int(p.name.split("_")[1]) for p in grids))
    return attempts


def newest_checkpoint(run_dir: Path) -> tuple[int, dict]:
    folder = sorted(run_dir.glob("checkpoints/step*/COMPLETE.json"))[-1].parent
    return int(folder.name[4:]), safe_load(str(folder / "mp_rank_00_model_states.pt"))


@pytest.mark.slow
def test_signals_checkpoint_and_exit_then_resume_the_same_wandb_run(shards, tmp_path):
    run_dir = tmp_path / "run"
    out = signal_after(train(shards, run_dir, "logger=wandb_offline"), run_dir, 3, signal.SIGTERM)
    assert "stop signal: checkpointing at step" in out
    first_step, first = newest_checkpoint(run_dir)
    status = read_status(run_dir)
    assert (status["status"], status["step"], status["reason"]) == ("stopped", first_step, "stop signal (SIGTERM)")
    assert first_step == steps_logged(run_dir) >= 3  # the checkpoint is of the step the signal interrupted
    run_id = first["wandb_run_id"]
    assert run_id and list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert image_steps(run_dir, run_id) == [list(range(0, first_step + 1, 2))]  # step 0, then every 2 steps

    out = signal_after(train(shards, run_dir, "logger=wandb_offline"), run_dir, first_step + 3, signal.SIGUSR1)
    assert f"resumed from {run_dir / 'checkpoints' / f'step{first_step:09d}'}" in out
    second_step, second = newest_checkpoint(run_dir)
    assert second_step > first_step and second["wandb_run_id"] == run_id
    resumed = image_steps(run_dir, run_id)[1]
    assert resumed and min(resumed) > first_step  # a resumed attempt draws no step-0 grid
    assert second["loader"]["position"] == second_step * 32  # global batch 32 per step, one epoch not yet done
    assert len(list(run_dir.glob("checkpoints/step*"))) == 3  # every 2 steps, the smoke preset's last 3 kept

    # A corrupt newest checkpoint (bytes overwritten inside its zip archive): the run warns and resumes from the
    # previous complete one instead.
    newest = run_dir / "checkpoints" / f"step{second_step:09d}" / "mp_rank_00_model_states.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    newest.write_bytes(bytes(data))
    previous = sorted(run_dir.glob("checkpoints/step*/COMPLETE.json"))[-2].parent
    # a shorter run than the one that wrote the checkpoints (max_steps shapes the schedule): on purpose, so forced
    proc = train(shards, run_dir, "logger=none", f"max_steps={second_step + 1}", "checkpoint.resume=force")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    assert f"checkpoint {newest.parent} is unusable" in out and "falling back to the previous one" in out
    assert f"resumed from {previous}" in out
    # moved aside: no longer one of the last 3 kept, and not mixed into the checkpoint of its step written again
    aside = newest.parent.parent / f"unusable-{newest.parent.name}"
    assert aside.is_dir() and f"moved aside to {aside}" in out
    kept = Checkpoints(run_dir, {}).complete_tags()
    assert len(kept) == 3 and all(Checkpoints(run_dir, {}).verify(tag) is None for tag in kept)


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "nan"
    proc = train(shards, run_dir, "logger=none", "optimizer=sgd", "optimizer.lr=1e6", "schedule.warmup_epochs=0",
                 "checkpoint.every_steps=1")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 3, out[-4000:]
    line = next(line for line in out.splitlines() if "non-finite loss at step" in line)
    step = int(line.split("non-finite loss at step ")[1].split()[0])
    good = Path(line.split("last good checkpoint: ")[1].strip())
    assert (good / "COMPLETE.json").is_file() and int(good.name[4:]) == step - 1
    assert not (run_dir / "checkpoints" / f"step{step:09d}").exists()  # nothing saved after the bad step
    status = read_status(run_dir)
    assert (status["status"], status["exit_code"], status["step"]) == ("failed", 3, step - 1), status
    assert status["reason"] == line[line.index("non-finite loss at step"):], status


@pytest.mark.slow
def test_a_run_that_reaches_its_last_step_writes_done(shards, tmp_path):
    """status.json, not the exported encoder, tells the launch wrappers that a run finished (export_encoder=false
    writes none); a later start of the finished run has nothing left to do and says "done" again."""
    run_dir = tmp_path / "done"
    outs = []
    for _ in range(2):
        proc = train(shards, run_dir, "logger=none", "max_steps=3", "export_encoder=false",
                     "logger.print_every_s=0.001")
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-4000:]
        outs.append(out)
        status = read_status(run_dir)
        assert (status["status"], status["step"], status["total_steps"], status["exit_code"]) == ("done", 3, 3, 0)
        assert status["attempt_started"] <= status["updated"]
    assert "resumed from" in out and not (run_dir / "encoder.safetensors").exists()

    # What a log file shows (stdout is a pipe here): the banner, plain progress lines (no bar, no carriage returns),
    # the end summary, and none of DeepSpeed's start-up noise.
    first, second = outs
    assert "augssl smoke_aasae: aasae, resnet_small on digits (train split 1438 samples)" in first
    assert "batch 32 = 32 per rank x 1 ranks x 1 accumulation; 45 steps per epoch, 3 steps" in first
    assert f"fresh start; run dir {run_dir}; W&B disabled" in first
    assert "resumed at step 3 (saved at world size 1)" in second
    lines = [line for line in first.splitlines() if line.startswith("step ") and " | " in line]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"], first[-3000:]
    assert all(" ssl_loss " in line and " img/s | data wait " in line and "| ETA " in line for line in lines)
    assert "\r" not in first
    assert "training done at step 3/3 after 0:00:" in first  # no encoder exported: no evaluate command
    for noise in ("gcc ", "built successfully", "Setting accelerator to CPU"):
        assert noise not in first + second, noise


def test_a_mistyped_key_stops_before_anything_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "experiment=smoke", "optimizer.lrr=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'optimizer.lrr'" in proc.stderr and "has the keys name, lr," in proc.stderr


def test_the_deepspeed_launchers_local_rank_argument_is_dropped():
    from pipeline.train import _drop_local_rank

    assert _drop_local_rank(["experiment=smoke", "--local_rank=3", "seed=1", "--local_rank", "4"]) == [
        "experiment=smoke", "seed=1"]


@pytest.mark.slow
def test_flags_agreed_every_few_steps_still_name_the_first_non_finite_step(shards, tmp_path):
    """dist.check_every_steps=4: the host does not wait for each step, yet the error names the first step whose loss
    was non-finite, and no checkpoint holds weights a non-finite loss went into."""
    run_dir = tmp_path / "nan_every_4"
    proc = train(shards, run_dir, "logger=none", "optimizer=sgd", "optimizer.lr=1e6", "schedule.warmup_epochs=0",
                 "checkpoint.every_steps=8", "dist.check_every_steps=4")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 3, out[-4000:]
    line = next(line for line in out.splitlines() if "non-finite loss at step" in line)
    step = int(line.split("non-finite loss at step ")[1].split()[0])
    metrics = [json.loads(row) for row in (run_dir / "metrics.jsonl").read_text().splitlines()]
    finite_steps = [r["step"] for r in metrics if math.isfinite(float(r.get("ssl_loss", "nan")))]
    assert step == max(finite_steps, default=0) + 1  # the first non-finite one, though found up to 3 steps later
    saved = [int(p.parent.name[4:]) for p in run_dir.glob("checkpoints/step*/COMPLETE.json")]
    assert all(s < step for s in saved)
