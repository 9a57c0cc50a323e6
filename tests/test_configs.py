"""Every config file composes against its strict schema, every experiment preset builds its model, the presets
carry the paper hyper-parameters, and a mistyped key fails naming the key and the valid ones."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config.compose import CONFIG_DIR, ConfigError, load
from pipeline.methods import METHODS, method_for

GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))]
EXPERIMENTS = [name for group, name in OPTIONS if group == "experiment"]


def test_the_groups_the_issue_names_exist():
    options = {g: {n for gg, n in OPTIONS if gg == g} for g in GROUPS}
    assert options["method"] == set(METHODS) == {"aasae", "vae", "aag", "simclr"}
    assert {"imagenet", "stl10", "cifar10", "cifar100", "svhn", "digits", "folder"} <= options["data"]
    assert {"adam", "adamw", "sgd", "lars"} <= options["optimizer"]
    assert {"zero0", "zero1", "zero2", "zero3"} <= options["deepspeed"]
    assert {"imagenet_aasae", "stl10_aasae", "cifar10_aasae", "cifar10_aag", "stl10_aag", "imagenet_aag",
            "cifar10_vae", "cifar10_simclr"} <= options["experiment"]


@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_group_option_composes(group, option):
    cfg = load("train", [f"{group}={option}"])
    assert OmegaConf.missing_keys(cfg) == set()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_model(experiment):
    cfg = load("train", [f"experiment={experiment}"])
    assert cfg.experiment_name == experiment or experiment == "smoke"
    model = method_for(cfg, num_classes=10)
    assert model.views == METHODS[cfg.method.name].views
    assert model.encoder.arch == cfg.backbone.arch and model.encoder.stem == cfg.data.stem


def test_evaluate_config_composes_with_every_dataset():
    for dataset in [n for g, n in OPTIONS if g == "data"]:
        cfg = load("evaluate", [f"data={dataset}", "encoder=runs/x/encoder.safetensors"])
        assert cfg.data.dataset == dataset and cfg.protocols == ["knn", "linear"]


def test_paper_hyper_parameters():
    aasae = load("train", ["experiment=cifar10_aasae"])
    assert (aasae.method.name, aasae.method.kl_weight, aasae.method.sigma) == ("aasae", 0.0, 1.0)
    assert (aasae.optimizer.name, aasae.optimizer.lr, aasae.optimizer.weight_decay) == ("adam", 2.5e-4, 0.0)
    assert (aasae.data.batch_size, aasae.schedule.name, aasae.schedule.warmup_epochs) == (256, "constant", 10)
    assert aasae.backbone.arch == "resnet50"
    imagenet = load("train", ["experiment=imagenet_aasae"])
    assert (imagenet.optimizer.lr, imagenet.data.batch_size, imagenet.data.stem) == (5e-4, 512, "imagenet")
    stl = load("train", ["experiment=stl10_aasae"])
    assert (stl.data.stem, stl.data.image_size) == ("stl10", 96)
    assert load("train", ["experiment=cifar10_vae"]).method.kl_weight == 1.0
    aag = load("train", ["experiment=cifar10_aag"])
    assert (aag.method.temperature, aag.method.proj_dim, aag.method.proj_hidden_dim) == (0.1, 128, 0)
    assert (aag.optimizer.name, aag.optimizer.lr, aag.optimizer.momentum, aag.optimizer.weight_decay) == (
        "sgd", 0.03, 0.9, 5e-4)
    assert (aag.schedule.name, aag.epochs, aag.data.batch_size) == ("cosine", 1000, 64)
    simclr = load("train", ["experiment=cifar10_simclr"])
    assert (simclr.method.name, simclr.method.temperature) == ("simclr", 0.5)


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.lrr=1"], "unknown config key 'optimizer.lrr': 'optimizer' (OptimizerConfig) has the keys name, lr,"),
    (["+optimizer.lrr=1"], "unknown config key 'optimizer.lrr'"),
    (["epochss=3"], "unknown config key 'epochss': '<top level>' (TrainConfig) has the keys method, data,"),
    (["method=aag", "method.latent_dim=3"], "'method' (AAGConfig) has the keys name, proj_dim,"),
    (["data.batch_size=many"], "invalid value for 'data.batch_size'"),
    (["optimizer=lars2"], "Available options in 'optimizer'"),
])
def test_mistyped_keys_fail_naming_the_key_and_the_valid_ones(overrides, message):
    with pytest.raises(ConfigError) as err:
        load("train", overrides)
    assert message in str(err.value)


def test_a_mistyped_key_inside_a_preset_file_fails_too(tmp_path, monkeypatch):
    import shutil

    import pipeline.config.compose as compose

    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    preset = configs / "experiment" / "cifar10_aag.yaml"
    preset.write_text(preset.read_text().replace("  momentum: 0.9", "  momentun: 0.9"))
    monkeypatch.setattr(compose, "CONFIG_DIR", str(configs))
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.momentun'.*has the keys name, lr"):
        load("train", ["experiment=cifar10_aag"])
