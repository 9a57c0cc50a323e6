"""Checks of a composed config that the types alone cannot express, run right after composition so that a wrong
setting stops the run at once (exit 2), before any process group starts or DeepSpeed is imported.

- `check_values`: every field's allowed range (pipeline/config/fields.py), the method's name, and the DeepSpeed
  settings that only work together;
- `check_launch`: the global batch divides into world size x gradient accumulation for this launch;
- `check_shards`: the splits the config names exist as manifests of the configured dataset, with every shard and
  index file they list (a missing one is named with the make_shards command that writes it), with a class count
  the dataset can have, the training split fills at least one global batch, and the labelled splits agree on their
  classes.
Each raises ConfigError with one line: the key, the value and what is allowed.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pipeline.config.fields import problems


class ConfigError(ValueError):
    """A config that does not compose or holds a value that is not allowed, said in terms of config keys."""


def check_values(cfg: DictConfig) -> None:
    from pipeline.methods import METHODS

    found = problems(OmegaConf.to_object(cfg))  # the schema dataclasses, with their fields' constraints
    if found:
        raise ConfigError(found[0])
    if "protocols" in cfg and not cfg.protocols:
        raise ConfigError("protocols=[]: name at least one of knn, linear")
    if "method" in cfg and cfg.method.name not in METHODS:
        raise ConfigError(f"method.name={cfg.method.name}: must be one of {', '.join(sorted(METHODS))}")
    if "deepspeed" in cfg:
        _check_deepspeed(cfg)


def _check_deepspeed(cfg: DictConfig) -> None:
    ds = cfg.deepspeed
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer=true: needs deepspeed.zero_stage >= 1")
    if ds.offload_params and ds.zero_stage != 3:
        raise ConfigError(f"deepspeed.offload_params=true: needs deepspeed.zero_stage 3, not {ds.zero_stage}")
    if cfg.optimizer.name == "lars" and ds.zero_stage == 0 and ds.precision == "fp16":
        # at stage 0 DeepSpeed's fp16 wrapper steps the optimizer once with zero gradients while it is built, which
        # LARS's weight decay and trust ratio would turn into a real update (bf16 is autocast: no wrapper)
        raise ConfigError("deepspeed.precision=fp16: LARS with fp16 needs deepspeed.zero_stage >= 1")


def check_launch(cfg: DictConfig, world_size: int) -> None:
    """The global batch splits evenly over `world_size` ranks and the gradient-accumulation steps."""
    ga = cfg.deepspeed.grad_accum_steps
    if cfg.data.batch_size % (world_size * ga):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: must be a multiple of world size {world_size} x "
                          f"deepspeed.grad_accum_steps {ga} = {world_size * ga}")


def data_roles(cfg: DictConfig) -> tuple[str, ...]:
    """The splits a training run reads: the training split, and the labelled ones when the kNN monitor runs."""
    return ("train", "bank", "test") if cfg.monitor.knn_every_epochs > 0 else ("train",)


def splits_without_labels(cfg: DictConfig, roles: tuple[str, ...] = ("bank", "test")) -> list[str]:
    """"the <role> split <name>" for each of these roles whose shards carry no labels (a flat image folder, STL-10's
    unlabeled split). A split not converted is left out: a run without the kNN monitor needs none, and the evaluator
    names the command that makes it."""
    from pipeline.data.shard_format import read_manifest

    urls, bare = split_manifests(cfg.data), []
    for role in roles:
        try:
            if not read_manifest(urls[role]).classes:
                bare.append(f"the {role} split {cfg.data[f'{role}_split']}")
        except FileNotFoundError:
            continue
    return bare


def monitors_with_labels(cfg: DictConfig) -> tuple[int, int, str]:
    """The online probe's class count and the kNN monitor's period, each 0 (off) where its splits carry no labels (a
    flat image folder, STL-10's unlabeled split), and the one line that says so ("" when nothing is off)."""
    from pipeline.data.shard_format import read_manifest

    urls, off = split_manifests(cfg.data), []
    classes = len(read_manifest(urls["train"]).classes)
    if cfg.monitor.online_probe and not classes:
        off.append(f"online probe off: the training split {cfg.data.train_split} has no labels")
    knn_every = cfg.monitor.knn_every_epochs
    if knn_every > 0:
        bare = splits_without_labels(cfg)
        if bare:
            knn_every = 0
            off.append(f"kNN monitor off: {' and '.join(bare)} {'have' if len(bare) > 1 else 'has'} no labels")
    return (classes if cfg.monitor.online_probe else 0), knn_every, "; ".join(off)


def split_manifests(data: DictConfig, roles: tuple[str, ...] = ("train", "bank", "test")) -> dict[str, str]:
    """{role: manifest URL} of the splits data.<role>_split names."""
    from pipeline.data.shard_format import manifest_url

    return {role: manifest_url(data.root, data.dataset, data[f"{role}_split"]) for role in roles}


def make_shards_command(data: DictConfig, role: str) -> str:
    """The tools/make_shards.py command that writes the split of `role` where this config reads it."""
    from pipeline.data.datasets import DATASETS

    source = data.dataset if data.dataset in DATASETS and data.dataset != "folder" else "folder"
    src = "" if source == "digits" else " --src PATH"
    name = f" --name {data.dataset}" if source == "folder" else ""
    return f"python tools/make_shards.py {source}{src}{name} --split {data[f'{role}_split']} --out {data.root}"


def check_shards(data: DictConfig, roles: tuple[str, ...] = ("train", "bank", "test"),
                 need_labels: tuple[str, ...] = ()) -> dict:
    """The manifests of the named splits exist and describe the configured dataset; those of `need_labels` have
    classes (evaluation scores against labels; training switches its monitors off instead). Returns them by role."""
    from pipeline.data.datasets import DATASETS, dataset_info
    from pipeline.data.loading.shard_index import missing_files
    from pipeline.data.shard_format import read_manifest

    info = dataset_info(data.dataset)
    if data.dataset in DATASETS:
        for role in roles:
            split = data[f"{role}_split"]
            if split not in info.splits:
                raise ConfigError(f"data.{role}_split={split}: {data.dataset} has the splits {', '.join(info.splits)}")
    manifests = {}
    for role, url in split_manifests(data, roles).items():
        try:
            manifest = read_manifest(url)
        except FileNotFoundError:
            raise ConfigError(f"data.{role}_split={data[f'{role}_split']}: no manifest {url}; create it with: "
                              f"{make_shards_command(data, role)} (or set data.root)") from None
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.{role}_split: cannot read {url}: {err}") from None
        except ImportError as err:  # fsspec names the package its protocol needs
            raise ConfigError(f"data.root={data.root}: {err} (pip install '.[s3]' or '.[gcs]')") from None
        if manifest.dataset != data.dataset:
            raise ConfigError(f"data.dataset={data.dataset}: the shards at {url} are of dataset {manifest.dataset!r}")
        if role == "train" and manifest.num_samples < data.batch_size:
            raise ConfigError(f"data.batch_size={data.batch_size}: the {data.train_split} split has only "
                              f"{manifest.num_samples} samples, so every step would repeat samples to fill the batch")
        if info.num_classes and len(manifest.classes) not in info.num_classes:
            raise ConfigError(f"data.dataset={data.dataset}: {url} has {len(manifest.classes)} classes, "
                              f"{data.dataset} has {' or '.join(map(str, info.num_classes))}")
        try:
            missing = missing_files(url, manifest)
        except OSError as err:
            raise ConfigError(f"data.{role}_split: cannot list the shards beside {url}: {err}") from None
        if missing:
            raise ConfigError(f"data.{role}_split={data[f'{role}_split']}: {missing}; re-create them with: "
                              f"{make_shards_command(data, role)}")
        if role in need_labels and not manifest.classes:
            raise ConfigError(f"data.{role}_split={data[f'{role}_split']}: the shards at {url} have no labels (an "
                              "unlabelled image folder?); evaluate on labelled splits: data.bank_split=... "
                              "data.test_split=..., or data=... data.root=... for another dataset")
        manifests[role] = manifest
    labelled = [manifests[r].classes for r in ("bank", "test") if r in manifests]
    if len(labelled) == 2 and labelled[0] != labelled[1]:
        raise ConfigError(f"data.bank_split={data.bank_split} and data.test_split={data.test_split} have different "
                          f"classes ({len(labelled[0])} vs {len(labelled[1])})")
    return manifests
