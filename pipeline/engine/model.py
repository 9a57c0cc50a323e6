"""From a composed config to the method module the engine trains: the one place that maps config fields onto
pipeline.methods' constructor arguments."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pipeline.engine.config_schema import AASAEConfig
from pipeline.methods import Method, build_method


def method_kwargs(cfg: DictConfig, num_classes: int = 0) -> tuple[str, dict]:
    """(method name, constructor kwargs) for cfg.method on cfg.backbone at cfg.data's stem and image size."""
    fields = OmegaConf.to_container(cfg.method, resolve=True)
    name = fields.pop("name")
    fields.pop("recipe")
    fields.update(backbone=cfg.backbone.arch, width=cfg.backbone.width,
                  zero_init_residual=cfg.backbone.zero_init_residual, stem=cfg.data.stem, num_classes=num_classes)
    if issubclass(OmegaConf.get_type(cfg.method), AASAEConfig):  # the decoder is built for one output size
        fields["image_size"] = cfg.data.image_size
    return name, fields


def build_model(cfg: DictConfig, num_classes: int = 0) -> Method:
    name, kwargs = method_kwargs(cfg, num_classes)
    return build_method(name, **kwargs)
