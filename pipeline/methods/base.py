"""What every method shares: the trainer-facing contract, its config schema, the encoder and the online linear probe.

A method owns everything about itself, so that the loader, the engine and the trainer never name one:
- `views`: {view name: augmentation name} (pipeline/data/loading/augmentations.py), the views a batch must hold and how
  the loader makes each;
- `config`: its Hydra structured-config schema, a MethodConfig subclass whose fields (besides `name`) are its
  constructor's keyword arguments;
- `loss, metrics = method(views, labels=None, valid=None)`:
  - `views`: dict of NCHW float tensors, already normalised, holding at least the keys of `method.views`;
  - `labels`: optional int64 (N,) class labels (-1 = unlabelled); when given and the method was built with
    num_classes > 0, the online linear probe's loss (on detached features) is added to the returned loss;
  - `valid`: optional bool (N,), the loader's mask: rows marked False (an unusable sample, or a repeat padding the
    epoch's last batch) are in neither the method's loss nor the probe's;
  - `loss`: the scalar to back-propagate; `metrics`: str -> detached scalar tensors, for logging;
- `visualize(views)`: named image grids for the logger, {grid name: {row label: normalised (n, 3, H, W) images}};
- `encoder`: the backbone (pooled features of size `encoder.out_dim`) that evaluation and export use.

Every method is built with the same keyword arguments besides its config's: the backbone (`backbone`, `width`,
`zero_init_residual`), the data (`stem`, `image_size`) and the probe's `num_classes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from pipeline.evaluation.linear import OnlineLinearProbe
from pipeline.models.resnet import ResNet


@dataclass
class MethodConfig:
    """The schema every method's config extends; `name` is the method's key in pipeline.methods.METHODS."""

    name: str = MISSING


class Method(nn.Module):
    """Base class: builds the encoder and the optional online probe; subclasses implement `ssl_forward`."""

    views: ClassVar[dict[str, str]] = {}
    config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(
        self,
        backbone: str = "resnet18",
        stem: str = "cifar",
        width: int = 1,
        zero_init_residual: bool = False,
        num_classes: int = 0,
        image_size: int = 32,
    ):
        super().__init__()
        self.image_size = image_size
        self.encoder = ResNet(backbone, stem=stem, width=width, zero_init_residual=zero_init_residual)
        self.online_probe = OnlineLinearProbe(self.encoder.out_dim, num_classes) if num_classes > 0 else None

    def ssl_forward(self, views: dict[str, Tensor], valid: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """Return the self-supervised loss over the valid rows, its metrics, and the pooled features (V*N, d) the
        probe should see, in view-major order (all images of the first probed view, then the next)."""
        raise NotImplementedError

    def visualize(self, views: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """Named image grids of this batch, each {row label: normalised images}; none unless a method draws some.
        Called on every rank (a forward pass is a collective under ZeRO 3)."""
        return {}

    def forward(self, views: dict[str, Tensor], labels: Tensor | None = None,
                valid: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        missing = [k for k in self.views if k not in views]
        if missing:
            raise KeyError(f"{type(self).__name__} needs views {list(self.views)}; missing {missing}")
        if valid is None:
            first = views[next(iter(self.views))]
            valid = torch.ones(first.shape[0], dtype=torch.bool, device=first.device)
        loss, metrics, features = self.ssl_forward(views, valid)
        metrics["ssl_loss"] = loss.detach()
        if self.online_probe is not None and labels is not None:
            labels = labels.masked_fill(~valid, -1)  # the probe ignores label -1
            repeats = features.shape[0] // labels.shape[0]
            probe_loss, probe_metrics = self.online_probe(features, labels.repeat(repeats))
            loss = loss + probe_loss
            metrics.update(probe_metrics)
        metrics["loss"] = loss.detach()
        return loss, metrics
