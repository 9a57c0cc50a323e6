"""Top-k accuracy of class scores: what every evaluation protocol reports."""

from __future__ import annotations

from torch import Tensor


def topk_accuracy(scores: Tensor, labels: Tensor, ks=(1, 5)) -> dict[str, float]:
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {f"top{k}": hits[:, :k].any(1).float().mean().item() for k in ks}
