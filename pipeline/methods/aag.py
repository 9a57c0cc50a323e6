"""AAG (auxiliary augmentation with GNT-Xent) and its SimCLR baseline.

All views of the batch go through the encoder together (one V*N batch, as the authors do, so BatchNorm sees every
view), then the projection head; the embeddings are gathered across ranks WITH gradients so that the negatives come
from the global batch (pipeline.distributed explains the resulting loss/gradient equalities), and the loss named by
the class is computed on the global batch. AAG: views u, v (standard) and w (auxiliary), GNT-Xent, tau = 0.1.
SimCLR: views u, v, NT-Xent, tau = 0.5 (CIFAR), 2-layer MLP head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distributed import gather_with_grad
from pipeline.losses import LOSSES
from pipeline.methods.base import Method, register_method
from pipeline.models.heads import ProjectionHead

# The online probe sees the standard views only (never AAG's heavily augmented auxiliary view).
PROBED_VIEWS = 2


@register_method("aag")
class AAG(Method):
    """Three views (u, v standard, w auxiliary), GNT-Xent; the head is linear unless proj_hidden_dim > 0."""

    views = ("u", "v", "w")
    loss_name = "gnt_xent"

    def __init__(
        self,
        backbone: str = "resnet18",
        stem: str = "cifar",
        proj_dim: int = 128,
        proj_hidden_dim: int = 0,
        temperature: float = 0.1,
        width: int = 1,
        zero_init_residual: bool = False,
        num_classes: int = 0,
    ):
        super().__init__(backbone, stem, width, zero_init_residual, num_classes)
        self.temperature = temperature
        self.projection = ProjectionHead(self.encoder.out_dim, proj_dim, proj_hidden_dim)

    def ssl_forward(self, views: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        n_views, n = len(self.views), views[self.views[0]].shape[0]
        features = self.encoder(torch.cat([views[k] for k in self.views]))
        z = self.projection(features)
        # One collective for all views: (W*V*n, d) in rank-major order -> V tensors of (W*n, d).
        gathered = gather_with_grad(z)
        per_view = gathered.reshape(-1, n_views, n, z.shape[1]).transpose(0, 1).reshape(n_views, -1, z.shape[1])
        loss = LOSSES[self.loss_name](*per_view, temperature=self.temperature)
        z_u, z_v = F.normalize(z[:n].detach(), dim=1), F.normalize(z[n : 2 * n].detach(), dim=1)
        metrics = {"pos_sim": (z_u * z_v).sum(1).mean()}
        return loss, metrics, features[: PROBED_VIEWS * n]


@register_method("simclr")
class SimCLR(AAG):
    """AAG without the auxiliary view and with NT-Xent: two views, MLP head, tau = 0.5 by default."""

    views = ("u", "v")
    loss_name = "nt_xent"

    def __init__(self, proj_hidden_dim: int = 2048, temperature: float = 0.5, **kwargs):
        super().__init__(proj_hidden_dim=proj_hidden_dim, temperature=temperature, **kwargs)
