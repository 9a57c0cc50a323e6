"""tools/sync_wandb.py on real W&B offline runs: an attempt killed after its checkpoint logged steps that the next
attempt re-did; merged, every step is there once, with the values of the attempt that survived."""

import time

import wandb
from omegaconf import OmegaConf

from tools.sync_wandb import history, main

SETTINGS = dict(console="off", silent=True, disable_git=True, save_code=False)


def attempt(run_dir, steps, tag: float) -> None:
    run = wandb.init(project="augssl", id="sync1", dir=str(run_dir), mode="offline", resume="allow",
                     settings=wandb.Settings(**SETTINGS))
    for step in steps:
        run.log({"loss": step + tag}, step=step)
    run.finish()
    time.sleep(1.1)  # offline folders are named by the second they start


def test_attempts_merge_into_one_history_with_each_step_once(tmp_path):
    OmegaConf.save({"experiment_name": "x", "logger": {"project": "augssl", "entity": None}}, tmp_path / "config.yaml")
    attempt(tmp_path, range(1, 6), 0.0)  # checkpoint at 3, then killed after logging 4 and 5
    attempt(tmp_path, range(4, 8), 0.5)  # resumed from 3: re-does 4 and 5, killed after 7 (checkpoint at 6)
    attempt(tmp_path, range(7, 10), 0.25)  # resumed from 6
    assert main([str(tmp_path)]) == 0
    (merged,) = (tmp_path / "wandb-merged" / "wandb").glob("offline-run-*-sync1")
    rows = history(merged)
    assert [step for step, _ in rows] == list(range(1, 10))
    assert [values["loss"] for _, values in rows] == [1, 2, 3, 4.5, 5.5, 6.5, 7.25, 8.25, 9.25]
