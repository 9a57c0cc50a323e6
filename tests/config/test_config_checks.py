"""A wrong setting stops `python -m pipeline.train` / `pipeline.evaluate` at once: exit 2, one line naming the key,
the value and what is allowed, the exit code in $AUGSSL_EXIT_FILE, and no process group or DeepSpeed import before
it. Shards that are not the configured dataset are refused the same way."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config.checks import ConfigError, check_shards
from pipeline.config.compose import load
from tests.helpers import REPO

SMOKE = ["experiment=smoke", "method=aag", "logger=none", "monitor.knn_every_epochs=0"]

# Runs an entry point as `python -m` would, then reports what it had imported and started by the time it exited.
PROBE = """
import runpy, sys, json
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exit:
    code = exit.code
import torch.distributed as dist
print(json.dumps({"code": code, "deepspeed": "deepspeed" in sys.modules,
                  "process_group": dist.is_available() and dist.is_initialized()}))
"""


def run_entry(module: str, *overrides: str, tmp_path: Path, env: dict | None = None) -> tuple[dict, str, float, str]:
    exit_file = tmp_path / "exit-code"
    exit_file.unlink(missing_ok=True)
    environ = {**os.environ, "AUGSSL_EXIT_FILE": str(exit_file), **(env or {})}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PROBE, module, *overrides], cwd=REPO, env=environ, text=True,
                          capture_output=True, timeout=120)
    seconds = time.monotonic() - started
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, proc.stderr, seconds, exit_file.read_text().strip() if exit_file.exists() else ""


@pytest.mark.parametrize("override, says", [
    ("optimizer.name=lamb", "'optimizer.name'"),
    ("deepspeed.precision=fp8", "'deepspeed.precision'"),
    ("deepspeed.zero_stage=7", "deepspeed.zero_stage=7: must be between 0 and 3"),
    ("backbone.arch=resnet999", "backbone.arch=resnet999: must be one of"),
    ("optimizer.lr=-1", "optimizer.lr=-1.0: must be > 0"),
    ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("epochs=0", "epochs=0: must be >= 1"),
    ("logger.log_every_steps=0", "logger.log_every_steps=0: must be >= 1"),
    ("deepspeed.grad_accum_steps=0", "deepspeed.grad_accum_steps=0: must be >= 1"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0: must be >= 1"),
    ("data.loader.device=tpu", "data.loader.device=tpu: must be auto, cpu, cuda or cuda:N"),
    ("data.dataset=../x", "data.dataset=../x: must be letters, digits, '_' and '-' only"),
    ("data.max_bad_fraction=2", "data.max_bad_fraction=2.0: must be between 0.0 and 1.0"),
])
def test_each_bad_value_exits_2_at_once_naming_the_key(shards, tmp_path, override, says):
    report, stderr, seconds, exit_code = run_entry("pipeline.train", *SMOKE, f"data.root={shards}",
                                                   f"run_dir={tmp_path}/run", override, tmp_path=tmp_path)
    assert report == {"code": 2, "deepspeed": False, "process_group": False}, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pipeline.train: ") and says in lines[0], stderr
    assert seconds < 15 and exit_code == "2"
    assert not (tmp_path / "run").exists()


def test_invalid_enum_values_list_the_allowed_ones(shards, tmp_path):
    _, stderr, _, _ = run_entry("pipeline.train", *SMOKE, f"data.root={shards}", "optimizer.name=lamb",
                                tmp_path=tmp_path)
    assert "lamb" in stderr and "adam, adamw, sgd, lars" in stderr


def test_a_batch_that_does_not_split_over_the_ranks_exits_2(shards, tmp_path):
    launch = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    report, stderr, _, exit_code = run_entry("pipeline.train", *SMOKE, f"data.root={shards}", "data.batch_size=33",
                                             tmp_path=tmp_path, env=launch)
    assert report["code"] == 2 and not report["process_group"] and exit_code == "2"
    assert "data.batch_size=33: must be a multiple of world size 2 x deepspeed.grad_accum_steps 1" in stderr


def _renamed_shards(shards: str, folder: Path, dataset: str, edit=None) -> Path:
    """The digits shards' manifests copied under another dataset's file names (the shards stay where they are)."""
    folder.mkdir()
    for split in ("train", "test"):
        manifest = json.loads((Path(shards) / f"digits-{split}.manifest.json").read_text())
        if edit:
            edit(manifest)
        for shard in manifest["shards"]:
            for suffix in (".tar", ".idx"):
                name = shard["name"].replace(".tar", suffix)
                shutil.copy(Path(shards) / name, folder / name)
        (folder / f"{dataset}-{split}.manifest.json").write_text(json.dumps(manifest))
    return folder


def test_shards_of_another_dataset_are_refused(shards, tmp_path):
    root = _renamed_shards(shards, tmp_path / "c100", "cifar100")
    report, stderr, _, _ = run_entry("pipeline.train", *SMOKE, "data=cifar100", f"data.root={root}",
                                     tmp_path=tmp_path)
    assert report["code"] == 2 and not report["deepspeed"]
    assert "data.dataset=cifar100: the shards at" in stderr and "are of dataset 'digits'" in stderr


def test_shards_with_the_wrong_class_count_are_refused(shards, tmp_path):
    root = _renamed_shards(shards, tmp_path / "c100", "cifar100", lambda m: m.update(dataset="cifar100"))
    report, stderr, _, _ = run_entry("pipeline.train", *SMOKE, "data=cifar100", f"data.root={root}",
                                     tmp_path=tmp_path)
    assert report["code"] == 2
    assert "has 10 classes, cifar100 has 100 or 20" in stderr


def test_missing_shards_say_how_to_make_them(tmp_path):
    report, stderr, _, _ = run_entry("pipeline.train", *SMOKE, f"data.root={tmp_path}/nothing", tmp_path=tmp_path)
    assert report["code"] == 2 and "data.train_split=train: no manifest" in stderr
    assert f"create it with: python tools/make_shards.py digits --split train --out {tmp_path}/nothing" in stderr
    pets = load("train", [*SMOKE, "data=folder", "data.dataset=pets", f"data.root={tmp_path}/pets"])
    with pytest.raises(ConfigError, match=re.escape(
            f"python tools/make_shards.py folder --src PATH --name pets --split train --out {tmp_path}/pets")):
        check_shards(pets.data, ("train",))


def test_a_shard_missing_beside_its_manifest_is_refused_before_the_run_dir_is_claimed(shards, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(shards, root)
    (root / "digits-train-000001.tar").unlink()
    run_dir = tmp_path / "run"
    report, stderr, _, _ = run_entry("pipeline.train", *SMOKE, f"data.root={root}", f"run_dir={run_dir}",
                                     tmp_path=tmp_path)
    assert report["code"] == 2 and not report["deepspeed"] and len(stderr.strip().splitlines()) == 1
    assert "1 shard or index file(s) missing beside the manifest, e.g. digits-train-000001.tar" in stderr
    assert f"python tools/make_shards.py digits --split train --out {root}" in stderr
    assert not run_dir.exists()  # not claimed: once the shards are made, the same command starts afresh


def test_evaluation_refuses_a_test_split_with_other_classes_or_none(shards, tmp_path):
    def fewer_classes(manifest):
        if manifest["split"] == "test":
            manifest["classes"] = manifest["classes"][:5]

    def as_pets(manifest):  # an image folder's shards: any class count is allowed, but both splits must agree
        manifest["dataset"] = "pets"
        fewer_classes(manifest)

    root = _renamed_shards(shards, tmp_path / "d", "pets", as_pets)
    report, stderr, _, _ = run_entry("pipeline.evaluate", "data=folder", "data.dataset=pets", "data.test_split=test",
                                     f"data.root={root}", f"encoder={tmp_path}/none", tmp_path=tmp_path)
    assert report["code"] == 2 and "have different classes (10 vs 5)" in stderr

    def unlabelled(manifest):  # a flat image folder's shards, as the ones a run pretrained on
        manifest.update(dataset="photos", classes=[])

    root = _renamed_shards(shards, tmp_path / "photos", "photos", unlabelled)
    photos = load("evaluate", ["data=folder", "data.dataset=photos", "data.test_split=test", f"data.root={root}",
                               f"encoder={tmp_path}/none"])
    check_shards(photos.data, ("bank", "test"))  # training on them is fine: its monitors switch off
    with pytest.raises(ConfigError, match="data.bank_split=train: the shards at .* have no labels"):
        check_shards(photos.data, ("bank", "test"), need_labels=("bank", "test"))  # as evaluate checks them
