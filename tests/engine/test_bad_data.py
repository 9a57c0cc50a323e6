"""Nothing bad is trained on: JPEG digits shards whose images are damaged in place (the shard files keep their
layout and index, as after a bad copy). Every image damaged: the run stops at once with exit 4 and says why, and
exports nothing. One image damaged (under data.max_bad_fraction): the run trains without it."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.helpers import REPO

RUN = ["experiment=smoke", "method=aasae", "method.hidden_dim=64", "logger=none", "logger.progress_bar=false",
       "monitor.knn_every_epochs=0", "checkpoint.every_steps=0", "data.batch_size=64"]


@pytest.fixture(scope="module")
def jpeg_digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jpeg_digits")
    subprocess.run([sys.executable, "tools/make_shards.py", "digits", "--format", "jpg", "--quality", "90", "--out",
                    str(out), "--quiet"], cwd=REPO, check=True, capture_output=True, timeout=300)
    return out


def damaged_copy(shards: Path, folder: Path, how_many: int | None) -> Path:
    """The shards with the first 3 bytes of `how_many` training images (all when None) zeroed in place."""
    folder.mkdir()
    damaged = 0
    for path in sorted(shards.iterdir()):
        (folder / path.name).write_bytes(path.read_bytes())
        if path.name.startswith("digits-train-") and path.suffix == ".tar":
            with tarfile.open(path) as tar:
                offsets = [m.offset_data for m in tar.getmembers() if m.name.endswith(".jpg")]
            with open(folder / path.name, "r+b") as f:
                for offset in offsets[: None if how_many is None else max(0, how_many - damaged)]:
                    f.seek(offset)
                    f.write(b"\0\0\0")
                    damaged += 1
    return folder


def train(root: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.train", *RUN, f"data.root={root}", f"run_dir={run_dir}",
                           *extra], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_shards_of_undecodable_images_stop_the_run_with_exit_4(jpeg_digits, tmp_path):
    root = damaged_copy(jpeg_digits, tmp_path / "shards", how_many=None)
    proc = train(root, tmp_path / "run", "max_steps=10")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 4, output[-3000:]
    # one line on stderr, where a scheduler's log and a shell's 2> look for it
    assert "unusable samples in epoch 0 of 1438, more than data.max_bad_fraction=0.001 allows" in proc.stderr
    assert "Traceback" not in output
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert (status["status"], status["exit_code"], status["step"]) == ("failed", 4, 0)
    assert not (tmp_path / "run" / "encoder.safetensors").exists()


def test_one_bad_image_is_left_out_and_the_run_trains(jpeg_digits, tmp_path):
    root = damaged_copy(jpeg_digits, tmp_path / "shards", how_many=1)
    proc = train(root, tmp_path / "run", "max_steps=23")  # one epoch of 1438 samples at batch 64, and a step more
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert output.count("skipped ") == 1  # named once, left out of the losses and the probe
    assert (tmp_path / "run" / "encoder.safetensors").exists()


def test_a_training_split_smaller_than_one_batch_is_refused(jpeg_digits, tmp_path):
    proc = train(jpeg_digits, tmp_path / "run", "data.batch_size=2048")
    assert proc.returncode == 2
    assert "data.batch_size=2048: the train split has only 1438 samples" in proc.stderr
