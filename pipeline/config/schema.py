"""The typed schema of every training and evaluation config, registered with Hydra's ConfigStore.

Each YAML file in configs/ names one of these dataclasses as its schema (its defaults list starts with `*_schema`),
so Hydra merges it in struct mode: a key that is not a field here is an error at composition, never a silently
ignored setting, and values are type-checked. Fixed choices are StrEnums (Hydra names the allowed values) and
numeric ranges are field metadata (pipeline/config/fields.py) that pipeline/config/checks.py enforces right after
composition. A method's schema lives with the method (pipeline/methods); its YAML is configs/method/<name>.yaml.

Units: `data.batch_size` is the GLOBAL batch of one optimizer step (what papers quote); each rank's micro batch is
batch_size / (world_size * grad_accum_steps). Learning rates are absolute (no implicit scaling with the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, OmegaConf

from pipeline.config.fields import at_least, greater_than, in_range, matching, one_of
from pipeline.data.datasets import dataset_info
from pipeline.data.loading.loader_config import LoaderTuning
from pipeline.data.shard_format import NAME_PATTERN
from pipeline.methods import METHODS, MethodConfig
from pipeline.models.resnet import ARCHS, STEM_DOWNSAMPLE

# -------------------------------------------------------------------------------------------------------- backbone


@dataclass
class BackboneConfig:
    arch: str = one_of(tuple(ARCHS), "resnet18")
    width: int = at_least(1, 1)
    zero_init_residual: bool = False


# ------------------------------------------------------------------------------------------------------------ data


def dataset_fact(key: str, dataset: str = ".dataset") -> str:
    """A default that follows data.dataset: the dataset table's entry for `key` (pipeline/data/datasets.py);
    `dataset` is the path to data.dataset from the field's node."""
    return II(f"dataset_fact:${{{dataset}}},{key}")


@dataclass
class DataConfig:
    """Which shards, what the images look like, and how the loader runs. A split is named, never its file: its
    manifest is `{root}/{dataset}-{split}.manifest.json`, as tools/make_shards.py writes it. Sizes and the stem
    default to the dataset table's entry."""

    # a dataset of the table, or the --name of an image folder's shards
    dataset: str = matching(NAME_PATTERN, "letters, digits, '_' and '-' only", MISSING)
    root: str = "data/${.dataset}"  # folder or fsspec URL holding the shards and manifests
    train_split: str = "train"  # self-supervised training
    bank_split: str = "train"  # labelled: kNN bank and linear-probe training
    test_split: str = "test"  # labelled: kNN queries and linear-probe evaluation
    image_size: int = dataset_fact("image_size")  # side of every view, the eval crop and the AASAE reconstruction
    stem: str = one_of(tuple(STEM_DOWNSAMPLE), dataset_fact("stem"))  # encoder stem (pipeline.models.resnet)
    batch_size: int = at_least(1, 256)  # global batch per optimizer step
    # the run stops (exit 4) when more of an epoch's samples than this are unusable (undecodable, unlabelled, ...);
    # those below it are left out of the losses and the probe
    max_bad_fraction: float = in_range(0.0, 1.0, 0.001)
    # remote shards (http(s)://, s3://, gs://): a local folder where each shard is kept, checked against the
    # manifest's sha256, after its first read, so that later epochs do not download it again ("" = no cache); and
    # that folder's bound (the least recently used copies go first; a larger shard is read remotely)
    cache_dir: str = ""
    cache_max_gib: float = greater_than(0.0, 100.0)
    loader: LoaderTuning = field(default_factory=LoaderTuning)


# ------------------------------------------------------------------------------------------------------- optimizer


class Device(StrEnum):
    auto = "auto"  # CUDA when torch sees a CUDA device, else the CPU
    cpu = "cpu"
    cuda = "cuda"  # the GPU of the local rank (pipeline/device.py); AUGSSL_DEVICE overrides


class OptimizerName(StrEnum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"
    lars = "lars"


class ScheduleName(StrEnum):
    cosine = "cosine"
    constant = "constant"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class OptimizerConfig:
    name: OptimizerName = MISSING
    lr: float = greater_than(0.0, MISSING)  # peak learning rate, after warmup
    weight_decay: float = at_least(0.0, 0.0)
    momentum: float = in_range(0.0, 1.0, 0.9)  # sgd, lars
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = greater_than(0.0, 1e-8)
    trust_coefficient: float = greater_than(0.0, 0.001)  # lars: eta
    # biases and normalisation weights (every parameter with ndim <= 1): no weight decay and, for LARS, no
    # trust-ratio adaptation, as in SimCLR/BYOL
    exclude_bias_and_norm: bool = True


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.cosine  # after a linear warmup
    warmup_epochs: float = at_least(0.0, 10.0)
    warmup_start_factor: float = in_range(0.0, 1.0, 0.0)  # lr at step 0, as a fraction of the peak
    final_factor: float = in_range(0.0, 1.0, 0.0)  # cosine: lr at the last step, as a fraction of the peak


# ------------------------------------------------------------------------------------------------------- deepspeed


@dataclass
class DeepSpeedConfig:
    zero_stage: int = in_range(0, 3, 0)  # 0 (data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)
    precision: Precision = Precision.fp32
    grad_accum_steps: int = at_least(1, 1)
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer states and step on the CPU
    offload_params: bool = False  # ZeRO 3: parameters on the CPU
    grad_clip: float = at_least(0.0, 0.0)  # global gradient-norm clipping; 0 = off
    sync_batchnorm: bool = False  # convert BatchNorm to SyncBatchNorm (CUDA devices, where ranks share statistics)
    # ranks that share BatchNorm statistics under sync_batchnorm, in groups of consecutive ranks (torchrun and Slurm
    # number a node's GPUs consecutively, so 8 = one node of 8 GPUs); 0 = all ranks. The last group may be smaller
    sync_batchnorm_group: int = at_least(0, 0)
    overlap_comm: bool = False
    reduce_bucket_size: int = at_least(1, 50_000_000)
    # raw DeepSpeed config entries merged last (expert escape hatch; keys are DeepSpeed's, unchecked here)
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- logger


@dataclass
class LoggerConfig:
    wandb_mode: WandbMode = WandbMode.offline
    project: str = "augssl"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    log_every_steps: int = at_least(1, 10)
    image_every_steps: int = at_least(0, 500)  # the method's image grids (reconstructions, views); 0 = never
    progress_bar: bool = True  # tqdm on rank 0 when stdout is a terminal
    # elsewhere (a log file) one plain line of progress every this many seconds; 0 = none
    print_every_s: float = at_least(0, 60.0)


# ------------------------------------------------------------------------------------------------------ top level


@dataclass
class CheckpointConfig:
    # optimizer steps between checkpoints (one is always written at the end); 0 = end only
    every_steps: int = at_least(0, 1000)
    keep_last: int = at_least(1, 3)
    # continue from the newest valid checkpoint in run_dir. A run dir made with other weight-shaping settings is
    # refused unless "force": for changes on purpose (more epochs, a lower lr after a divergence), recorded in
    # run_dir/experiment.json
    resume: Union[bool, str] = one_of((True, False, "force"), True)


@dataclass
class MonitorConfig:
    online_probe: bool = True  # linear classifier on detached features, trained alongside (labelled splits)
    knn_every_epochs: int = at_least(0, 10)  # 0 = never; also at the end when > 0
    knn_k: int = at_least(1, dataset_fact("knn_k", "data.dataset"))  # the same k for the monitor and evaluate
    knn_temperature: float = greater_than(0.0, 0.1)


@dataclass
class DistConfig:
    # a collective that waits longer (a peer process or node died) fails the run instead of hanging; it must cover
    # the slowest step between two collectives: a checkpoint, a kNN pass, DALI's start-up
    timeout_s: float = greater_than(0.0, 600.0)
    # how long the main loop has to act on SIGTERM/SIGUSR1 (or on a dead loader worker) before the watchdog ends the
    # process itself (exit 143, or 1): it is blocked in a collective or a wait. Below Slurm's KillWait (30 s)
    stop_grace_s: float = greater_than(0.0, 20.0)
    # how often (optimizer steps) the ranks agree on stop signals, non-finite losses and unusable samples: one small
    # all-reduce that makes the host wait for the GPU. 0 = 1 on the CPU, 10 on CUDA. Checkpoint steps and the last
    # step are always checked, so nothing non-finite is ever saved; a non-finite loss is still named by its step.
    check_every_steps: int = at_least(0, 0)


@dataclass
class TrainConfig:
    method: MethodConfig = MISSING
    data: DataConfig = MISSING
    backbone: BackboneConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    schedule: ScheduleConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    logger: LoggerConfig = MISSING
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    experiment_name: str = "${method.name}_${data.dataset}"
    run_dir: str = "runs/${experiment_name}"
    seed: int = at_least(0, 0)
    epochs: int = at_least(1, 100)
    max_steps: int = at_least(0, 0)  # stop after this many optimizer steps in total (0 = epochs decide)
    export_encoder: bool = True  # write run_dir/encoder.safetensors at the end
    device: Device = Device.auto  # where the model computes (the loader follows unless data.loader.device says)
    compile: bool = False  # torch.compile the method's forward (DeepSpeed's engine.compile); first steps are slower
    compile_backend: str = "inductor"  # a torch.compile backend; aot_eager traces without generating code


class Protocol(StrEnum):
    knn = "knn"
    linear = "linear"


class ProbeFeatures(StrEnum):
    standardized = "standardized"  # by the training split's mean and std (a BatchNorm without affine in front)
    raw = "raw"  # the pooled features as they are (the AASAE paper)
    l2 = "l2"  # L2-normalised (the AAG authors' code)


class ProbeOptimizer(StrEnum):
    sgd = "sgd"  # momentum, nesterov
    adam = "adam"  # betas


class ProbeAugment(StrEnum):
    none = "none"  # the eval transform, features computed once
    crop_flip = "crop_flip"  # random resized crop + flip (STL-10's protocol), features recomputed every epoch
    pad_crop_flip = "pad_crop_flip"  # reflect-pad 4, random crop, flip (CIFAR's RandomCrop(32, 4, reflect))


class CosineEvery(StrEnum):
    epoch = "epoch"
    step = "step"


@dataclass
class LinearProbeConfig:
    epochs: int = at_least(1, 100)
    batch_size: int = at_least(1, 256)
    optimizer: ProbeOptimizer = ProbeOptimizer.sgd
    lr: float = greater_than(0.0, 0.1)
    momentum: float = in_range(0.0, 1.0, 0.9)  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam
    weight_decay: float = at_least(0.0, 0.0)
    cosine_every: CosineEvery = CosineEvery.epoch  # the learning rate's cosine decay, updated per epoch or per step
    features: ProbeFeatures = ProbeFeatures.standardized
    augment: ProbeAugment = ProbeAugment.none  # of the training split; the test split always gets the eval transform


@dataclass
class EvalConfig:
    data: DataConfig = MISSING
    # encoder.safetensors, a checkpoint folder, or a run dir (final export, else newest checkpoint)
    encoder: str = MISSING
    output: str = ""  # JSON results path ("" = beside the encoder)
    protocols: list[Protocol] = field(default_factory=lambda: [Protocol.knn, Protocol.linear])
    knn_k: int = at_least(1, dataset_fact("knn_k", "data.dataset"))  # the same k for the monitor and evaluate
    knn_temperature: float = greater_than(0.0, 0.1)
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    protocol: str = "default"  # the name of the protocol preset (configs/protocol) whose settings these are
    device: Device = Device.auto  # where features are computed (AUGSSL_DEVICE overrides)
    seed: int = at_least(0, 0)
    # a t-SNE map of the test split's features coloured by class: a PNG beside the results and in the run's W&B
    # summary (scikit-learn, from the demo or test extras); at most tsne_points features, a seeded sample
    tsne: bool = True
    tsne_points: int = at_least(10, 2000)


def register() -> None:
    """Make the schemas known to Hydra under the names the YAML defaults lists use, and the resolver behind the
    dataset-table defaults (idempotent: a method registered later, e.g. by a test, is picked up on the next call)."""
    if not OmegaConf.has_resolver("dataset_fact"):
        OmegaConf.register_new_resolver("dataset_fact", lambda dataset, key: getattr(dataset_info(dataset), key))
    if not OmegaConf.has_resolver("protocol_augment"):  # the AASAE protocol's training augmentation per dataset
        OmegaConf.register_new_resolver("protocol_augment", lambda dataset: ProbeAugment.pad_crop_flip
                                        if dataset_info(dataset).image_size <= 32 else ProbeAugment.crop_flip)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvalConfig)
    for name, method in METHODS.items():
        cs.store(group="method", name=f"{name}_schema", node=method.config)
    for group, schema in (("data", DataConfig), ("backbone", BackboneConfig), ("optimizer", OptimizerConfig),
                          ("schedule", ScheduleConfig), ("deepspeed", DeepSpeedConfig), ("logger", LoggerConfig)):
        cs.store(group=group, name="schema", node=schema)
