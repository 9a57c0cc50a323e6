"""What every method shares: the trainer-facing contract, the encoder, the online linear probe and the registry.

Contract: `loss, metrics = method(views, labels=None)`.
- `views`: dict of NCHW float tensors, already normalised, holding at least the keys in `method.views`.
- `labels`: optional int64 (N,) class labels (-1 = unlabelled); when given and the method was built with
  num_classes > 0, the online linear probe's loss (on detached features) is added to the returned loss.
- `loss`: the scalar to back-propagate; `metrics`: str -> detached scalar tensors, for logging.
`method.encoder` is the backbone (pooled features of size `method.encoder.out_dim`) used for evaluation and export.

A new method is one file in pipeline/methods/ with a `@register_method("name")` class; the package imports every
module in it, so `build_method("name", **config)` finds it.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from pipeline.models.resnet import ResNet
from pipeline.monitors import OnlineLinearProbe

METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def register(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = cls
        return cls

    return register


class Method(nn.Module):
    """Base class: builds the encoder and the optional online probe; subclasses implement `ssl_forward`."""

    views: tuple[str, ...] = ()

    def __init__(
        self,
        backbone: str = "resnet18",
        stem: str = "cifar",
        width: int = 1,
        zero_init_residual: bool = False,
        num_classes: int = 0,
    ):
        super().__init__()
        self.encoder = ResNet(backbone, stem=stem, width=width, zero_init_residual=zero_init_residual)
        self.online_probe = OnlineLinearProbe(self.encoder.out_dim, num_classes) if num_classes > 0 else None

    def ssl_forward(self, views: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Return the self-supervised loss, its metrics, and the pooled features (V*N, d) the probe should see, in
        view-major order (all images of the first probed view, then the next)."""
        raise NotImplementedError

    def forward(self, views: dict[str, Tensor], labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        missing = [k for k in self.views if k not in views]
        if missing:
            raise KeyError(f"{type(self).__name__} needs views {self.views}; missing {missing}")
        loss, metrics, features = self.ssl_forward(views)
        metrics["ssl_loss"] = loss.detach()
        if self.online_probe is not None and labels is not None:
            repeats = features.shape[0] // labels.shape[0]
            probe_loss, probe_metrics = self.online_probe(features, labels.repeat(repeats))
            loss = loss + probe_loss
            metrics.update(probe_metrics)
        metrics["loss"] = loss.detach()
        return loss, metrics
