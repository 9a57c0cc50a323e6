"""AAG (auxiliary augmentation with GNT-Xent) and its SimCLR baseline.

All views of the batch go through the encoder together (one V*N batch, as the authors do, so BatchNorm sees every
view), then the projection head; the embeddings are gathered across ranks WITH gradients so that the negatives come
from the global batch (pipeline.distributed explains the resulting loss/gradient equalities), and the loss named by
the class is computed on the global batch. AAG: views u, v (standard) and w (auxiliary), GNT-Xent, tau = 0.1.
SimCLR: views u, v, NT-Xent, tau = 0.5 (CIFAR), 2-layer MLP head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config.fields import at_least, greater_than
from pipeline.distributed import gather_with_grad
from pipeline.losses import LOSSES, at_least_fp32
from pipeline.methods.base import Method, MethodConfig
from pipeline.models.heads import ProjectionHead

# The online probe sees the standard views only (never AAG's heavily augmented auxiliary view).
PROBED_VIEWS = 2


@dataclass
class AAGConfig(MethodConfig):
    name: str = "aag"
    proj_dim: int = at_least(1, 128)
    proj_hidden_dim: int = at_least(0, 0)  # 0: linear head
    temperature: float = greater_than(0, 0.1)


@dataclass
class SimCLRConfig(AAGConfig):
    name: str = "simclr"
    proj_hidden_dim: int = at_least(0, 2048)
    temperature: float = greater_than(0, 0.5)


class AAG(Method):
    """Three views (u, v standard, w auxiliary), GNT-Xent; the head is linear unless proj_hidden_dim > 0."""

    views = {"u": "crop_jitter", "v": "crop_jitter", "w": "randaugment"}
    config = AAGConfig
    loss_name = "gnt_xent"

    def __init__(self, proj_dim: int = 128, proj_hidden_dim: int = 0, temperature: float = 0.1, **common):
        super().__init__(**common)
        self.temperature = temperature
        self.projection = ProjectionHead(self.encoder.out_dim, proj_dim, proj_hidden_dim)

    def ssl_forward(self, views: dict[str, Tensor], valid: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        names = list(self.views)
        n_views, n = len(names), views[names[0]].shape[0]
        features = self.encoder(torch.cat([views[k] for k in names]))
        (z,) = at_least_fp32(self.projection(features))  # bf16 under autocast: gathered in fp32 (N x 129, cheap)
        d = z.shape[1]
        # One collective for all views and the valid mask (as an extra column): (W*V*n, d + 1) in rank-major order
        # -> V tensors of (W*n, d + 1); the mask is the same in every view.
        flagged = torch.cat([z, valid.repeat(n_views)[:, None].to(z.dtype)], dim=1)
        gathered = gather_with_grad(flagged)
        per_view = gathered.reshape(-1, n_views, n, d + 1).transpose(0, 1).reshape(n_views, -1, d + 1)
        global_valid = per_view[0, :, d] > 0.5
        loss = LOSSES[self.loss_name](*per_view[:, :, :d], temperature=self.temperature, valid=global_valid)
        z_u, z_v = F.normalize(z[:n].detach(), dim=1), F.normalize(z[n : 2 * n].detach(), dim=1)
        metrics = {"pos_sim": (z_u * z_v).sum(1).mean()}
        return loss, metrics, features[: PROBED_VIEWS * n]

    def visualize(self, views: dict[str, Tensor], n: int = 8) -> dict[str, dict[str, Tensor]]:
        """The augmented views of the first n images, one row per view."""
        return {"views": {name: views[name][:n] for name in self.views}}


class SimCLR(AAG):
    """AAG without the auxiliary view and with NT-Xent: two views, MLP head, tau = 0.5 by default."""

    views = {"u": "contrastive", "v": "contrastive"}
    config = SimCLRConfig
    loss_name = "nt_xent"

    def __init__(self, proj_hidden_dim: int = 2048, temperature: float = 0.5, **kwargs):
        super().__init__(proj_hidden_dim=proj_hidden_dim, temperature=temperature, **kwargs)
