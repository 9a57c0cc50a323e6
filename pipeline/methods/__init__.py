"""Self-supervised methods behind one contract (base.py), in an explicit registry.

Adding a method: its file here (the Method subclass with its `views`, its `config` schema and, optionally,
`visualize`), its entry in METHODS, and configs/method/<name>.yaml. Nothing outside pipeline/methods names a method.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pipeline.methods.aag import AAG, SimCLR
from pipeline.methods.aasae import AASAE, VAE
from pipeline.methods.base import Method, MethodConfig

METHODS: dict[str, type[Method]] = {"aasae": AASAE, "vae": VAE, "aag": AAG, "simclr": SimCLR}


def build_method(name: str, **kwargs) -> Method:
    """Instantiate the method registered as `name` with plain-Python constructor arguments."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name](**kwargs)


def method_for(cfg: DictConfig, num_classes: int = 0) -> Method:
    """The method of a composed training config: cfg.method's fields, plus the backbone and the data's stem and
    image size that every method is built with."""
    fields = OmegaConf.to_container(cfg.method, resolve=True)
    name = fields.pop("name")
    return build_method(name, **fields, backbone=cfg.backbone.arch, width=cfg.backbone.width,
                        zero_init_residual=cfg.backbone.zero_init_residual, stem=cfg.data.stem,
                        image_size=cfg.data.image_size, num_classes=num_classes)


__all__ = ["METHODS", "Method", "MethodConfig", "build_method", "method_for"]
