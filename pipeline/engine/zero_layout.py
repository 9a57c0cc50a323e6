"""Where whole parameters lie inside the flat partitions that DeepSpeed's optimizer wrappers hand a client optimizer,
read from the wrappers' own bookkeeping (DeepSpeed 0.19.8), so that LARS can reduce per-parameter norms across ranks.

- ZeRO 1/2 (DeepSpeedZeroOptimizer): group i is flattened in `round_robin_bit16_groups[i]` order, parameter k at
  `round_robin_bit16_offsets[i][k]`; rank r owns elements [r*P, (r+1)*P) (P = partition_size[i]) as the fp32 tensor
  `single_partition_of_fp32_groups[i]`; the other pieces are on the ranks of `real_dp_process_group[i]`.
- bf16 + ZeRO 1 with fp32 gradient accumulation (BF16_Optimizer): the same scheme, parameters packed back to back
  in `bf16_groups[i]`, rank r's slice `fp32_groups_flat_partition[i]`.
- ZeRO 3 (DeepSpeedZeroOptimizer_Stage3): every parameter is partitioned on its own; sub-group i's fp32 tensor
  `fp32_partitioned_groups_flat[i]` is the concatenation of this rank's slice of each parameter of `fp16_groups[i]`
  (partition_numel() elements each, of which the last rank's tail is padding), across `sub_group_process_groups[i]`.
- No wrapper, or FP16_UnfusedOptimizer (fp16/bf16 without ZeRO: one fp32 copy per parameter): whole parameters.
Any other wrapper is refused rather than guessed at.
"""

from __future__ import annotations

import torch.distributed as dist

from pipeline.engine.lars import LARS, Layout


def _pieces(offsets: list[int], numels: list[int], start: int, size: int) -> tuple[list[int], list[int], list[int]]:
    """Intersections of parameters [offset, offset+numel) with the partition [start, start+size), relative to it."""
    starts, lengths, params = [], [], []
    for k, (offset, numel) in enumerate(zip(offsets, numels)):
        lo, hi = max(offset, start), min(offset + numel, start + size)
        if hi > lo:
            starts.append(lo - start)
            lengths.append(hi - lo)
            params.append(k)
    return starts, lengths, params


def _zero12(wrapper, lars: LARS) -> None:
    for i, flat in enumerate(wrapper.single_partition_of_fp32_groups):
        group = wrapper.real_dp_process_group[i]
        size = wrapper.partition_size[i]
        numels = [m.numel() for m in wrapper.round_robin_bit16_meta[i]]
        pieces = _pieces(wrapper.round_robin_bit16_offsets[i], numels, dist.get_rank(group=group) * size, size)
        lars.set_layout(flat, Layout(*pieces, num_params=len(numels), group=group))


def _bf16(wrapper, lars: LARS) -> None:
    for i, flat in enumerate(wrapper.fp32_groups_flat_partition):
        group = wrapper.real_dp_process_group[i]
        size = wrapper.bf16_groups_flat[i].numel() // dist.get_world_size(group=group)
        numels = [p.numel() for p in wrapper.bf16_groups[i]]
        offsets = [sum(numels[:k]) for k in range(len(numels))]
        pieces = _pieces(offsets, numels, dist.get_rank(group=group) * size, size)
        lars.set_layout(flat, Layout(*pieces, num_params=len(numels), group=group))


def _zero3(wrapper, lars: LARS) -> None:
    for i, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
        group = wrapper.sub_group_process_groups[i]
        rank = dist.get_rank(group=group)
        starts, lengths, params, offset = [], [], [], 0
        for k, p in enumerate(wrapper.fp16_groups[i]):
            size = p.partition_numel()
            valid = min(max(p.ds_numel - rank * size, 0), size)  # the last rank's tail is padding
            if valid:
                starts.append(offset)
                lengths.append(valid)
                params.append(k)
            offset += size
        lars.set_layout(flat, Layout(starts, lengths, params, num_params=len(wrapper.fp16_groups[i]), group=group))


def attach_layouts(wrapper, lars: LARS) -> None:
    """Give `lars` the layout of every tensor `wrapper` (engine.optimizer after deepspeed.initialize) will step it
    with. Call once, on every rank, right after deepspeed.initialize."""
    name = type(wrapper).__name__
    if wrapper is lars:
        return
    if name == "DeepSpeedZeroOptimizer":
        _zero12(wrapper, lars)
    elif name == "BF16_Optimizer":
        _bf16(wrapper, lars)
    elif name == "DeepSpeedZeroOptimizer_Stage3":
        _zero3(wrapper, lars)
    elif name == "FP16_UnfusedOptimizer":
        for group in wrapper.fp32_groups:
            for p in group:
                lars.set_layout(p, Layout.whole(p))
    else:
        raise NotImplementedError(f"LARS does not know how DeepSpeed's {name} partitions parameters; use "
                                  "zero_stage 0-3 with fp32, bf16 or fp16 (see pipeline/engine/zero_layout.py)")
