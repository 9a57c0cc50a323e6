"""AASAE (augmentation-augmented stochastic autoencoder) and its VAE baseline.

The encoder sees an augmented view x~, the decoder reconstructs the ORIGINAL image x (resize + centre crop, normalised)
from z ~ q(z|x~):

    z = mu(x~) + (exp(logvar(x~) / 2) + 1e-6) * eps,   eps ~ N(0, I)   (z = mu in eval mode)
    L = mean_batch[ beta * KL(q(z|x~) || N(0, I)) - sum_pixels log N(x; D(z), sigma^2) ]

AASAE: beta = 0, sigma = 1 (the augmentations replace the KL term as the regulariser). VAE: the same module with
beta > 0 (0.1 by default, the official code's), and the unaugmented image (the target) as the encoder's input.
The heads' hidden width is the encoder's, as in the official code (hidden_dim 0).
eps comes from torch's global generator, so seeding makes a training step reproducible.

bn_on_original: the official code also runs the encoder and head on the original image (no gradient, train mode)
before the augmented view, so BatchNorm's running statistics, which the encoder keeps for evaluation, mix clean and
augmented images. The loss and its gradients are the same either way; only the running statistics differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.config.fields import at_least, greater_than, multiple_of
from pipeline.losses import gaussian_nll, kl_to_standard_normal
from pipeline.methods.base import Method, MethodConfig
from pipeline.models.decoder import SEED_DIVISOR, ResNetDecoder
from pipeline.models.heads import GaussianHead

STD_FLOOR = 1e-6


@dataclass
class AASAEConfig(MethodConfig):
    name: str = "aasae"
    latent_dim: int = at_least(1, 128)
    hidden_dim: int = multiple_of(SEED_DIVISOR, 0)  # 0: the encoder's width
    kl_weight: float = at_least(0.0, 0.0)  # beta
    sigma: float = greater_than(0, 1.0)  # likelihood scale
    bn_on_original: bool = False


@dataclass
class VAEConfig(AASAEConfig):
    name: str = "vae"
    kl_weight: float = greater_than(0, 0.1)


class AASAE(Method):
    """Encoder on the augmented views["view"], decoder reconstructing views["target"] (the centre crop); beta =
    kl_weight, sigma = likelihood scale. The decoder is built for the data's image_size; hidden_dim 0 is the
    encoder's width."""

    views = {"view": "contrastive", "target": "center_crop"}
    config = AASAEConfig
    encoder_view = "view"  # which view the encoder sees

    def __init__(self, latent_dim: int = 128, hidden_dim: int = 0, kl_weight: float = 0.0, sigma: float = 1.0,
                 bn_on_original: bool = False, **common):
        super().__init__(**common)
        if kl_weight < 0 or sigma <= 0:
            raise ValueError(f"need kl_weight >= 0 and sigma > 0, got {kl_weight}, {sigma}")
        self.kl_weight, self.sigma, self.bn_on_original = kl_weight, sigma, bn_on_original
        hidden_dim = hidden_dim or self.encoder.out_dim
        self.projection = GaussianHead(self.encoder.out_dim, hidden_dim, latent_dim)
        self.decoder = ResNetDecoder(self.encoder.arch, self.encoder.stem, self.image_size, latent_dim, hidden_dim,
                                     self.encoder.width)

    def ssl_forward(self, views: dict[str, Tensor], valid: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        target = views["target"]
        if self.bn_on_original and self.training:
            with torch.no_grad():  # for BatchNorm's running statistics only (module docstring)
                self.projection(self.encoder(target))
        features = self.encoder(views[self.encoder_view])
        mu, logvar = self.projection(features)
        std = torch.exp(logvar / 2) + STD_FLOOR
        z = mu + std * torch.randn_like(mu) if self.training else mu
        reconstruction = self.decoder(z)
        nll = gaussian_nll(reconstruction, target, self.sigma)
        kl = kl_to_standard_normal(mu, std)
        weights = valid.to(nll.dtype)
        loss = ((self.kl_weight * kl + nll) * weights).sum() / weights.sum().clamp(min=1)
        metrics = {
            "nll": nll.mean().detach(),
            "kl": kl.mean().detach(),
            "mse": (reconstruction.detach() - target).pow(2).mean(),
        }
        return loss, metrics, features

    @torch.no_grad()
    def visualize(self, views: dict[str, Tensor], n: int = 8) -> dict[str, dict[str, Tensor]]:
        """Original (target), encoder input and reconstruction D(mu) of the first n images. Eval mode: z = mu."""
        was_training = self.training
        self.eval()
        view = views[self.encoder_view][:n]
        mu, _ = self.projection(self.encoder(view))
        reconstruction = self.decoder(mu)
        self.train(was_training)
        return {"reconstructions": {"original": views["target"][:n], "encoder input": view,
                                    "reconstruction": reconstruction}}


class VAE(AASAE):
    """The VAE baseline: AASAE with the KL term switched on (beta = 0.1 unless configured) and the unaugmented image
    as the encoder's input."""

    views = {"target": "center_crop"}
    config = VAEConfig
    encoder_view = "target"

    def __init__(self, kl_weight: float = 0.1, **kwargs):
        if kl_weight <= 0:
            raise ValueError("the VAE baseline needs kl_weight > 0")
        super().__init__(kl_weight=kl_weight, **kwargs)
