"""Pretraining on one's own images: a flat folder of JPEG and PNG files (no class sub-folders) converts with
`make_shards folder` into unlabelled shards (label -1, no classes), and a training config on them switches the
online probe and the kNN monitor off with one line instead of failing on the missing labels, and its end summary
asks for labelled shards to evaluate on; labelled shards keep both."""

import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config.checks import monitors_with_labels, splits_without_labels
from pipeline.config.compose import load
from pipeline.data.shard_format import read_manifest
from pipeline.engine.trainer import next_command
from tests.helpers import REPO
from tests.helpers.shard_reading import read_samples
from tests.helpers.torchrun import environment


def test_a_flat_image_folder_converts_unlabelled_and_its_training_runs_without_monitors(shards, tmp_path):
    src, out = tmp_path / "photos", tmp_path / "shards"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(
            src / f"holiday_{i}.{'jpg' if i % 2 else 'png'}")
    (src / "notes.txt").write_text("not an image")
    subprocess.run([sys.executable, "tools/make_shards.py", "folder", "--src", str(src), "--out", str(out),
                    "--name", "photos", "--quiet"], cwd=REPO, env=environment(), check=True, timeout=120)
    assert read_manifest(str(out / "photos-train.manifest.json")).classes == []
    samples = read_samples(str(out), "photos", "train")
    assert sorted(samples) == sorted(f"holiday_{i}" for i in range(20))
    assert {label for _, _, label in samples.values()} == {-1}
    assert {ext for ext, _, _ in samples.values()} == {"jpg", "png"}

    unlabelled = load("train", ["experiment=smoke", "data=folder", "data.dataset=photos", f"data.root={out}",
                                "data.test_split=train", "monitor.knn_every_epochs=1"])
    assert monitors_with_labels(unlabelled) == (0, 0, "online probe off: the training split train has no labels; "
                                                "kNN monitor off: the bank split train and the test split train have "
                                                "no labels")
    labelled = load("train", ["experiment=smoke", f"data.root={shards}", "monitor.knn_every_epochs=3"])
    assert monitors_with_labels(labelled) == (10, 3, "")

    # the end summary points the evaluator at labelled shards, not at these (which it refuses)
    assert next_command(Path("/runs/p"), splits_without_labels(unlabelled)) == (
        "next: python -m pipeline.evaluate encoder=/runs/p data=<a labelled dataset> data.root=<its shards> (the bank "
        "split train and the test split train have no labels to evaluate with)")
    assert next_command(Path("/runs/p"), splits_without_labels(labelled)) == (
        "next: python -m pipeline.evaluate encoder=/runs/p")
    # a run without the kNN monitor needs no bank or test shards: their absence must not fail its end summary
    no_test = load("train", ["experiment=smoke", f"data.root={shards}", "data.test_split=val",
                             "monitor.knn_every_epochs=0"])
    assert splits_without_labels(no_test) == []
