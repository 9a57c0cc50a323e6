"""The fingerprint that guards a run dir: every setting that shapes the weights is in it and none that does not, a
run dir is resumed only with the same one (or on purpose, with checkpoint.resume=force, which experiment.json
records), and a run dir of an older augssl says what to do instead of crashing."""

import json

import pytest
from omegaconf import OmegaConf

from pipeline.config.compose import ConfigError, load
from pipeline.engine.checkpoint import Checkpoints, RunDirError
from pipeline.engine.trainer import FREE_KEYS, fingerprint

BASE = ["experiment=smoke", "method=aag"]


@pytest.fixture(scope="module")
def base() -> dict:
    return fingerprint(load("train", BASE))


def test_every_free_key_names_a_config_key():
    cfg = load("train", BASE)
    assert all(OmegaConf.select(cfg, key, default="absent") != "absent" for key in FREE_KEYS)


def test_settings_that_do_not_shape_the_weights_change_freely(base):
    free = ["logger=wandb_offline", "logger.log_every_steps=3", "checkpoint.every_steps=7", "checkpoint.keep_last=9",
            "checkpoint.resume=force", "monitor.knn_every_epochs=5", "monitor.knn_k=3", "dist.timeout_s=60",
            "export_encoder=false", "data.root=/elsewhere", "data.test_split=train", "data.max_bad_fraction=0.1",
            "data.loader.num_threads=3", "data.loader.read_workers=3", "data.loader.prefetch=5",
            "data.loader.io=posix", "data.loader.device=auto", "data.loader.channels_last=true",
            "data.loader.strict=true", "deepspeed.reduce_bucket_size=1000", "run_dir=/somewhere/else",
            "device=cpu", "compile=true", "compile_backend=aot_eager", "data.loader.hw_decoder_load=0.95",
            "data.loader.preallocate_width_hint=500"]
    assert fingerprint(load("train", [*BASE, *free])) == base


@pytest.mark.parametrize("override, key, value", [
    ("optimizer.lr=0.5", "optimizer.lr", 0.5),
    ("optimizer.name=sgd", "optimizer.name", "sgd"),
    ("schedule.warmup_epochs=2", "schedule.warmup_epochs", 2.0),
    ("data.batch_size=64", "data.batch_size", 64),
    ("epochs=3", "epochs", 3),
    ("max_steps=5", "max_steps", 5),
    ("seed=1", "seed", 1),
    ("deepspeed.precision=bf16", "deepspeed.precision", "bf16"),
    ("deepspeed.grad_accum_steps=2", "deepspeed.grad_accum_steps", 2),
    ("data.loader.randaugment_m=5", "data.loader.randaugment_m", 5),
    ("data.loader.profile=cifar10", "data.loader.profile", "cifar10"),
    ("data.loader.dtype=bfloat16", "data.loader.dtype", "bfloat16"),
    ("data.image_size=24", "data.image_size", 24),
    ("method.temperature=0.3", "method.temperature", 0.3),
    ("backbone.width=2", "backbone.width", 2),
    ("monitor.online_probe=false", "monitor.online_probe", False),
])
def test_each_setting_that_shapes_the_weights_is_in_the_fingerprint(base, override, key, value):
    changed = fingerprint(load("train", [*BASE, override]))
    assert changed[key] == value and {k for k in changed if changed[k] != base.get(k)} == {key}


def test_resume_is_true_false_or_force():
    with pytest.raises(ConfigError, match="checkpoint.resume=forced: must be one of True, False, force"):
        load("train", [*BASE, "checkpoint.resume=forced"])


def test_a_changed_setting_is_refused_naming_both_values_unless_forced(tmp_path, base):
    Checkpoints(tmp_path, base).claim()
    assert Checkpoints(tmp_path, base).claim() == {}  # the same settings: accepted, nothing forced
    lower = {**base, "optimizer.lr": base["optimizer.lr"] / 10}
    with pytest.raises(RunDirError, match=r"other settings that shape the weights: optimizer.lr=0.00025 there, "
                                          r"2.5e-05 now\. .*checkpoint.resume=force"):
        Checkpoints(tmp_path, lower).claim()
    assert Checkpoints(tmp_path, lower).claim(force=True) == {"optimizer.lr": [0.00025, 2.5e-05]}
    record = json.loads((tmp_path / "experiment.json").read_text())
    assert record["fingerprint"] == lower
    assert [entry["changed"] for entry in record["forced"]] == [{"optimizer.lr": [0.00025, 2.5e-05]}]
    assert Checkpoints(tmp_path, lower).claim() == {}  # forced once: the run dir is now the new settings'
    with pytest.raises(RunDirError, match="optimizer.lr=2.5e-05 there, 0.00025 now"):
        Checkpoints(tmp_path, base).claim()


def test_a_run_dir_of_an_older_augssl_is_compared_on_what_it_recorded(tmp_path, base):
    older = {"experiment_name": "smoke_aag", "dataset": "digits", "stem": "cifar", "image_size": 32,
             "method": {"name": "aag", "proj_dim": 128, "proj_hidden_dim": 0, "temperature": 0.1},
             "backbone": {"arch": "resnet_small", "width": 1, "zero_init_residual": False}}
    (tmp_path / "experiment.json").write_text(json.dumps(older))
    with pytest.raises(RunDirError, match="an older augssl.*the other settings cannot be checked.*resume=force"):
        Checkpoints(tmp_path, base).claim()
    with pytest.raises(RunDirError, match=r"data.image_size=32 there, 24 now\."):
        Checkpoints(tmp_path, {**base, "data.image_size": 24}).claim()
    assert Checkpoints(tmp_path, base).claim(force=True) == {}
    record = json.loads((tmp_path / "experiment.json").read_text())
    assert record["fingerprint"] == base and record["forced"][0]["older_format"] is True
    assert Checkpoints(tmp_path, base).claim() == {}


def test_the_batchnorm_group_counts_only_when_ranks_synchronise_batchnorm(tmp_path):
    """Without sync_batchnorm no rank shares statistics: a group then changes nothing and must not block a resume,
    whatever group the run dir recorded (runs of a few commits recorded group 0 with sync off)."""
    alone = fingerprint(load("train", ["experiment=imagenet_aasae"]))
    assert alone["deepspeed.sync_batchnorm"] is False and alone["deepspeed.sync_batchnorm_group"] == 8
    before_the_key = {k: v for k, v in alone.items() if k != "deepspeed.sync_batchnorm_group"}
    for name, recorded in (("group 0", {**alone, "deepspeed.sync_batchnorm_group": 0}),
                           ("before the key", before_the_key)):
        run_dir = tmp_path / name
        Checkpoints(run_dir, recorded).claim()
        assert Checkpoints(run_dir, alone).claim() == {}
        assert Checkpoints(run_dir, {**alone, "deepspeed.sync_batchnorm_group": 2}).claim() == {}
    synced = fingerprint(load("train", ["experiment=imagenet_aag"]))
    assert synced["deepspeed.sync_batchnorm_group"] == 8
    with pytest.raises(RunDirError, match="deepspeed.sync_batchnorm=false there, true now"):
        Checkpoints(tmp_path / "group 0", synced).claim()


def test_a_run_dir_made_before_batchnorm_groups_resumes_as_it_ran(tmp_path):
    """Such runs shared BatchNorm statistics over all ranks, which is group 0; any other group is a change."""
    synced = fingerprint(load("train", [*BASE, "deepspeed.sync_batchnorm=true"]))
    assert synced["deepspeed.sync_batchnorm_group"] == 0
    Checkpoints(tmp_path, {k: v for k, v in synced.items() if k != "deepspeed.sync_batchnorm_group"}).claim()
    assert Checkpoints(tmp_path, synced).claim() == {}
    with pytest.raises(RunDirError, match="deepspeed.sync_batchnorm_group=0 there, 8 now"):
        Checkpoints(tmp_path, {**synced, "deepspeed.sync_batchnorm_group": 8}).claim()
