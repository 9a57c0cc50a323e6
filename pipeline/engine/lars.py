"""LARS (You et al., 2017) as large-batch contrastive training uses it, exact whether or not ZeRO has sharded the
parameters.

Per parameter p with gradient g, in groups with `lars=True`:

    d = g + weight_decay * p
    q = eta * ||p|| / ||d||   (1 where either norm is 0)
    buf = momentum * buf + q * d ;  p -= lr * buf

Groups with `lars=False` (biases and normalisation weights, by convention) skip the trust ratio q (and are usually
given weight_decay = 0): plain SGD with momentum.

Why this needs care under DeepSpeed. ZeRO (and DeepSpeed's bf16 optimizer) hand the client optimizer one flat tensor
per group holding this rank's slice of the concatenated parameters: a tensor that starts in the middle of one
parameter and ends in the middle of another. Norms taken over that tensor are norms of nothing in particular. Each
flat tensor therefore carries a `Layout` (built by pipeline/engine/zero_layout.py from the DeepSpeed optimizer's own
partition bookkeeping): the pieces of whole parameters it holds and the process group holding the other pieces. The
step computes per-piece sums of squares, adds the pieces of each parameter across that group (one all_reduce per
flat tensor), and so gets the norms of the full parameters; every other operation is elementwise and needs nothing.

A parameter tensor the optimizer was constructed with is its own layout (one piece, no group). Any other tensor
without a layout is refused: silently computing local trust ratios on a ZeRO shard is the bug this file exists for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer


@dataclass
class Layout:
    """Whole-parameter pieces inside one tensor the optimizer updates.

    starts/lengths: element ranges of the pieces in the tensor; params: which parameter (0..num_params-1, the same
    numbering on every rank of `group`) each piece belongs to; group: the ranks holding the other pieces (None:
    every piece is a whole parameter)."""

    starts: list[int]
    lengths: list[int]
    params: list[int]
    num_params: int
    group: object = None
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def whole(cls, tensor: Tensor) -> "Layout":
        return cls([0], [tensor.numel()], [0], 1, None)

    def index(self, device: torch.device) -> Tensor:
        """`params` as a tensor on `device`, made once: a host-to-device copy at every step would stall the GPU."""
        if device not in self._index:
            self._index[device] = torch.tensor(self.params, dtype=torch.long, device=device)
        return self._index[device]

    def pieces(self, flat: Tensor) -> list[Tensor]:
        flat = flat.view(-1)
        return [flat.narrow(0, s, n) for s, n in zip(self.starts, self.lengths)]


class LARS(Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, lars: bool = True):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS: need lr, momentum, weight_decay >= 0 and trust_coefficient > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        lars=lars)
        super().__init__(params, defaults)
        # each parameter is its own layout (made once, not at every step) until set_layout declares a flat partition
        self._layouts: dict[int, tuple[Tensor, Layout]] = {
            id(p): (p, Layout.whole(p)) for g in self.param_groups for p in g["params"]}

    def set_layout(self, tensor: Tensor, layout: Layout) -> None:
        """Declare which parameter pieces `tensor` (a flat partition the optimizer will be stepped with) holds."""
        if sum(layout.lengths) > tensor.numel():
            raise ValueError("LARS layout: pieces cover more elements than the tensor has")
        self._layouts[id(tensor)] = (tensor, layout)

    def layout_of(self, p: Tensor) -> Layout:
        entry = self._layouts.get(id(p))
        if entry is not None and entry[0] is p:
            return entry[1]
        raise RuntimeError("LARS: asked to step a tensor it has no parameter layout for (a ZeRO/bf16 flat "
                           "partition?): call pipeline.engine.zero_layout.attach_layouts(engine.optimizer, lars) "
                           "after deepspeed.initialize, or the trust ratios would be computed on shards")

    @torch.no_grad()
    def _trust_ratios(self, p: Tensor, d: Tensor, layout: Layout, eta: float) -> list[Tensor]:
        """eta * ||p|| / ||d|| per piece (1 where a norm is 0), with norms of the whole parameters."""
        index = layout.index(p.device)
        sums = torch.zeros(2, layout.num_params, dtype=torch.float32, device=p.device)
        if layout.starts:  # a rank may hold only padding, but it still joins the all_reduce below
            for row, x in enumerate((p, d)):
                piece_norms = torch.stack(torch._foreach_norm(layout.pieces(x))).float()
                sums[row].index_add_(0, index, piece_norms.square())
        if layout.group is not None:
            backend_device = _collective_device(layout.group, sums.device)
            reduced = sums.to(backend_device)
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=layout.group)
            sums = reduced.to(sums.device)
        w_norm, d_norm = sums.sqrt()
        ratio = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm.clamp_min(1e-38),
                            torch.ones_like(w_norm))
        return list(ratio[index].to(d.dtype).unbind())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if group["lars"]:
                    layout = self.layout_of(p)
                    ratios = self._trust_ratios(p, d, layout, group["trust_coefficient"])
                    if ratios:
                        torch._foreach_mul_(layout.pieces(d), ratios)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _collective_device(group, device: torch.device) -> torch.device:
    """NCCL reduces only CUDA tensors; with ZeRO-Offload the partitions (and so the norms) live on the CPU."""
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device
