"""tools/sync_wandb.py on real W&B offline runs: an attempt killed after its checkpoint logged steps that the next
attempt re-did; merged, every step is there once, with the values of the attempt that survived, and what
pipeline.evaluate wrote into the run's summary afterwards (a figure and the t-SNE image) is there too."""

import time

import numpy as np
import wandb
from omegaconf import OmegaConf
from PIL import Image

from tools.sync_wandb import history, main, records, summary

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
    evaluated = wandb.init(project="augssl", id="sync1", dir=str(tmp_path), mode="offline", resume="allow",
                           settings=wandb.Settings(**SETTINGS))  # as pipeline.evaluate's wandb_summary does
    tsne = np.zeros((16, 16, 3), np.uint8)
    tsne[4:12, 4:12] = (200, 30, 30)
    evaluated.summary.update({"eval/aasae/top1": 0.875, "eval/tsne": wandb.Image(tsne)})
    evaluated.finish()
    assert main([str(tmp_path)]) == 0
    (merged,) = (tmp_path / "wandb-merged" / "wandb").glob("offline-run-*-sync1")
    rows = history(merged)
    assert [step for step, _ in rows] == list(range(1, 10))
    assert [values["loss"] for _, values in rows] == [1, 2, 3, 4.5, 5.5, 6.5, 7.25, 8.25, 9.25]
    values = summary(merged)
    assert values["eval/aasae/top1"] == 0.875 and values["loss"] == 9.25  # the history's own last value
    image = merged / "files" / values["eval/tsne"]["path"]
    assert values["eval/tsne"]["_type"] == "image-file" and image.is_file()
    assert np.array_equal(np.asarray(Image.open(image).convert("RGB")), tsne)


def test_a_folder_that_is_not_one_runs_offline_w_and_b_is_one_line_and_exit_2(tmp_path, capsys):
    """A mistyped run dir, a run dir holding another run's folders, or W&B folders without the run's config: one
    line naming the folder and why, exit 2 (bad input, as every augssl command), nothing written."""
    assert main([str(tmp_path / "typo")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"sync_wandb: no offline W&B runs in {tmp_path / 'typo' / 'wandb'}"
                                                    " (is it the run directory?)"]
    attempt(tmp_path, [1], 0.0)  # no config.yaml beside it
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"sync_wandb: {tmp_path} has W&B runs but no config.yaml: "
                                                    "not a run directory of pipeline.train"]
    (tmp_path / "config.yaml").write_text("logger: [unclosed\n")
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"sync_wandb: run dir {tmp_path}: config.yaml cannot be read: ")
    OmegaConf.save({"experiment_name": "x", "logger": {"project": "augssl", "entity": None}}, tmp_path / "config.yaml")
    wandb.init(project="augssl", id="other2", dir=str(tmp_path), mode="offline",
               settings=wandb.Settings(**SETTINGS)).finish()
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"sync_wandb: {tmp_path / 'wandb'} holds runs of several ids "
                                                    "['other2', 'sync1']: one run dir is one W&B run"]
    assert not (tmp_path / "wandb-merged").exists()


def test_a_wandb_file_cut_off_mid_record_reads_up_to_its_last_whole_record(tmp_path):
    """A run killed while writing, or a file still being flushed, ends inside a chunk: the records before it are
    read, the cut one is not, and nothing raises."""
    attempt(tmp_path, range(1, 4), 0.0)
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    whole = records(log)
    data = log.read_bytes()
    for cut in (1, 5, 40):
        log.write_bytes(data[:-cut])
        read = records(log)
        assert len(whole) - 3 <= len(read) < len(whole) and read == whole[: len(read)], cut
