"""A method is one file: a toy method defined and registered in this test file alone (its schema stored where
configs/method/<name>.yaml would put it) trains a step through the real trainer, and the trainer, engine and loader
never name a method. And data.image_size is the one size: an image folder's shards train AASAE at 48 px end to end."""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from pipeline.config.fields import greater_than
from pipeline.methods.base import Method, MethodConfig
from tests.helpers import REPO

CPU = ["logger=none", "logger.progress_bar=false", "logger.log_every_steps=1", "monitor.knn_every_epochs=0",
       "checkpoint.every_steps=0"]


@dataclass
class ToyConfig(MethodConfig):
    name: str = "toy"
    scale: float = greater_than(0.0, 1.0)


class Toy(Method):
    """Pulls two flipped crops of an image together: the smallest method the contract allows."""

    views = {"a": "crop_flip", "b": "crop_flip"}
    config = ToyConfig

    def __init__(self, scale: float = 1.0, **common):
        super().__init__(**common)
        self.scale = scale

    def ssl_forward(self, views: dict[str, Tensor], valid: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        features = self.encoder(torch.cat([views["a"], views["b"]]))
        a, b = features.chunk(2)
        loss = self.scale * (a - b)[valid].pow(2).mean()
        return loss, {"distance": loss.detach()}, features


def train_toy(shards: str, run_dir: str) -> None:
    """Registers Toy as a configs/method/toy.yaml and an entry in METHODS would, then trains it (a subprocess runs
    this, so that the process group it starts dies with it)."""
    from hydra.core.config_store import ConfigStore

    from pipeline.config import schema
    from pipeline.config.compose import load
    from pipeline.engine.trainer import Trainer
    from pipeline.methods import METHODS

    METHODS["toy"] = Toy
    schema.register()
    ConfigStore.instance().store(group="method", name="toy", node={"defaults": ["toy_schema", "_self_"]})
    cfg = load("train", ["experiment=smoke", "method=toy", "method.scale=2.0", f"data.root={shards}",
                         f"run_dir={run_dir}", "max_steps=1", *CPU])
    assert Trainer(cfg).run() == "done"


def test_a_method_defined_in_a_test_file_trains_through_the_real_trainer(shards, tmp_path):
    code = f"import tests.methods.test_method_contract as t; t.train_toy({shards!r}, {str(tmp_path / 'run')!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and records[0]["distance"] >= 0
    assert (tmp_path / "run" / "encoder.safetensors").is_file()
    assert "name: toy" in (tmp_path / "run" / "config.yaml").read_text()


def test_no_file_of_the_loader_engine_or_trainer_names_a_method():
    from pipeline.methods import METHODS

    names = re.compile(r"\b(" + "|".join(METHODS) + r")\b", re.IGNORECASE)
    for package in ("pipeline/data", "pipeline/engine", "pipeline/evaluation"):
        for path in (REPO / package).rglob("*.py"):
            found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for n, line in
                     enumerate(path.read_text().splitlines(), 1) if names.search(line)]
            assert not found, "\n".join(found)


@pytest.mark.slow
def test_an_image_folder_trains_aasae_at_the_size_data_image_size_sets(tmp_path):
    from tests.helpers.fixtures import make_image_folder

    for split in ("train", "val"):
        make_image_folder(str(tmp_path / "src" / split))
        subprocess.run([sys.executable, "tools/make_shards.py", "folder", "--name", "pets", "--src",
                        str(tmp_path / "src" / split), "--split", split, "--out", str(tmp_path / "shards"), "--quiet"],
                       cwd=REPO, check=True, capture_output=True, timeout=300)
    args = ["data=folder", "data.dataset=pets", f"data.root={tmp_path / 'shards'}", "data.image_size=48",
            "method=aasae", "method.hidden_dim=32", "method.latent_dim=8", "backbone=resnet_small", "deepspeed=zero0",
            "optimizer=adam", "optimizer.lr=1e-3", "data.batch_size=4", "data.loader.device=cpu",
            "data.loader.num_threads=1", "data.loader.read_workers=1", "max_steps=2", f"run_dir={tmp_path / 'run'}",
            *CPU, "monitor.knn_every_epochs=1", "monitor.knn_k=3"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert any("knn/top1" in r for r in records)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "image_size: 48" in config and "stem: imagenet" in config
