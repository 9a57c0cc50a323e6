"""Every config file composes against its strict schema, every experiment preset builds its model (also under
debug=cpu), the presets carry the paper hyper-parameters and say in their header which method and dataset they
compose, and a mistyped key fails naming the key and the valid ones."""

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.config.compose import CONFIG_DIR, ConfigError, load
from pipeline.methods import METHODS, method_for

GROUPS = sorted(p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((Path(CONFIG_DIR) / g).glob("*.yaml"))]
EXPERIMENTS = [name for group, name in OPTIONS if group == "experiment"]  # not experiment/base/: parts of presets
METHOD_NAMES = {"aasae": "AASAE", "vae": "VAE", "aag": "AAG", "simclr": "SimCLR"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10", "svhn": "SVHN",
                 "imagenet": "ImageNet", "digits": "digits"}


def test_the_groups_the_issue_names_exist():
    options = {g: {n for gg, n in OPTIONS if gg == g} for g in GROUPS}
    assert options["method"] == set(METHODS) == {"aasae", "vae", "aag", "simclr"}
    assert {"imagenet", "stl10", "cifar10", "cifar100", "svhn", "digits", "folder"} <= options["data"]
    assert {"adam", "adamw", "sgd", "lars"} <= options["optimizer"]
    assert {"zero0", "zero1", "zero2", "zero3"} <= options["deepspeed"]
    assert {"imagenet_aasae", "stl10_aasae", "cifar10_aasae", "cifar10_aag", "stl10_aag", "imagenet_aag",
            "cifar10_vae", "cifar10_simclr"} <= options["experiment"]
    assert options["debug"] == {"cpu"}


@pytest.mark.parametrize("group, option", OPTIONS)
def test_every_group_option_composes(group, option):
    # the evaluation protocols belong to pipeline.evaluate's config, the other groups to the trainer's
    if group == "protocol":
        cfg = load("evaluate", [f"{group}={option}", "encoder=x"])
    else:
        cfg = load("train", [f"{group}={option}"])
    assert OmegaConf.missing_keys(cfg) == set()


@pytest.mark.parametrize("debug", [[], ["debug=cpu"]], ids=["", "debug=cpu"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_model(experiment, debug):
    cfg = load("train", [f"experiment={experiment}", *debug])
    assert cfg.experiment_name == experiment or experiment == "smoke"
    model = method_for(cfg, num_classes=10)
    assert model.views == METHODS[cfg.method.name].views
    assert model.encoder.arch == cfg.backbone.arch and model.encoder.stem == cfg.data.stem
    if debug:
        assert (cfg.data.dataset, cfg.data.loader.device, cfg.data.loader.num_threads, cfg.backbone.arch) == (
            "digits", "cpu", 1, "resnet_small")
        assert (cfg.logger.wandb_mode, cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == ("disabled", 0, "fp32")
        assert cfg.method == load("train", [f"experiment={experiment}"]).method  # debug=cpu keeps the method


@pytest.mark.parametrize("method", METHODS)
def test_the_demo_presets_are_already_on_debug_cpu(method):
    """demo_<method> includes debug/cpu itself, and debug=cpu sets no key the demo sets: adding it changes nothing."""
    assert load("train", [f"experiment=demo_{method}", "debug=cpu"]) == load("train", [f"experiment=demo_{method}"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_header_names_the_method_and_dataset_it_composes(experiment):
    """The line under `# @package _global_` starts with "<method> on <dataset>" of the composed config (a header
    copied from another preset fails) and says where its numbers come from."""
    lines = (Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    header = lines[1]
    cfg = load("train", [f"experiment={experiment}"], resolve=False)
    any_method = "${method.name}" in OmegaConf.to_container(cfg)["experiment_name"]  # e.g. smoke_${method.name}
    method = "Any method" if any_method else METHOD_NAMES[cfg.method.name]
    assert re.match(rf"# {method} on {DATASET_NAMES[cfg.data.dataset]}\b", header), header
    assert "(docs/methods.md)" in header or "not a paper setting" in header, header


def test_evaluate_config_composes_with_every_dataset():
    for dataset in [n for g, n in OPTIONS if g == "data"]:
        cfg = load("evaluate", [f"data={dataset}", "encoder=runs/x/encoder.safetensors"])
        assert cfg.data.dataset == dataset and cfg.protocols == ["knn", "linear"]


def test_the_training_monitor_and_evaluate_use_the_same_knn_k():
    for dataset in [n for g, n in OPTIONS if g == "data"]:
        train = load("train", ["experiment=smoke", "method=aag", f"data={dataset}"])
        evaluate = load("evaluate", [f"data={dataset}", "encoder=runs/x/encoder.safetensors"])
        assert train.monitor.knn_k == evaluate.knn_k == (20 if dataset == "digits" else 200), dataset
    assert load("train", ["experiment=cifar10_aag", "debug=cpu"]).monitor.knn_k == 20  # debug=cpu: digits


def test_paper_hyper_parameters():
    aasae = load("train", ["experiment=cifar10_aasae"])
    assert (aasae.method.name, aasae.method.kl_weight, aasae.method.sigma) == ("aasae", 0.0, 1.0)
    assert (aasae.optimizer.name, aasae.optimizer.lr, aasae.optimizer.weight_decay) == ("adam", 2.5e-4, 0.0)
    assert (aasae.data.batch_size, aasae.schedule.name, aasae.schedule.warmup_epochs) == (256, "constant", 10)
    assert (aasae.backbone.arch, aasae.epochs, aasae.method.hidden_dim, aasae.method.bn_on_original) == (
        "resnet50", 3200, 0, True)
    imagenet = load("train", ["experiment=imagenet_aasae"])
    assert (imagenet.optimizer.name, imagenet.optimizer.lr, imagenet.optimizer.weight_decay) == ("adam", 5e-4, 0.0)
    assert (imagenet.data.batch_size, imagenet.data.stem, imagenet.schedule.name) == (512, "imagenet", "constant")
    assert (imagenet.backbone.arch, imagenet.deepspeed.zero_stage, imagenet.deepspeed.precision) == (
        "resnet50", 2, "bf16")
    lars = load("train", ["experiment=imagenet_aag"])
    assert (lars.optimizer.name, lars.optimizer.lr, lars.optimizer.weight_decay, lars.data.batch_size) == (
        "lars", 1.2, 1e-6, 1024)
    assert (lars.schedule.name, lars.schedule.warmup_epochs, lars.epochs, lars.backbone.arch) == (
        "cosine", 10, 100, "resnet50")
    stl = load("train", ["experiment=stl10_aasae"])
    assert (stl.data.stem, stl.data.image_size, stl.epochs, stl.schedule.warmup_epochs) == ("stl10", 96, 3200, 20)
    for short, paper in (("cifar10_aasae_800ep", aasae), ("stl10_aasae_800ep", stl)):  # only the epochs differ
        short_cfg = OmegaConf.to_container(load("train", [f"experiment={short}"]))
        paper_cfg = OmegaConf.to_container(paper)
        assert (short_cfg.pop("epochs"), paper_cfg.pop("epochs")) == (800, 3200)
        for cfg in (short_cfg, paper_cfg):
            del cfg["experiment_name"], cfg["run_dir"]
        assert short_cfg == paper_cfg
    vae = load("train", ["experiment=cifar10_vae"]).method
    assert (vae.kl_weight, vae.bn_on_original) == (0.1, True)  # the official kl_coeff default; its BatchNorm pass
    aag = load("train", ["experiment=cifar10_aag"])
    assert (aag.method.temperature, aag.method.proj_dim, aag.method.proj_hidden_dim) == (0.1, 128, 0)
    assert (aag.optimizer.name, aag.optimizer.lr, aag.optimizer.momentum, aag.optimizer.weight_decay) == (
        "sgd", 0.03, 0.9, 5e-4)
    assert (aag.schedule.name, aag.epochs, aag.data.batch_size) == ("cosine", 1000, 64)
    simclr = load("train", ["experiment=cifar10_simclr"])  # SimCLR's own CIFAR-10 recipe
    assert (simclr.method.name, simclr.method.temperature, simclr.backbone.arch, simclr.data.batch_size) == (
        "simclr", 0.5, "resnet18", 512)
    assert (simclr.optimizer.name, simclr.optimizer.lr, simclr.optimizer.weight_decay) == ("lars", 2.0, 1e-4)
    assert (simclr.schedule.warmup_epochs, simclr.epochs) == (10, 1000)
    assert load("train", ["experiment=imagenet_simclr"]).method.temperature == 0.1  # SimCLR's ImageNet tau
    assert load("train", ["experiment=stl10_aag"]).data.stem == "stl10"
    for dataset in ("svhn", "stl10", "cifar100"):  # the CIFAR-10 recipe as it is
        other = load("train", [f"experiment={dataset}_aag"])
        assert (other.data.dataset, other.optimizer, other.data.batch_size) == (dataset, aag.optimizer, 64)


@pytest.mark.parametrize("baseline, preset", [
    ("cifar10_simclr_aagrecipe", "cifar10_aag"), ("imagenet_simclr", "imagenet_aag"),
    ("cifar10_vae", "cifar10_aasae"), ("stl10_vae", "stl10_aasae"), ("imagenet_vae", "imagenet_aasae")])
def test_a_baseline_is_its_paper_preset_with_the_method_switched(baseline, preset):
    base, paper = (OmegaConf.to_container(load("train", [f"experiment={name}"])) for name in (baseline, preset))
    for cfg in (base, paper):
        del cfg["method"], cfg["experiment_name"], cfg["run_dir"]
    assert base == paper  # the method's own settings aside (imagenet_simclr: SimCLR's tau 0.1)


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
    preset = configs / "experiment" / "base" / "aag.yaml"  # cifar10_aag's recipe
    preset.write_text(preset.read_text().replace("  momentum: 0.9", "  momentun: 0.9"))
    monkeypatch.setattr(compose, "CONFIG_DIR", str(configs))
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.momentun'.*has the keys name, lr"):
        load("train", ["experiment=cifar10_aag"])
