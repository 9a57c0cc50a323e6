"""AASAE (augmentation-augmented stochastic autoencoder) and its VAE baseline.

The encoder sees an augmented view x~, the decoder reconstructs the ORIGINAL image x (resize + centre crop, normalised)
from z ~ q(z|x~):

    z = mu(x~) + (exp(logvar(x~) / 2) + 1e-6) * eps,   eps ~ N(0, I)   (z = mu in eval mode)
    L = mean_batch[ beta * KL(q(z|x~) || N(0, I)) - sum_pixels log N(x; D(z), sigma^2) ]

AASAE: beta = 0, sigma = 1 (the augmentations replace the KL term as the regulariser). VAE: the same module with
beta > 0, and the loader gives the unaugmented image as the view (views["view"] is views["target"]).
eps comes from torch's global generator, so seeding makes a training step reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.losses import gaussian_nll, kl_to_standard_normal
from pipeline.methods.base import Method, register_method
from pipeline.models.decoder import ResNetDecoder
from pipeline.models.heads import GaussianHead

STD_FLOOR = 1e-6


@register_method("aasae")
class AASAE(Method):
    """Encoder on views["view"], decoder reconstructing views["target"]; beta = kl_weight, sigma = likelihood scale."""

    views = ("view", "target")

    def __init__(
        self,
        backbone: str = "resnet18",
        stem: str = "cifar",
        image_size: int = 32,
        latent_dim: int = 128,
        hidden_dim: int = 2048,
        kl_weight: float = 0.0,
        sigma: float = 1.0,
        width: int = 1,
        zero_init_residual: bool = False,
        num_classes: int = 0,
    ):
        super().__init__(backbone, stem, width, zero_init_residual, num_classes)
        if kl_weight < 0 or sigma <= 0:
            raise ValueError(f"need kl_weight >= 0 and sigma > 0, got {kl_weight}, {sigma}")
        self.kl_weight, self.sigma = kl_weight, sigma
        self.projection = GaussianHead(self.encoder.out_dim, hidden_dim, latent_dim)
        self.decoder = ResNetDecoder(backbone, stem, image_size, latent_dim, hidden_dim, width)

    def ssl_forward(self, views: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        target = views["target"]
        features = self.encoder(views["view"])
        mu, logvar = self.projection(features)
        std = torch.exp(logvar / 2) + STD_FLOOR
        z = mu + std * torch.randn_like(mu) if self.training else mu
        reconstruction = self.decoder(z)
        nll = gaussian_nll(reconstruction, target, self.sigma)
        kl = kl_to_standard_normal(mu, std)
        loss = (self.kl_weight * kl + nll).mean()
        metrics = {
            "nll": nll.mean().detach(),
            "kl": kl.mean().detach(),
            "mse": (reconstruction.detach() - target).pow(2).mean(),
        }
        return loss, metrics, features


@register_method("vae")
class VAE(AASAE):
    """The VAE baseline: AASAE with the KL term switched on (beta = 1 unless configured); feed view = target."""

    def __init__(self, kl_weight: float = 1.0, **kwargs):
        if kl_weight <= 0:
            raise ValueError("the VAE baseline needs kl_weight > 0")
        super().__init__(kl_weight=kl_weight, **kwargs)
