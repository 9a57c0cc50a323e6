"""A wrong setting stops `python -m pipeline.train` / `pipeline.evaluate` at once: exit 2, one line naming the key,
the value and what is allowed, the exit code in $AUGSSL_EXIT_FILE, and no process group or DeepSpeed import before
it. Shards that are not the configured dataset are refused the same way."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config.checks import ConfigError, check_shards
from pipeline.config.compose import load
from tests.helpers import REPO

SMOKE = ["experiment=smoke", "method=aag", "logger=none", "monitor.knn_every_epochs=0"]

# Runs entry points as `python -m` would, one case after another in this one process (torch's import is paid once,
# not per case), and reports for each what it printed, returned and had imported and started by the time it exited.
PROBE = """
import contextlib, io, json, os, runpy, sys, time
import torch.distributed as dist
for case in json.loads(sys.argv[1]):
    saved_env = dict(os.environ)
    os.environ.update(case["env"])
    exit_file = os.environ["AUGSSL_EXIT_FILE"]
    if os.path.exists(exit_file):
        os.remove(exit_file)
    sys.argv = [case["module"], *case["args"]]
    stderr = io.StringIO()
    started = time.monotonic()
    try:
        with contextlib.redirect_stderr(stderr):
            runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit.code
    seconds = time.monotonic() - started
    os.environ.clear()
    os.environ.update(saved_env)
    print(json.dumps({"name": case["name"], "code": code, "deepspeed": "deepspeed" in sys.modules,
                      "process_group": dist.is_available() and dist.is_initialized(), "stderr": stderr.getvalue(),
                      "seconds": seconds, "exit_file": open(exit_file).read().strip() if os.path.exists(exit_file)
                      else ""}), flush=True)
"""


def run_entries(cases: list[dict], tmp_path: Path) -> dict[str, dict]:
    """`cases`: dicts of name, module, args and env (additions); the reports by case name."""
    exit_file = tmp_path / "exit-code"
    cases = [{**case, "env": {"AUGSSL_EXIT_FILE": str(exit_file), **case.get("env", {})}} for case in cases]
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], cwd=REPO, text=True,
                          capture_output=True, timeout=60 + 15 * len(cases))
    reports = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            report = json.loads(line)
            reports[report.pop("name")] = report
    assert len(reports) == len(cases), proc.stdout[-2000:] + proc.stderr[-3000:]
    return reports


BAD_VALUES = [
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
]


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


@pytest.fixture(scope="module")
def reports(shards, tmp_path_factory) -> dict[str, dict]:
    """Every case of this file, through the real entry points, in one process."""
    tmp = tmp_path_factory.mktemp("config-checks")
    train = [*SMOKE, f"data.root={shards}"]
    cases = [{"name": override, "module": "pipeline.train", "args": [*train, f"run_dir={tmp}/run", override]}
             for override, _ in BAD_VALUES]

    def fewer_classes(manifest):
        if manifest["split"] == "test":
            manifest["classes"] = manifest["classes"][:5]

    def as_pets(manifest):  # an image folder's shards: any class count is allowed, but both splits must agree
        manifest["dataset"] = "pets"
        fewer_classes(manifest)

    c100 = _renamed_shards(shards, tmp / "c100", "cifar100")
    c100_classes = _renamed_shards(shards, tmp / "c100-classes", "cifar100", lambda m: m.update(dataset="cifar100"))
    pets = _renamed_shards(shards, tmp / "pets", "pets", as_pets)
    one_shard_gone = tmp / "one-shard-gone"
    shutil.copytree(shards, one_shard_gone)
    (one_shard_gone / "digits-train-000001.tar").unlink()
    launch = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    cases += [
        {"name": "uneven batch", "module": "pipeline.train", "args": [*train, "data.batch_size=33"], "env": launch},
        {"name": "cpu syncbn", "module": "pipeline.train", "args": [*train, "deepspeed.sync_batchnorm=true"],
         "env": launch},
        {"name": "other dataset", "module": "pipeline.train", "args": [*SMOKE, "data=cifar100", f"data.root={c100}"]},
        {"name": "class count", "module": "pipeline.train",
         "args": [*SMOKE, "data=cifar100", f"data.root={c100_classes}"]},
        {"name": "missing shards", "module": "pipeline.train", "args": [*SMOKE, f"data.root={tmp}/nothing"]},
        {"name": "print config", "module": "pipeline.train",
         "args": ["--cfg", "job", *SMOKE, f"data.root={tmp}/nothing"]},
        {"name": "print evaluate config", "module": "pipeline.evaluate", "args": ["--cfg", "job", "data=digits"]},
        {"name": "print bad config", "module": "pipeline.train",
         "args": ["--cfg", "job", *SMOKE, f"data.root={tmp}/nothing", "optimizer.lr=-1"]},
        {"name": "shard gone", "module": "pipeline.train",
         "args": [*SMOKE, f"data.root={one_shard_gone}", f"run_dir={tmp}/claimed"]},
        {"name": "evaluate classes", "module": "pipeline.evaluate",
         "args": ["data=folder", "data.dataset=pets", "data.test_split=test", f"data.root={pets}",
                  f"encoder={tmp}/none"]},
    ]
    return {"tmp": tmp, **run_entries(cases, tmp)}


@pytest.mark.parametrize("override, says", BAD_VALUES)
def test_each_bad_value_exits_2_at_once_naming_the_key(reports, override, says):
    report = reports[override]
    stderr = report["stderr"]
    assert (report["code"], report["deepspeed"], report["process_group"]) == (2, False, False), stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pipeline.train: ") and says in lines[0], stderr
    assert report["seconds"] < 15 and report["exit_file"] == "2"
    assert not (reports["tmp"] / "run").exists()


def test_invalid_enum_values_list_the_allowed_ones(reports):
    stderr = reports["optimizer.name=lamb"]["stderr"]
    assert "lamb" in stderr and "adam, adamw, sgd, lars" in stderr


def test_a_batch_that_does_not_split_over_the_ranks_exits_2(reports):
    report = reports["uneven batch"]
    assert report["code"] == 2 and not report["process_group"] and report["exit_file"] == "2"
    assert "data.batch_size=33: must be a multiple of world size 2 x deepspeed.grad_accum_steps 1" in report["stderr"]


def test_ranks_sharing_batchnorm_statistics_on_the_cpu_exit_2_before_the_process_group(reports):
    report = reports["cpu syncbn"]
    assert report["code"] == 2 and not report["process_group"] and report["exit_file"] == "2", report
    assert report["stderr"].splitlines() == [
        "pipeline.train: deepspeed.sync_batchnorm=true: 2 ranks on cpu would share BatchNorm statistics, which needs "
        "CUDA devices (torch has no CPU SyncBatchNorm); set deepspeed.sync_batchnorm=false or "
        "deepspeed.sync_batchnorm_group=1"]


def test_shards_of_another_dataset_are_refused(reports):
    report = reports["other dataset"]
    assert report["code"] == 2 and not report["deepspeed"]
    assert "data.dataset=cifar100: the shards at" in report["stderr"]
    assert "are of dataset 'digits'" in report["stderr"]


def test_shards_with_the_wrong_class_count_are_refused(reports):
    report = reports["class count"]
    assert report["code"] == 2 and "has 10 classes, cifar100 has 100 or 20" in report["stderr"]


def test_missing_shards_say_how_to_make_them(reports, tmp_path):
    report, tmp = reports["missing shards"], reports["tmp"]
    assert report["code"] == 2 and "data.train_split=train: no manifest" in report["stderr"]
    assert f"create it with: python tools/make_shards.py digits --split train --out {tmp}/nothing" in report["stderr"]
    pets = load("train", [*SMOKE, "data=folder", "data.dataset=pets", f"data.root={tmp_path}/pets"])
    with pytest.raises(ConfigError, match=re.escape(
            f"python tools/make_shards.py folder --src PATH --name pets --split train --out {tmp_path}/pets")):
        check_shards(pets.data, ("train",))


def test_printing_the_config_needs_no_shards_but_a_valid_config(reports):
    """`--cfg job` prints the composed config and exits: the run's shards are not read, its values still are."""
    assert reports["print config"]["code"] in (0, None), reports["print config"]
    assert reports["print evaluate config"]["code"] in (0, None), reports["print evaluate config"]  # encoder: ???
    assert reports["print bad config"]["code"] == 2
    assert "optimizer.lr=-1.0: must be > 0" in reports["print bad config"]["stderr"]


def test_a_shard_missing_beside_its_manifest_is_refused_before_the_run_dir_is_claimed(reports):
    report, tmp = reports["shard gone"], reports["tmp"]
    stderr = report["stderr"]
    assert report["code"] == 2 and not report["deepspeed"] and len(stderr.strip().splitlines()) == 1
    assert "1 shard or index file(s) missing beside the manifest, e.g. digits-train-000001.tar" in stderr
    assert f"python tools/make_shards.py digits --split train --out {tmp}/one-shard-gone" in stderr
    assert not (tmp / "claimed").exists()  # not claimed: once the shards are made, the same command starts afresh


def test_evaluation_refuses_a_test_split_with_other_classes_or_none(reports, shards, tmp_path):
    report = reports["evaluate classes"]
    assert report["code"] == 2 and "have different classes (10 vs 5)" in report["stderr"], report["stderr"]

    def unlabelled(manifest):  # a flat image folder's shards, as the ones a run pretrained on
        manifest.update(dataset="photos", classes=[])

    root = _renamed_shards(shards, tmp_path / "photos", "photos", unlabelled)
    photos = load("evaluate", ["data=folder", "data.dataset=photos", "data.test_split=test", f"data.root={root}",
                               f"encoder={tmp_path}/none"])
    check_shards(photos.data, ("bank", "test"))  # training on them is fine: its monitors switch off
    with pytest.raises(ConfigError, match="data.bank_split=train: the shards at .* have no labels"):
        check_shards(photos.data, ("bank", "test"), need_labels=("bank", "test"))  # as evaluate checks them
