"""Collectives the losses and monitors need, written so that one process (no process group) is the trivial case.

Gradient scaling, precisely. `gather_with_grad` returns the global batch on every rank, and the contrastive losses
are computed on that global batch on every rank, so each rank's loss VALUE equals the single-process loss on the
concatenated batch. In backward every rank holds the same dL/d(global batch); the all-reduce (sum) hands rank r the
sum over ranks of the gradient for its own slice, i.e. world_size * dL/d(x_r). DDP / DeepSpeed then average
parameter gradients over ranks, which divides that factor away: the averaged parameter gradients equal the
single-process gradients on the concatenated batch. (Per-sample terms that are not gathered, such as AASAE's
reconstruction, are local batch means: there the mean of the per-rank losses is the global loss, and DDP's
averaging again yields the single-process gradients.) tests/test_distributed_losses.py checks both at world size 2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward all-reduces (sums) the incoming gradients and keeps this rank's slice, so every
    rank's loss reaches every rank's inputs. A plain dist.all_gather returns tensors that are cut off from autograd."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from all ranks along dim 0 (rank order), keeping gradients; all ranks pass the same shape."""
    if not is_distributed():
        return x
    return torch.cat(_AllGatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def gather_variable(x: Tensor) -> Tensor:
    """Concatenate `x` from all ranks along dim 0 when the first dimension differs between ranks (no gradients):
    for feature banks, whose last batch may be short on some ranks."""
    if not is_distributed():
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([t[:n] for t, n in zip(out, sizes)], dim=0)


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of `x` over ranks (a new tensor; `x` is left unchanged)."""
    x = x.clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
