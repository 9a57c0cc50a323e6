"""BatchNorm statistics under `deepspeed.precision=bf16` match an fp32 run (world size 2, torchrun, gloo, CPU).

This file is also the worker: `torchrun --nproc_per_node 2 tests/engine/test_bf16_batchnorm.py OUT` trains the same
small conv + BatchNorm model for STEPS steps through the project's engine (build_engine, the DeepSpeed config it
generates): in fp32 at ZeRO 0, in bf16 at ZeRO 0-3 with SGD and at ZeRO 0 and 2 with LARS, and saves each rank's
BatchNorm running mean and variance, the parameters' dtype and the dtypes DeepSpeed reduces gradients in.

The channels' batch means (1-5) and variances (1-2) are O(1) and the running statistics approach them with momentum
0.1 from (0, 1): kept in bf16 (8 significant bits) an update of 0.1 * (target - mean) rounds away once the gap is
below 2-4 % of the value, and the statistics stall (0.17 short here). The stem's weights and the inputs are multiples
of powers of two that bf16 holds exactly and the stem is frozen, so bf16 compute reproduces the fp32 batch statistics
(to about 2e-4) and what is left is how the statistics are kept. `legacy` is the former configuration (module and
buffers cast to bf16), spelled through `deepspeed.extra`, and must fail the same tolerance: the test can tell the
two apart.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from pipeline.engine.ds_config import MODULE_DTYPES
from tests.helpers import REPO
from tests.helpers.torchrun import run_ranks

WORLD, MICRO, STEPS, TOL = 2, 8, 50, 1e-3
LEGACY = {"bf16": {"enabled": True}, "data_types": {"buffer_dtype": "bf16"}, "torch_autocast": {"enabled": False}}
RUNS = {"fp32": (0, "fp32", "sgd", {}), **{f"bf16_zero{s}": (s, "bf16", "sgd", {}) for s in range(4)},
        **{f"bf16_zero{s}_lars": (s, "bf16", "lars", {}) for s in (0, 2)}, "legacy": (0, "fp32", "sgd", LEGACY)}


def make_model() -> nn.Module:
    """Frozen stem (weights k/64, exact in bf16) -> BatchNorm -> trained head."""
    torch.manual_seed(0)
    stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        stem.weight.copy_(torch.randint(-8, 17, stem.weight.shape) / 64)
    stem.requires_grad_(False)
    return nn.Sequential(stem, nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in halves from 0 to 4 (exact in bf16), so every channel's batch mean and variance is O(1)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 9, (MICRO, 3, 8, 8), generator=g) / 2, torch.randn(MICRO, 2, generator=g)


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    from pipeline.config.compose import load
    from pipeline.distributed import resolve
    from pipeline.engine.deepspeed_engine import BatchGeometry, build_engine, init_distributed

    env = resolve()
    device = init_distributed(env, 120)
    results = {}
    for name, (stage, precision, optimizer, extra) in RUNS.items():
        cfg = load("train", [f"optimizer={optimizer}", "optimizer.lr=0.05", "schedule=warmup_constant",
                             "schedule.warmup_epochs=0", f"deepspeed.zero_stage={stage}",
                             f"deepspeed.precision={precision}"])
        cfg.deepspeed.extra = extra
        engine, _, _ = build_engine(cfg, make_model(), BatchGeometry(MICRO * WORLD, WORLD, 1), STEPS, 0, device)
        dtype = next(engine.module[0].parameters()).dtype  # what the module expects as input in this mode
        for step in range(STEPS):
            x, y = batch(step, env.rank)
            loss = F.mse_loss(engine(x.to(device, dtype)).float(), y)
            engine.backward(loss)
            engine.step()
        bn = engine.module[1]
        # the dtypes gradients are reduced in: ZeRO 1-3 keep a bucket per dtype, stage 0 one setting
        buckets = getattr(engine.optimizer, "ipg_buckets", None) or [engine.communication_data_type]
        results[name] = {"mean": bn.running_mean.float().cpu(), "var": bn.running_var.float().cpu(),
                         "buffer_dtype": str(bn.running_mean.dtype), "param_dtype": str(engine.module[5].weight.dtype),
                         "optimizer": type(engine.optimizer).__name__,
                         "reduce_dtypes": sorted(str(d) for d in buckets)}
    torch.save(results, os.path.join(out_dir, f"rank{env.rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16_bn")
    run_ranks(__file__, WORLD, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("run", [name for name in RUNS if name.startswith("bf16")])
def test_bf16_batchnorm_statistics_equal_fp32(ranks, run):
    for result in ranks:
        reference = result["fp32"]
        assert (reference["mean"].abs() > 0.5).all() and (reference["var"] > 0.5).all()  # O(1), where bf16 stalls
        for stat in ("mean", "var"):
            assert_close(result[run][stat], reference[stat], rtol=0, atol=TOL, msg=lambda m: f"{run} {stat}: {m}")
        # fp32 master weights and statistics; the trainer casts its views to MODULE_DTYPES, which must match
        assert result[run]["buffer_dtype"] == result[run]["param_dtype"] == str(MODULE_DTYPES["bf16"])
        assert result[run]["param_dtype"] == "torch.float32"


@pytest.mark.slow
def test_legacy_bf16_buffers_stall_beyond_the_tolerance(ranks):
    for result in ranks:
        gap = max((result["legacy"][s] - result["fp32"][s]).abs().max().item() for s in ("mean", "var"))
        assert gap > 5 * TOL, gap


@pytest.mark.slow
def test_lars_reduces_gradients_in_fp32_and_steps_unwrapped_at_zero_0(ranks):
    """Trust ratios take norms of the reduced gradients: LARS gets fp32 reductions, where DeepSpeed's autocast mode
    reduces convolution and linear gradients in bf16 otherwise; at ZeRO 0 no mixed-precision wrapper steps it."""
    for result in ranks:
        assert result["bf16_zero2_lars"]["reduce_dtypes"] == ["torch.float32"]
        assert result["bf16_zero0_lars"]["reduce_dtypes"] == ["torch.float32"]
        assert result["bf16_zero0_lars"]["optimizer"] == "LARS"
        assert "torch.bfloat16" in result["bf16_zero2"]["reduce_dtypes"]


@pytest.mark.slow
def test_a_bf16_run_trains_draws_monitors_and_exports_through_the_trainer(shards, tmp_path):
    """The calls into the fp32 module outside the engine's autocast forward (image grids, kNN features) work."""
    args = ["experiment=smoke", "method=aasae", "method.hidden_dim=32", "deepspeed.precision=bf16",
            f"data.root={shards}", f"run_dir={tmp_path}", "logger=none", "logger.progress_bar=false",
            "logger.log_every_steps=1", "logger.image_every_steps=1", "checkpoint.every_steps=0", "max_steps=2",
            "monitor.knn_k=5"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert 0 < next(r["knn/top1"] for r in records if "knn/top1" in r) <= 1
    assert (tmp_path / "encoder.safetensors").is_file()


if __name__ == "__main__":
    worker(sys.argv[1])
    # Its results are written. Skip the interpreter's teardown: a gloo or DeepSpeed thread still joinable in a C++
    # destructor aborts the process now and then ("terminate called without an active exception", 2 CI runs of 9)
    os._exit(0)
