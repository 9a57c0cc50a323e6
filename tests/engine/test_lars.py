"""LARS under DeepSpeed ZeRO 0/1/2/3 at world size 2 (torchrun, gloo) equals LARS on the unsharded model, and so
does LARS under DeepSpeed's BF16_Optimizer (its `bf16` section with ZeRO 1 and fp32 gradient accumulation, reachable
through `deepspeed.extra`) against the same bf16 arithmetic in one process.

This file is also the worker: `torchrun --nproc_per_node 2 tests/engine/test_lars.py OUT` trains the same small model
for a few steps under each ZeRO stage with each rank holding half of every global batch, and saves the full
parameters after training. The test repeats the steps in one process on the whole batch with the same LARS, and
the parameters must agree to 1e-6. The hyper-parameters make the trust ratio matter (eta = 1: each step moves a
weight by 10% of its norm), and the model's sizes make ZeRO cut parameters across the two partitions, which the
worker checks: local norms on those shards would be off by far more than the tolerance.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from pipeline.engine.lars import LARS, Layout
from pipeline.engine.optimizers import param_groups
from tests.helpers.torchrun import run_ranks

WORLD, GLOBAL_BATCH, STEPS = 2, 8, 3
LR, MOMENTUM, WEIGHT_DECAY, ETA = 0.1, 0.9, 0.05, 1.0
STAGES = (0, 1, 2, 3)
BF16 = "bf16 zero 1"  # DeepSpeed's BF16_Optimizer: bf16 parameters, fp32 master partitions and gradients


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.LayerNorm(13), nn.ReLU(), nn.Linear(13, 11), nn.ReLU(),
                         nn.Linear(11, 3))


def make_lars(model: nn.Module) -> LARS:
    return LARS(param_groups(model, WEIGHT_DECAY, exclude_bias_and_norm=True), lr=LR, momentum=MOMENTUM,
                weight_decay=WEIGHT_DECAY, trust_coefficient=ETA)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 7, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def ds_config(stage: int | str) -> dict:
    conf = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 1 if stage == BF16 else stage}, "zero_allow_untested_optimizer": True}
    if stage == BF16:
        conf.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    return conf


def worker(out_dir: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from pipeline.engine.zero_layout import attach_layouts

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    mine = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    results = {}
    for stage in (*STAGES, BF16):
        model = make_model()
        lars = make_lars(model)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=lars, config=ds_config(stage))
        assert (type(optimizer).__name__ == "BF16_Optimizer") == (stage == BF16)
        attach_layouts(optimizer, lars)
        cut = stage != 0 and _cuts_a_parameter(optimizer, lars, stage)
        dtype = torch.bfloat16 if stage == BF16 else torch.float32
        for step in range(STEPS):
            x, y = batch(step)
            loss = F.mse_loss(engine(x[mine].to(dtype)).float(), y[mine])
            engine.backward(loss)
            engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            params = [p.detach().clone() for p in engine.module.parameters()]
        results[stage] = {"params": params, "cut": torch.tensor(cut)}

    # Without the layouts, LARS refuses the flat ZeRO partitions instead of computing wrong trust ratios.
    model = make_model()
    lars = make_lars(model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=lars, config=ds_config(2))
    x, y = batch(0)
    engine.backward(F.mse_loss(engine(x[mine]), y[mine]))
    try:
        engine.step()
        results["refused"] = ""
    except RuntimeError as err:
        results["refused"] = str(err)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "lars.pt"))


def _cuts_a_parameter(optimizer, lars: LARS, stage: int | str) -> bool:
    """Whether this rank holds only part of some parameter (so that LARS must reduce its norm across ranks)."""
    if stage == 3:
        groups = [(flat, [p.ds_numel for p in params])
                  for flat, params in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_groups)]
    elif stage == BF16:
        groups = [(flat, [p.numel() for p in params])
                  for flat, params in zip(optimizer.fp32_groups_flat_partition, optimizer.bf16_groups)]
    else:
        groups = [(flat, [m.numel() for m in meta])
                  for flat, meta in zip(optimizer.single_partition_of_fp32_groups, optimizer.round_robin_bit16_meta)]
    for flat, numels in groups:
        layout = lars.layout_of(flat)
        if any(n < numels[k] for k, n in zip(layout.params, layout.lengths)):
            return True
    return False


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("lars")
    run_ranks(__file__, WORLD, str(out))
    return torch.load(out / "lars.pt", weights_only=True)


def reference_params() -> list[torch.Tensor]:
    model = make_model()
    lars = make_lars(model)
    for step in range(STEPS):
        x, y = batch(step)
        lars.zero_grad()
        F.mse_loss(model(x), y).backward()
        lars.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_lars_under_zero_equals_unsharded_lars(distributed, stage):
    expected = reference_params()
    initial = [p.detach() for p in make_model().parameters()]
    moved = torch.cat([(e - i).flatten() for e, i in zip(expected, initial)]).norm()
    assert moved > 0.1  # the steps are large enough for a wrong trust ratio to show
    got = distributed[stage]["params"]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert_close(g, e, rtol=0, atol=1e-6)
    if stage > 0:
        assert distributed[stage]["cut"], f"ZeRO {stage}: no parameter is split across ranks; the test proves little"


def reference_params_bf16() -> list[torch.Tensor]:
    """BF16_Optimizer's arithmetic in one process: forward and backward of each rank's half batch on a bf16 copy of
    fp32 master weights, the gradients averaged in fp32 for LARS, which steps the masters; the bf16 copy is what the
    engine's module holds."""
    work = make_model().bfloat16()
    master = make_model()
    with torch.no_grad():
        for m, w in zip(master.parameters(), work.parameters()):
            m.copy_(w)  # the masters start as the bf16 model's values, as the optimizer's fp32 partitions do
    lars = make_lars(master)
    for step in range(STEPS):
        with torch.no_grad():
            for w, m in zip(work.parameters(), master.parameters()):
                w.copy_(m)
        x, y = batch(step)
        for m in master.parameters():
            m.grad = torch.zeros_like(m)
        for half in range(WORLD):  # each rank's half of the batch, its bf16 gradients averaged in fp32
            mine = slice(half * GLOBAL_BATCH // WORLD, (half + 1) * GLOBAL_BATCH // WORLD)
            work.zero_grad()
            F.mse_loss(work(x[mine].bfloat16()).float(), y[mine]).backward()
            for w, m in zip(work.parameters(), master.parameters()):
                m.grad += w.grad.float() / WORLD
        lars.step()
    return [p.detach().bfloat16() for p in master.parameters()]


@pytest.mark.slow
def test_lars_under_bf16_optimizer_equals_the_same_arithmetic_unsharded(distributed):
    """bf16 copies of masters whose last bits differ (fp32 sums in another order) round apart now and then, so each
    parameter is compared by its error relative to how far it moved. Measured: at most 0.033 with the right layout;
    with per-partition norms (what the layouts prevent) up to 0.175."""
    expected = reference_params_bf16()
    initial = [p.detach().bfloat16() for p in make_model().parameters()]
    got = distributed[BF16]["params"]
    assert len(got) == len(expected)
    for k, (g, e, i) in enumerate(zip(got, expected, initial)):
        error = float((g.float() - e.float()).norm() / (e.float() - i.float()).norm())
        assert error < 0.05, f"parameter {k}: off by {error:.3f} of its move"
    assert distributed[BF16]["cut"], "BF16_Optimizer: no parameter is split across ranks; the test proves little"


@pytest.mark.slow
def test_lars_refuses_a_flat_partition_without_layout(distributed):
    assert "no parameter layout" in distributed["refused"]


def test_trust_ratio_single_process():
    """One parameter, one step, by hand: d = g + wd p, q = eta ||p|| / ||d||, p -= lr q d (first momentum step)."""
    p = nn.Parameter(torch.tensor([3.0, 4.0]))
    p.grad = torch.tensor([1.0, -2.0])
    lars = LARS([p], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.02)
    d = torch.tensor([1.3, -1.6])
    q = 0.02 * 5.0 / d.norm()
    lars.step()
    assert_close(p.detach(), torch.tensor([3.0, 4.0]) - 0.5 * q * d)
    assert lars.layout_of(p).lengths == [2] and Layout.whole(p).group is None


def test_excluded_group_is_plain_momentum_sgd():
    w, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2))
    w.grad, b.grad = torch.full((2, 2), 0.5), torch.full((2,), 0.5)
    lars = LARS([{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lars": False}], lr=0.1,
                weight_decay=0.1, trust_coefficient=0.001)
    lars.step()
    assert_close(b.detach(), torch.full((2,), 1 - 0.1 * 0.5))
    assert (1 - w.detach()).abs().max() < 1e-3  # trust ratio 0.001 * 2 / 1.2 shrinks the weight step


if __name__ == "__main__":
    worker(sys.argv[1])
    # Its results are written. Skip the interpreter's teardown: a gloo or DeepSpeed thread still joinable in a C++
    # destructor aborts the process now and then ("terminate called without an active exception", 2 CI runs of 9)
    os._exit(0)
