"""Heads that sit between the pooled encoder features and a method's loss."""

from __future__ import annotations

from torch import Tensor, nn


class GaussianHead(nn.Module):
    """AASAE / VAE projection to the parameters of q(z|x): Linear(d, hidden)-BN-ReLU, then bias-free linear maps to
    the mean and the log-variance (the authors' layout, docs/methods.md)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, latent_dim: int = 128):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True))
        self.mu = nn.Linear(hidden_dim, latent_dim, bias=False)
        self.logvar = nn.Linear(hidden_dim, latent_dim, bias=False)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        t = self.trunk(h)
        return self.mu(t), self.logvar(t)


class ProjectionHead(nn.Module):
    """Contrastive projection: Linear(d, out) when `hidden_dim` is 0 (AAG's default), else the SimCLR 2-layer MLP
    Linear(d, hidden)-BN-ReLU-Linear(hidden, out). The loss L2-normalises the output."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int = 0):
        super().__init__()
        if hidden_dim:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, out_dim),
            )
        else:
            self.net = nn.Linear(in_dim, out_dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)
