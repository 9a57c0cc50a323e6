"""Worker for tests/test_distributed_losses.py: `torchrun --nproc_per_node 2 tests/helpers/dist_worker.py OUT_DIR`.

Each rank takes its contiguous slice of a fixed global batch, computes the contrastive losses on gathered embeddings,
runs each method under DistributedDataParallel (gloo, CPU), gathers an uneven share of a feature bank, and saves
what it saw to OUT_DIR/rank{r}.pt. The test recomputes the same things in one process on the whole batch with
the builders below. Everything is float64 so that the comparisons can be tight.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.distributed import gather_variable, gather_with_grad
from pipeline.losses import LOSSES
from pipeline.methods import METHODS, build_method

GLOBAL_BATCH = 8
CONTRASTIVE = {"gnt_xent": 3, "nt_xent": 2}  # loss -> number of views
METHOD_NAMES = ("aag", "simclr", "aasae")
BANK_SPLIT = 6  # rank 0 holds the first 6 of 10 bank rows


def embeddings() -> torch.Tensor:
    """(views, GLOBAL_BATCH, d) embeddings standing in for projection outputs."""
    return torch.randn(3, GLOBAL_BATCH, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def method(name: str) -> torch.nn.Module:
    """The method in eval mode: BatchNorm then uses its running statistics, so every sample is computed independently
    of the others and the one-process and two-process forward passes agree sample by sample (SyncBatchNorm, which
    training would use, has no CPU implementation)."""
    torch.manual_seed(0)
    kwargs = {"backbone": "resnet_small", "stem": "cifar"}
    if name == "aasae":
        kwargs.update(image_size=16, latent_dim=16, hidden_dim=64)
    return build_method(name, **kwargs).double().eval()


def views(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g, dtype=torch.float64) for k in METHODS[name].views}


def bank() -> torch.Tensor:
    return torch.randn(10, 8, generator=torch.Generator().manual_seed(2))


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = GLOBAL_BATCH // world
    mine = slice(rank * n, (rank + 1) * n)
    result = {}

    for loss_name, n_views in CONTRASTIVE.items():
        parts = [e[mine].clone().requires_grad_() for e in embeddings()[:n_views]]
        loss = LOSSES[loss_name](*[gather_with_grad(p) for p in parts], temperature=0.1)
        loss.backward()
        result[loss_name] = {"loss": loss.detach(), "grad": torch.stack([p.grad for p in parts])}

    for name in METHOD_NAMES:
        model = DistributedDataParallel(method(name))
        loss, _ = model({k: v[mine] for k, v in views(name).items()})
        loss.backward()  # DDP averages the parameter gradients over the ranks here
        result[name] = {"loss": loss.detach(), "grads": {k: p.grad for k, p in model.module.named_parameters()}}

    result["bank"] = gather_variable(bank()[slice(0, BANK_SPLIT) if rank == 0 else slice(BANK_SPLIT, None)])

    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Its results are written. Skip the interpreter's teardown: a gloo or DeepSpeed thread still joinable in a C++
    # destructor aborts the process now and then ("terminate called without an active exception", 2 CI runs of 9)
    os._exit(0)
