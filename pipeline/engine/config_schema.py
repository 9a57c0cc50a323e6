"""The typed schema of every training and evaluation config, registered with Hydra's ConfigStore.

Each YAML file in configs/ names one of these dataclasses as its schema (its defaults list starts with `*_schema`),
so Hydra merges it in struct mode: a key that is not a field here is an error at composition, never a silently
ignored setting, and values are type-checked. pipeline/engine/compose.py turns such errors into messages that list
the valid keys.

Units: `data.batch_size` is the GLOBAL batch of one optimizer step (what papers quote); each rank's micro batch is
batch_size / (world_size * grad_accum_steps). Learning rates are absolute (no implicit scaling with the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# ---------------------------------------------------------------------------------------------------------- method


@dataclass
class MethodConfig:
    name: str = MISSING  # a key of pipeline.methods.METHODS
    recipe: str = MISSING  # the loader's augmentation recipe that produces this method's views


@dataclass
class AASAEConfig(MethodConfig):
    name: str = "aasae"
    recipe: str = "aasae"
    latent_dim: int = 128
    hidden_dim: int = 2048
    kl_weight: float = 0.0  # beta
    sigma: float = 1.0  # likelihood scale


@dataclass
class VAEConfig(AASAEConfig):
    name: str = "vae"
    recipe: str = "vae"
    kl_weight: float = 1.0


@dataclass
class AAGConfig(MethodConfig):
    name: str = "aag"
    recipe: str = "aag"
    proj_dim: int = 128
    proj_hidden_dim: int = 0  # 0: linear head
    temperature: float = 0.1


@dataclass
class SimCLRConfig(AAGConfig):
    name: str = "simclr"
    recipe: str = "simclr"
    proj_hidden_dim: int = 2048
    temperature: float = 0.5


# -------------------------------------------------------------------------------------------------------- backbone


@dataclass
class BackboneConfig:
    arch: str = "resnet18"  # a key of pipeline.models.ARCHS
    width: int = 1
    zero_init_residual: bool = False


# ------------------------------------------------------------------------------------------------------------ data


@dataclass
class DataConfig:
    """Which shards, what the images look like, and how the loader runs. Fields named like LoaderConfig's are passed
    to the loader as they are; manifest, recipe, batch size, seed and shuffle are set per use by the trainer."""

    dataset: str = MISSING
    root: str = "data/${data.dataset}"  # folder or fsspec URL holding the shards and manifests
    train_manifest: str = MISSING  # self-supervised training split
    bank_manifest: str = MISSING  # labelled split: kNN bank and linear-probe training
    test_manifest: str = MISSING  # labelled split: kNN queries and linear-probe evaluation
    stem: str = "cifar"  # encoder stem: cifar | stl10 | imagenet
    image_size: int = 32
    batch_size: int = 256  # global batch per optimizer step
    # loader tuning (pipeline/data/loader_config.py)
    profile: str = ""
    normalization: str = ""
    randaugment_n: int = 2
    randaugment_m: int = 10
    channels_last: bool = False
    dtype: str = "float32"
    device: str = "auto"
    num_threads: int = 4
    read_workers: int = 2
    prefetch: int = 2
    io: str = "auto"
    strict: bool = False


# ------------------------------------------------------------------------------------------------------- optimizer


@dataclass
class OptimizerConfig:
    name: str = MISSING  # adam | adamw | sgd | lars
    lr: float = MISSING  # peak learning rate, after warmup
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd, lars
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw
    eps: float = 1e-8
    trust_coefficient: float = 0.001  # lars: eta
    # biases and normalisation weights (every parameter with ndim <= 1): no weight decay and, for LARS, no
    # trust-ratio adaptation, as in SimCLR/BYOL
    exclude_bias_and_norm: bool = True


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | constant (after a linear warmup)
    warmup_epochs: float = 10.0
    warmup_start_factor: float = 0.0  # lr at step 0, as a fraction of the peak
    final_factor: float = 0.0  # cosine: lr at the last step, as a fraction of the peak


# ------------------------------------------------------------------------------------------------------- deepspeed


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0 (data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_accum_steps: int = 1
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer states and step on the CPU
    offload_params: bool = False  # ZeRO 3: parameters on the CPU
    grad_clip: float = 0.0  # global gradient-norm clipping; 0 = off
    sync_batchnorm: bool = False  # convert BatchNorm to SyncBatchNorm (needs a CUDA device)
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    # raw DeepSpeed config entries merged last (expert escape hatch; keys are DeepSpeed's, unchecked here)
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- logger


@dataclass
class LoggerConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "augssl"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    log_every_steps: int = 10
    image_every_steps: int = 500  # AASAE/VAE reconstruction grids; 0 = never
    progress_bar: bool = True  # tqdm on rank 0


# ------------------------------------------------------------------------------------------------------ top level


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # optimizer steps between checkpoints (one is always written at the end); 0 = end only
    keep_last: int = 3
    resume: bool = True  # continue from the newest valid checkpoint in run_dir


@dataclass
class MonitorConfig:
    online_probe: bool = True  # linear classifier on detached features, trained alongside (labelled splits)
    knn_every_epochs: int = 10  # 0 = never; also at the end when > 0
    knn_k: int = 200
    knn_temperature: float = 0.1


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
    experiment_name: str = "${method.name}_${data.dataset}"
    run_dir: str = "runs/${experiment_name}"
    seed: int = 0
    epochs: int = 100
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = epochs decide)
    export_encoder: bool = True  # write run_dir/encoder.safetensors at the end


@dataclass
class LinearProbeConfig:
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: bool = False  # random resized crop + flip on the training split (else the eval transform)


@dataclass
class EvalConfig:
    data: DataConfig = MISSING
    encoder: str = MISSING  # encoder.safetensors, a checkpoint folder, or a run dir (final export, else newest checkpoint)
    output: str = ""  # JSON results path ("" = beside the encoder)
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear"])
    knn_k: int = 200
    knn_temperature: float = 0.1
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    seed: int = 0


METHOD_SCHEMAS = {"aasae": AASAEConfig, "vae": VAEConfig, "aag": AAGConfig, "simclr": SimCLRConfig}


def register() -> None:
    """Make the schemas known to Hydra under the names the YAML defaults lists use (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvalConfig)
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(group="method", name=f"{name}_schema", node=schema)
    for group, schema in (("data", DataConfig), ("backbone", BackboneConfig), ("optimizer", OptimizerConfig),
                          ("schedule", ScheduleConfig), ("deepspeed", DeepSpeedConfig), ("logger", LoggerConfig)):
        cs.store(group=group, name="schema", node=schema)
