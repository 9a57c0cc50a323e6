"""CUDA paths, skipped without a GPU (tools/gpu_check.sh runs them on a device machine with AUGSSL_DEVICE=cuda):
nvJPEG decoding equals the CPU decoder on the eval view, loader -> model on CUDA in channels-last layout, a bf16
ZeRO-2 training run on one GPU, and the gradient-carrying gather over NCCL at world size 1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from tests.helpers.loader_data import digits_split, make_loader
from tests.helpers.torchrun import environment

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def gpu_env() -> dict:
    env = {k: v for k, v in environment().items() if k != "DS_ACCELERATOR"}
    return {**env, "AUGSSL_DEVICE": "cuda"}


def test_nvjpeg_decodes_the_eval_view_as_the_cpu_decoder_does(tmp_path):
    """A layout or colour-order bug in the GPU path shows as a mean difference far above the decoders' rounding."""
    manifest = digits_split(str(tmp_path), [500, 938])
    cpu = next(iter(make_loader(manifest, shuffle=False, device="cpu")))
    gpu = next(iter(make_loader(manifest, shuffle=False, device="cuda")))
    assert gpu.views["image"].is_cuda and gpu.keys == cpu.keys
    difference = (gpu.views["image"].float().cpu() - cpu.views["image"]).abs().mean().item()
    assert difference < 0.05, difference


def test_the_loader_feeds_a_cuda_model_channels_last(tmp_path):
    from pipeline.models.resnet import ResNet

    manifest = digits_split(str(tmp_path), [500, 938])
    batch = next(iter(make_loader(manifest, method="aag", device="cuda", dtype="bfloat16")))
    for view in batch.views.values():  # channels_last unset: on, for CUDA
        assert view.is_cuda and view.dtype == torch.bfloat16
        assert view.is_contiguous(memory_format=torch.channels_last)
    assert batch.labels.is_cuda and batch.valid.is_cuda
    model = ResNet("resnet18", stem="cifar").cuda().to(torch.bfloat16)
    with torch.no_grad():
        assert model(batch.views["u"]).isfinite().all()


def test_a_bf16_zero2_run_trains_on_one_gpu(shards, tmp_path):
    run_dir = tmp_path / "gpu"
    # zero2_bf16 as the ImageNet presets have it, SyncBatchNorm groups included: one rank keeps plain BatchNorm
    args = ["experiment=smoke", "method=aag", f"data.root={shards}", f"run_dir={run_dir}", "deepspeed=zero2_bf16",
            "logger=none", "logger.log_every_steps=1", "max_steps=4",
            "monitor.knn_every_epochs=0", "data.loader.device=auto", "data.loader.num_threads=2"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=gpu_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "BatchNorm per rank (32 samples)" in proc.stdout, proc.stdout[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["ssl_loss"] for r in rows if "ssl_loss" in r]
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    assert any(r.get("memory/gpu_max_allocated_gib", 0) > 0 for r in rows)


def test_the_gradient_carrying_gather_runs_over_nccl():
    script = (
        "import torch, torch.distributed as dist\n"
        "from pipeline.distributed import _AllGatherWithGrad, export, resolve\n"
        "export(resolve()); dist.init_process_group('nccl', device_id=torch.device('cuda', 0))\n"
        "x = torch.arange(6.0, device='cuda').reshape(3, 2).requires_grad_()  # a leaf: its .grad is kept\n"
        "y = torch.cat(_AllGatherWithGrad.apply(x)); y.sum().backward()  # gather_with_grad skips a world of 1\n"
        "assert torch.equal(y, x) and torch.equal(x.grad, torch.ones_like(x)), (y, x.grad)\n"
        "dist.destroy_process_group(); print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=gpu_env(), text=True, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
