"""Pretraining on one's own images: a flat folder of JPEG and PNG files (no class sub-folders) converts with
`make_shards folder` into unlabelled shards (label -1, no classes), and training on them switches the online probe
and the kNN monitor off with one message instead of failing on the missing labels."""

import subprocess
import sys

import numpy as np
from PIL import Image

from pipeline.data.shard_format import read_manifest
from tests.helpers import REPO
from tests.helpers.shard_reading import read_samples
from tests.helpers.torchrun import environment


def test_a_flat_image_folder_converts_unlabelled_and_trains_without_monitors(tmp_path):
    src, shards, run_dir = tmp_path / "photos", tmp_path / "shards", tmp_path / "run"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(
            src / f"holiday_{i}.{'jpg' if i % 2 else 'png'}")
    (src / "notes.txt").write_text("not an image")
    subprocess.run([sys.executable, "tools/make_shards.py", "folder", "--src", str(src), "--out", str(shards),
                    "--name", "photos", "--quiet"], cwd=REPO, env=environment(), check=True, timeout=120)
    assert read_manifest(str(shards / "photos-train.manifest.json")).classes == []
    samples = read_samples(str(shards), "photos", "train")
    assert sorted(samples) == sorted(f"holiday_{i}" for i in range(20))
    assert {label for _, _, label in samples.values()} == {-1}
    assert {ext for ext, _, _ in samples.values()} == {"jpg", "png"}

    train = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "experiment=smoke", "data=folder", "data.dataset=photos",
         f"data.root={shards}", "data.test_split=train", "data.image_size=32", "data.batch_size=8",
         f"run_dir={run_dir}", "max_steps=1", "logger=none", "monitor.knn_every_epochs=1"],
        cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    off = [line for line in train.stdout.splitlines() if " off: " in line]
    assert off == ["online probe off: the training split train has no labels; kNN monitor off: the bank split "
                   "train and the test split train have no labels"]
    assert "kNN top-1" not in train.stdout and (run_dir / "encoder.safetensors").is_file()
